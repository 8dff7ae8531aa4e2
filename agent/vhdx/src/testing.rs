//! Test support: crafts VHDX files qemu cannot make — differencing disks with
//! parent locators, 4 KiB logical sectors, PARTIALLY_PRESENT blocks with
//! sector bitmaps, UNDEFINED/UNMAPPED/ZERO states, pending logs (with stale
//! entries), unusual region layouts and metadata orders — and hostile files.
//! Everything is built in memory.

use std::collections::BTreeMap;

use super::format::*;
use super::guid::Guid;

/// State and content of one payload block.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    /// Raw BAT state (0..7).
    pub state: u8,
    /// Bytes stored in the file for FULLY/PARTIALLY_PRESENT (shorter is zero-padded).
    pub data: Option<Vec<u8>>,
    /// Forces the BAT FileOffset (nothing is written there): for hostile files.
    pub raw_offset: Option<u64>,
}

impl BlockSpec {
    pub fn state(state: u8) -> BlockSpec {
        BlockSpec {
            state,
            data: None,
            raw_offset: None,
        }
    }
    pub fn present(data: Vec<u8>) -> BlockSpec {
        BlockSpec {
            state: PAYLOAD_BLOCK_FULLY_PRESENT,
            data: Some(data),
            raw_offset: None,
        }
    }
    pub fn partial(data: Vec<u8>) -> BlockSpec {
        BlockSpec {
            state: PAYLOAD_BLOCK_PARTIALLY_PRESENT,
            data: Some(data),
            raw_offset: None,
        }
    }
}

/// One log descriptor (§2.3.1.2, §2.3.1.3).
#[derive(Clone, Debug)]
pub enum LogDescriptor {
    /// Writes one 4 KiB sector.
    Data { file_offset: u64, sector: Vec<u8> },
    /// Zeroes `length` bytes.
    Zero { file_offset: u64, length: u64 },
}

/// One log entry (§2.3.1.1) and where it sits in the log.
#[derive(Clone, Debug)]
pub struct LogEntrySpec {
    /// Byte offset inside the log (4 KiB multiple); entries may wrap.
    pub position: u64,
    pub sequence: u64,
    pub tail: u64,
    pub log_guid: Guid,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub descriptors: Vec<LogDescriptor>,
}

/// Serializes a log entry: header and descriptors, then the data sectors.
pub fn log_entry_bytes(e: &LogEntrySpec) -> Vec<u8> {
    let n = e.descriptors.len();
    let desc_sectors = (LOG_ENTRY_HEADER_SIZE + n * LOG_DESCRIPTOR_SIZE).div_ceil(4096);
    let data: Vec<&Vec<u8>> = e
        .descriptors
        .iter()
        .filter_map(|d| match d {
            LogDescriptor::Data { sector, .. } => Some(sector),
            _ => None,
        })
        .collect();
    let total = (desc_sectors + data.len()) * 4096;
    let mut b = vec![0u8; total];
    b[0..4].copy_from_slice(LOG_ENTRY_SIGNATURE);
    put_u32(&mut b, 8, total as u32);
    put_u32(&mut b, 12, e.tail as u32);
    put_u64(&mut b, 16, e.sequence);
    put_u32(&mut b, 24, n as u32);
    b[32..48].copy_from_slice(&e.log_guid.0);
    put_u64(&mut b, 48, e.flushed_file_offset);
    put_u64(&mut b, 56, e.last_file_offset);
    let mut di = 0;
    for (i, d) in e.descriptors.iter().enumerate() {
        let o = LOG_ENTRY_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE;
        match d {
            LogDescriptor::Zero {
                file_offset,
                length,
            } => {
                b[o..o + 4].copy_from_slice(LOG_ZERO_DESC_SIGNATURE);
                put_u64(&mut b, o + 8, *length);
                put_u64(&mut b, o + 16, *file_offset);
            }
            LogDescriptor::Data {
                file_offset,
                sector,
            } => {
                assert_eq!(sector.len(), 4096, "log data sectors are 4 KiB");
                b[o..o + 4].copy_from_slice(LOG_DATA_DESC_SIGNATURE);
                b[o + 4..o + 8].copy_from_slice(&sector[4092..4096]);
                b[o + 8..o + 16].copy_from_slice(&sector[0..8]);
                put_u64(&mut b, o + 16, *file_offset);
                let s = (desc_sectors + di) * 4096;
                b[s..s + 4].copy_from_slice(LOG_DATA_SECTOR_SIGNATURE);
                put_u32(&mut b, s + 4, (e.sequence >> 32) as u32);
                b[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
                put_u32(&mut b, s + 4092, e.sequence as u32);
                di += 1;
            }
        }
        put_u64(&mut b, o + 24, e.sequence);
    }
    store_crc32c(&mut b, 4);
    b
}

/// Copies `entry` into the circular log at `position`.
pub fn place_log_entry(
    image: &mut [u8],
    log_offset: u64,
    log_length: u64,
    position: u64,
    entry: &[u8],
) {
    for (i, &byte) in entry.iter().enumerate() {
        let p = (position + i as u64) % log_length;
        image[(log_offset + p) as usize] = byte;
    }
}

/// Parses both headers, applies `f` to each and writes them back with fresh CRCs.
pub fn rewrite_headers(image: &mut [u8], f: impl Fn(usize, &mut Header)) {
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let o = *off as usize;
        if let Ok(mut h) = Header::parse(&image[o..o + HEADER_SIZE]) {
            f(i, &mut h);
            image[o..o + HEADER_SIZE].copy_from_slice(&h.to_bytes());
        }
    }
}

