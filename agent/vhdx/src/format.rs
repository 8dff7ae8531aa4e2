//! On-disk layout of VHDX structures (MS-VHDX v8.0, §2). Everything here is
//! little-endian. These numbers are the file format: do not change them.

use super::guid::Guid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// §2.2.1 File type identifier.
pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const FILE_ID_SIZE: usize = 64 * 1024;
// §2.2.2 Headers: two 4 KiB structures at 64 KiB and 128 KiB.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
// §2.2.3 Region tables: two 64 KiB copies at 192 KiB and 256 KiB.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const REGION_TABLE_SIGNATURE: &[u8; 4] = b"regi";
pub const REGION_TABLE_MAX_ENTRIES: u32 = 2047;
/// The header section (file identifier, headers, region tables, reserved)
/// occupies the first 1 MiB; no region may start inside it.
pub const HEADER_SECTION_SIZE: u64 = MIB;

pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

// §2.6.1 Metadata table: at the start of the metadata region, 64 KiB.
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_MAX_ENTRIES: u16 = 2047;
/// Longest parent locator item read (its key/value table; real ones are a few hundred bytes).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;
pub const MD_FLAG_IS_USER: u32 = 1;
pub const MD_FLAG_IS_VIRTUAL_DISK: u32 = 2;
pub const MD_FLAG_IS_REQUIRED: u32 = 4;

// §2.6.2 Known metadata items.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// §2.6.2.6.3 the VHDX parent locator type.
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

// §2.6.2.1 block size limits.
pub const MIN_BLOCK_SIZE: u32 = MIB as u32;
pub const MAX_BLOCK_SIZE: u32 = 256 * MIB as u32;
/// §2.6.2.2: the maximum virtual disk size is 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// §2.4: each sector bitmap block covers 2^23 sectors and is 1 MiB.
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;

// §2.5.1.1 payload block states and §2.5.1.2 sector bitmap states.
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// UNMAPPED in the 0.95 draft of the format; read as UNMAPPED.
pub const PAYLOAD_BLOCK_UNMAPPED_V095: u8 = 5;
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
pub const SB_BLOCK_PRESENT: u8 = 6;
pub const BAT_STATE_MASK: u64 = 0x7;
pub const BAT_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;

// §2.3 Log.
pub const LOG_SECTOR: u64 = 4096;
pub const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
pub const LOG_DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
pub const LOG_ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
pub const LOG_DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
pub const LOG_ENTRY_HEADER_SIZE: usize = 64;
pub const LOG_DESCRIPTOR_SIZE: usize = 32;

pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC-32C of `buf` computed with the 4-byte checksum field at `at` taken as zero.
pub fn crc32c_with_zeroed_field(buf: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..at]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[at + 4..])
}

/// Writes the CRC-32C of `buf` into the checksum field at `at`.
pub fn store_crc32c(buf: &mut [u8], at: usize) {
    put_u32(buf, at, 0);
    let crc = crc32c::crc32c(buf);
    put_u32(buf, at, crc);
}