/// Recomputes the CRCs of both headers and both region tables in place.
pub fn reseal(image: &mut [u8]) {
    for off in HEADER_OFFSETS {
        let o = off as usize;
        store_crc32c(&mut image[o..o + HEADER_SIZE], 4);
    }
    for off in REGION_TABLE_OFFSETS {
        let o = off as usize;
        store_crc32c(&mut image[o..o + REGION_TABLE_SIZE], 4);
    }
}

/// A parent locator item (§2.6.2.6) holding `entries` (UTF-16LE).
pub fn parent_locator_bytes(entries: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * entries.len()];
    b[0..16].copy_from_slice(&VHDX_PARENT_LOCATOR_TYPE.0);
    put_u16(&mut b, 18, entries.len() as u16);
    for (i, (k, v)) in entries.iter().enumerate() {
        let (kb, vb) = (utf16le(k), utf16le(v));
        let ko = b.len();
        b.extend_from_slice(&kb);
        let vo = b.len();
        b.extend_from_slice(&vb);
        let e = 20 + 12 * i;
        put_u32(&mut b, e, ko as u32);
        put_u32(&mut b, e + 4, vo as u32);
        put_u16(&mut b, e + 8, kb.len() as u16);
        put_u16(&mut b, e + 10, vb.len() as u16);
    }
    b
}

/// Describes a whole VHDX file; `build` lays it out.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub leave_block_allocated: bool,
    pub creator: String,
    pub disk_id: Guid,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    /// Header LogGuid; non-zero with `log_entries` makes a pending log.
    pub log_guid: Guid,
    /// `Some` sets HasParent and stores these key/value pairs.
    pub parent_locator: Option<Vec<(String, String)>>,
    pub header_sequences: [u64; 2],
    pub log_offset: u64,
    pub log_length: u32,
    pub metadata_offset: u64,
    pub metadata_length: u32,
    pub bat_offset: u64,
    /// Where payload blocks start; 0 means after the last region.
    pub data_offset: u64,
    /// List the metadata region before the BAT in the region table.
    pub regions_reversed: bool,
    /// Reverse the order of metadata table entries and of item data.
    pub metadata_items_reversed: bool,
    /// Additional metadata items: id, bytes, flags.
    pub extra_metadata: Vec<(Guid, Vec<u8>, u32)>,
    pub blocks: BTreeMap<u64, BlockSpec>,
    /// Sector bitmap bytes per chunk (bit set = sector present in this file).
    pub sector_bitmaps: BTreeMap<u64, Vec<u8>>,
    pub log_entries: Vec<LogEntrySpec>,
}

/// Where `build` put things.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub block_offsets: BTreeMap<u64, u64>,
    pub bitmap_offsets: BTreeMap<u64, u64>,
    pub file_size: u64,
}

impl ImageBuilder {
    pub fn new(virtual_size: u64, block_size: u32, logical_sector_size: u32) -> ImageBuilder {
        ImageBuilder {
            virtual_size,
            block_size,
            logical_sector_size,
            physical_sector_size: 4096,
            leave_block_allocated: false,
            creator: "blockvault test builder".into(),
            disk_id: Guid::random(),
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            parent_locator: None,
            header_sequences: [1, 2],
            log_offset: MIB,
            log_length: MIB as u32,
            metadata_offset: 2 * MIB,
            metadata_length: MIB as u32,
            bat_offset: 3 * MIB,
            data_offset: 0,
            regions_reversed: false,
            metadata_items_reversed: false,
            extra_metadata: Vec::new(),
            blocks: BTreeMap::new(),
            sector_bitmaps: BTreeMap::new(),
            log_entries: Vec::new(),
        }
    }

    pub fn chunk_ratio(&self) -> u64 {
        chunk_ratio(self.logical_sector_size, self.block_size)
    }

    pub fn bat_entries(&self) -> u64 {
        bat_entry_count(
            self.virtual_size,
            self.block_size,
            self.chunk_ratio(),
            self.parent_locator.is_some(),
        )
    }

    /// BAT region length: the entries rounded up to 1 MiB.
    pub fn bat_length(&self) -> u64 {
        (self.bat_entries() * 8).div_ceil(MIB).max(1) * MIB
    }

    /// File offset of the BAT entry of payload block `block`.
    pub fn bat_entry_offset(&self, block: u64) -> u64 {
        self.bat_offset + payload_bat_index(block, self.chunk_ratio()) * 8
    }

    pub fn set_block(&mut self, block: u64, spec: BlockSpec) -> &mut Self {
        self.blocks.insert(block, spec);
        self
    }

    /// Marks sectors `[first, first+count)` (absolute virtual sector numbers)
    /// present in the sector bitmap.
    pub fn set_sectors_present(&mut self, first: u64, count: u64) -> &mut Self {
        for s in first..first + count {
            let chunk = s / SECTORS_PER_BITMAP_BLOCK;
            let bit = s % SECTORS_PER_BITMAP_BLOCK;
            let bm = self.sector_bitmaps.entry(chunk).or_default();
            let need = (bit / 8 + 1) as usize;
            if bm.len() < need {
                bm.resize(need, 0);
            }
            bm[(bit / 8) as usize] |= 1 << (bit % 8);
        }
        self
    }