/// §2.2.2 VHDX header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header; `Err` says why it is not valid.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err("short read".into());
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != HEADER_SIGNATURE {
            return Err(format!(
                "bad signature {:02x?} (expected \"head\")",
                &b[0..4]
            ));
        }
        let stored = le_u32(b, 4);
        let computed = crc32c_with_zeroed_field(b, 4);
        if stored != computed {
            return Err(format!(
                "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        Ok(Header {
            sequence_number: le_u64(b, 8),
            file_write_guid: Guid::from_bytes(&b[16..32]),
            data_write_guid: Guid::from_bytes(&b[32..48]),
            log_guid: Guid::from_bytes(&b[48..64]),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        put_u64(&mut b, 8, self.sequence_number);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put_u16(&mut b, 64, self.log_version);
        put_u16(&mut b, 66, self.version);
        put_u32(&mut b, 68, self.log_length);
        put_u64(&mut b, 72, self.log_offset);
        store_crc32c(&mut b, 4);
        b
    }
}

/// §2.2.3.2 region table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a 64 KiB region table; `Err` says why it is not valid.
pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, String> {
    if b.len() < REGION_TABLE_SIZE {
        return Err("short read".into());
    }
    let b = &b[..REGION_TABLE_SIZE];
    if &b[0..4] != REGION_TABLE_SIGNATURE {
        return Err(format!(
            "bad signature {:02x?} (expected \"regi\")",
            &b[0..4]
        ));
    }
    let stored = le_u32(b, 4);
    let computed = crc32c_with_zeroed_field(b, 4);
    if stored != computed {
        return Err(format!(
            "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let count = le_u32(b, 8);
    if count > REGION_TABLE_MAX_ENTRIES {
        return Err(format!(
            "entry count {count} exceeds the maximum {REGION_TABLE_MAX_ENTRIES}"
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let e = &b[16 + i * 32..16 + (i + 1) * 32];
            RegionEntry {
                guid: Guid::from_bytes(&e[0..16]),
                file_offset: le_u64(e, 16),
                length: le_u32(e, 24),
                required: le_u32(e, 28) & 1 == 1,
            }
        })
        .collect())
}

pub fn region_table_bytes(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(REGION_TABLE_SIGNATURE);
    put_u32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let o = 16 + i * 32;
        b[o..o + 16].copy_from_slice(&e.guid.0);
        put_u64(&mut b, o + 16, e.file_offset);
        put_u32(&mut b, o + 24, e.length);
        put_u32(&mut b, o + 28, e.required as u32);
    }
    store_crc32c(&mut b, 4);
    b
}

/// §2.6.1.2 metadata table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item_id: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

/// Builds a metadata table (64 KiB) from entries.
pub fn metadata_table_bytes(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    b[0..8].copy_from_slice(METADATA_SIGNATURE);
    put_u16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + i * 32;
        b[o..o + 16].copy_from_slice(&e.item_id.0);
        put_u32(&mut b, o + 16, e.offset);
        put_u32(&mut b, o + 20, e.length);
        put_u32(&mut b, o + 24, e.flags);
    }
    b
}

/// The chunk ratio (§2.4): payload blocks per sector bitmap block.
pub fn chunk_ratio(logical_sector_size: u32, block_size: u32) -> u64 {
    (SECTORS_PER_BITMAP_BLOCK * logical_sector_size as u64) / block_size as u64
}

/// Number of BAT entries the file must hold (§2.5).
pub fn bat_entry_count(virtual_size: u64, block_size: u32, cr: u64, has_parent: bool) -> u64 {
    let data_blocks = virtual_size.div_ceil(block_size as u64);
    if has_parent {
        data_blocks.div_ceil(cr) * (cr + 1)
    } else if data_blocks == 0 {
        0
    } else {
        data_blocks + (data_blocks - 1) / cr
    }
}

/// BAT index of payload block `i` (§2.5).
pub fn payload_bat_index(i: u64, cr: u64) -> u64 {
    i + i / cr
}

/// BAT index of the sector bitmap entry of chunk `c` (§2.5).
pub fn bitmap_bat_index(c: u64, cr: u64) -> u64 {
    c * (cr + 1) + cr
}

pub fn bat_entry(state: u8, file_offset: u64) -> u64 {
    (file_offset & BAT_OFFSET_MASK) | (state as u64 & BAT_STATE_MASK)
}

/// Encodes `s` as UTF-16LE.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_math() {
        assert_eq!(chunk_ratio(512, MIB as u32), 4096);
        assert_eq!(chunk_ratio(512, 32 * MIB as u32), 128);
        assert_eq!(chunk_ratio(512, 256 * MIB as u32), 16);
        assert_eq!(chunk_ratio(4096, 256 * MIB as u32), 128);
        assert_eq!(chunk_ratio(4096, MIB as u32), 32768);
        // 2 GiB, 1 MiB blocks: 2048 blocks, no sector bitmap entry needed in between.
        assert_eq!(bat_entry_count(2048 * MIB, MIB as u32, 4096, false), 2048);
        // 8 GiB with 1 MiB blocks: 8192 blocks, one bitmap entry after block 4095.
        assert_eq!(bat_entry_count(8192 * MIB, MIB as u32, 4096, false), 8193);
        assert_eq!(bat_entry_count(8192 * MIB, MIB as u32, 4096, true), 8194);
        assert_eq!(payload_bat_index(4096, 4096), 4097);
        assert_eq!(bitmap_bat_index(0, 4096), 4096);
        assert_eq!(bitmap_bat_index(1, 128), 257);
    }

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(Header::parse(&b).unwrap_err().contains("CRC-32C mismatch"));
    }
}