    /// Offsets of allocated blocks and bitmaps, in allocation order.
    pub fn layout(&self) -> Layout {
        let mut end = [
            self.log_offset + self.log_length as u64,
            self.metadata_offset + self.metadata_length as u64,
            self.bat_offset + self.bat_length(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(MIB);
        if self.data_offset != 0 {
            end = self.data_offset;
        }
        let mut l = Layout::default();
        for (&i, b) in &self.blocks {
            if b.raw_offset.is_none()
                && (b.state == PAYLOAD_BLOCK_FULLY_PRESENT
                    || b.state == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            {
                l.block_offsets.insert(i, end);
                end += self.block_size as u64;
            }
        }
        for &c in self.sector_bitmaps.keys() {
            l.bitmap_offsets.insert(c, end);
            end += MIB;
        }
        l.file_size = end;
        l
    }

    fn metadata_region(&self) -> Vec<u8> {
        let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
        let mut fp = vec![0u8; 8];
        put_u32(&mut fp, 0, self.block_size);
        put_u32(
            &mut fp,
            4,
            self.leave_block_allocated as u32 | ((self.parent_locator.is_some() as u32) << 1),
        );
        items.push((FILE_PARAMETERS, fp, MD_FLAG_IS_REQUIRED));
        items.push((
            VIRTUAL_DISK_SIZE,
            self.virtual_size.to_le_bytes().to_vec(),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ));
        items.push((
            VIRTUAL_DISK_ID,
            self.disk_id.0.to_vec(),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ));
        items.push((
            LOGICAL_SECTOR_SIZE,
            self.logical_sector_size.to_le_bytes().to_vec(),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ));
        items.push((
            PHYSICAL_SECTOR_SIZE,
            self.physical_sector_size.to_le_bytes().to_vec(),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ));
        if let Some(pl) = &self.parent_locator {
            items.push((
                PARENT_LOCATOR,
                parent_locator_bytes(pl),
                MD_FLAG_IS_REQUIRED,
            ));
        }
        items.extend(self.extra_metadata.iter().cloned());
        if self.metadata_items_reversed {
            items.reverse();
        }
        super::writer::lay_out_metadata(self.metadata_length as usize, items)
    }

    /// Lays the file out in memory.
    pub fn build(&self) -> Vec<u8> {
        let layout = self.layout();
        let mut img = vec![0u8; layout.file_size as usize];
        img[0..8].copy_from_slice(FILE_ID_SIGNATURE);
        let creator = utf16le(&self.creator);
        img[8..8 + creator.len().min(512)].copy_from_slice(&creator[..creator.len().min(512)]);
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let h = Header {
                sequence_number: self.header_sequences[i],
                file_write_guid: self.file_write_guid,
                data_write_guid: self.data_write_guid,
                log_guid: self.log_guid,
                log_version: 0,
                version: 1,
                log_length: self.log_length,
                log_offset: self.log_offset,
            };
            img[*off as usize..*off as usize + HEADER_SIZE].copy_from_slice(&h.to_bytes());
        }
        let mut regions = vec![
            RegionEntry {
                guid: BAT_REGION,
                file_offset: self.bat_offset,
                length: self.bat_length() as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: self.metadata_offset,
                length: self.metadata_length,
                required: true,
            },
        ];
        if self.regions_reversed {
            regions.reverse();
        }
        let rt = region_table_bytes(&regions);
        for off in REGION_TABLE_OFFSETS {
            img[off as usize..off as usize + REGION_TABLE_SIZE].copy_from_slice(&rt);
        }
        let md = self.metadata_region();
        let mo = self.metadata_offset as usize;
        img[mo..mo + md.len()].copy_from_slice(&md);

        let cr = self.chunk_ratio();
        for (&i, b) in &self.blocks {
            let fo = b
                .raw_offset
                .or_else(|| layout.block_offsets.get(&i).copied())
                .unwrap_or(0);
            let idx = payload_bat_index(i, cr);
            put_u64(
                &mut img,
                (self.bat_offset + idx * 8) as usize,
                bat_entry(b.state, fo),
            );
            if let (Some(d), Some(&at)) = (&b.data, layout.block_offsets.get(&i)) {
                let n = d.len().min(self.block_size as usize);
                img[at as usize..at as usize + n].copy_from_slice(&d[..n]);
            }
        }
        for (&c, bm) in &self.sector_bitmaps {
            let at = layout.bitmap_offsets[&c];
            let idx = bitmap_bat_index(c, cr);
            put_u64(
                &mut img,
                (self.bat_offset + idx * 8) as usize,
                bat_entry(SB_BLOCK_PRESENT, at),
            );
            let n = bm.len().min(MIB as usize);
            img[at as usize..at as usize + n].copy_from_slice(&bm[..n]);
        }
        for e in &self.log_entries {
            let bytes = log_entry_bytes(e);
            place_log_entry(
                &mut img,
                self.log_offset,
                self.log_length as u64,
                e.position,
                &bytes,
            );
        }
        img
    }
}

/// Largest image a sparse fuzz input may describe.
const FUZZ_MAX_IMAGE: u64 = 16 << 20;

/// Encodes an image compactly for the fuzz corpus: `u32` image length, then
/// runs of `u32 offset, u16 length, bytes` for its non-zero parts. VHDX
/// structures sit at 64 KiB..MiB offsets and are mostly zeros, so a whole
/// valid file becomes a few KiB.
pub fn encode_sparse(image: &[u8]) -> Vec<u8> {
    let mut out = (image.len() as u32).to_le_bytes().to_vec();
    let mut i = 0usize;
    while i < image.len() {
        if image[i] == 0 {
            i += 1;
            continue;
        }
        // Extend the run while zero gaps are short.
        let start = i;
        let mut end = i;
        let mut j = i;
        while j < image.len() && j - start < u16::MAX as usize {
            if image[j] != 0 {
                end = j + 1;
            } else if j - end >= 16 {
                break;
            }
            j += 1;
        }
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&image[start..end]);
        i = end;
    }
    out
}

/// Inverse of [`encode_sparse`], tolerant of any input (truncated runs are
/// clipped, the length is capped).
pub fn decode_sparse(data: &[u8]) -> Vec<u8> {
    if data.len() < 4 {
        return Vec::new();
    }
    let len = (le_u32(data, 0) as u64).min(FUZZ_MAX_IMAGE) as usize;
    let mut img = vec![0u8; len];
    let mut p = 4;
    while p + 6 <= data.len() {
        let off = le_u32(data, p) as usize;
        let n = le_u16(data, p + 4) as usize;
        p += 6;
        let n = n.min(data.len() - p);
        if off < len {
            let m = n.min(len - off);
            img[off..off + m].copy_from_slice(&data[p..p + m]);
        }
        p += n;
    }
    img
}
