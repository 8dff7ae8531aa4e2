//! Log replay in memory (MS-VHDX §2.3). The file is never written: replayed
//! sectors become an overlay that every later read goes through.

use std::collections::{BTreeMap, HashMap};

use super::error::Error;
use super::format::*;
use super::guid::Guid;
use super::source::{ReadAt, Sector};

/// Largest log this reader loads into memory.
const MAX_LOG_LENGTH: u64 = 256 * MIB;
/// Largest number of 4 KiB sectors a replay may touch (4 GiB).
const MAX_OVERLAY_SECTORS: u64 = 1 << 20;
/// Entries tile the log, so the lengths of the entries whose headers survive add up to about
/// the log's length. A hostile log can put a header claiming the whole log at every 4 KiB; each
/// would be checksummed over its full length (quadratic: 16 TiB for a 256 MiB log). Checking
/// stops, with an error, once this many times the log's length has been checksummed.
const MAX_CHECKED_LOG_LENGTHS: u64 = 4;

#[derive(Debug)]
enum Desc {
    Data { file_offset: u64, sector: Box<[u8]> },
    Zero { file_offset: u64, length: u64 },
}

#[derive(Debug)]
struct Entry {
    pos: u64,
    length: u64,
    tail: u64,
    seq: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descs: Vec<Desc>,
}

/// What replay produced.
#[derive(Debug)]
pub(crate) struct Replay {
    pub overlay: BTreeMap<u64, Sector>,
    pub entries: usize,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub logical_len: u64,
}

fn circular(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let l = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut p = pos % l;
    let mut left = len;
    while left > 0 {
        let n = left.min(l - p);
        out.extend_from_slice(&log[p as usize..(p + n) as usize]);
        left -= n;
        p = (p + n) % l;
    }
    out
}

/// Why an entry header was not taken.
enum Invalid {
    /// Not a valid entry of this log; says why.
    Entry(String),
    /// Checking it would pass the log's checksum budget.
    Budget,
}

impl From<String> for Invalid {
    fn from(why: String) -> Self {
        Invalid::Entry(why)
    }
}

impl From<&str> for Invalid {
    fn from(why: &str) -> Self {
        Invalid::Entry(why.into())
    }
}

/// Parses and fully validates the entry at `pos` (§2.3.1); `Err` says why it is not a valid
/// entry of this log. `budget` is what may still be checksummed; it is charged the entry's
/// length. Only with `keep` are the descriptors (and their sectors) kept: the scan checks every
/// header, and only the active sequence's entries are parsed again to be replayed.
fn parse_entry(
    log: &[u8],
    pos: u64,
    log_guid: &Guid,
    budget: &mut u64,
    keep: bool,
) -> Result<Entry, Invalid> {
    let l = log.len() as u64;
    let h = &log[pos as usize..pos as usize + LOG_ENTRY_HEADER_SIZE];
    if &h[0..4] != LOG_ENTRY_SIGNATURE {
        return Err("no entry signature".into());
    }
    let length = le_u32(h, 8) as u64;
    let tail = le_u32(h, 12) as u64;
    let seq = le_u64(h, 16);
    let desc_count = le_u32(h, 24) as u64;
    let guid = Guid::from_bytes(&h[32..48]);
    if length == 0 || length % LOG_SECTOR != 0 || length > l {
        return Err(format!("bad EntryLength {length}").into());
    }
    if tail % LOG_SECTOR != 0 || tail >= l {
        return Err(format!("bad Tail {tail}").into());
    }
    if seq == 0 {
        return Err("SequenceNumber 0".into());
    }
    if guid != *log_guid {
        return Err(format!("LogGuid {guid} does not match the header's {log_guid}").into());
    }
    let total_sectors = length / LOG_SECTOR;
    let desc_bytes = LOG_ENTRY_HEADER_SIZE as u64 + desc_count * LOG_DESCRIPTOR_SIZE as u64;
    let desc_sectors = desc_bytes.div_ceil(LOG_SECTOR);
    if desc_sectors > total_sectors {
        return Err(
            format!("DescriptorCount {desc_count} does not fit EntryLength {length}").into(),
        );
    }
    *budget = budget.checked_sub(length).ok_or(Invalid::Budget)?;
    let bytes = circular(log, pos, length);
    let stored = le_u32(&bytes, 4);
    let computed = crc32c_with_zeroed_field(&bytes, 4);
    if stored != computed {
        return Err(
            format!("CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})").into(),
        );
    }
    let mut descs = Vec::new();
    let mut data_index = 0u64;
    for i in 0..desc_count as usize {
        let d = &bytes[LOG_ENTRY_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE..][..LOG_DESCRIPTOR_SIZE];
        let file_offset = le_u64(d, 16);
        let dseq = le_u64(d, 24);
        if dseq != seq {
            return Err(
                format!("descriptor {i} has SequenceNumber {dseq}, entry has {seq}").into(),
            );
        }
        if file_offset % LOG_SECTOR != 0 {
            return Err(
                format!("descriptor {i} FileOffset {file_offset} not 4 KiB aligned").into(),
            );
        }
        if &d[0..4] == LOG_ZERO_DESC_SIGNATURE {
            let zl = le_u64(d, 8);
            if zl % LOG_SECTOR != 0 {
                return Err(
                    format!("zero descriptor {i} ZeroLength {zl} not 4 KiB aligned").into(),
                );
            }
            if keep {
                descs.push(Desc::Zero {
                    file_offset,
                    length: zl,
                });
            }
        } else if &d[0..4] == LOG_DATA_DESC_SIGNATURE {
            let sector_no = desc_sectors + data_index;
            if sector_no >= total_sectors {
                return Err(format!(
                    "data descriptor {i} has no data sector inside EntryLength {length}"
                )
                .into());
            }
            let s =
                &bytes[(sector_no * LOG_SECTOR) as usize..((sector_no + 1) * LOG_SECTOR) as usize];
            if &s[0..4] != LOG_DATA_SECTOR_SIGNATURE {
                return Err(format!("data sector {data_index} has a bad signature").into());
            }
            let sseq = ((le_u32(s, 4) as u64) << 32) | le_u32(s, 4092) as u64;
            if sseq != seq {
                return Err(format!(
                    "data sector {data_index} has sequence {sseq}, entry has {seq}"
                )
                .into());
            }
            if keep {
                let mut sector = vec![0u8; LOG_SECTOR as usize].into_boxed_slice();
                sector[0..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..4096].copy_from_slice(&d[4..8]);
                descs.push(Desc::Data {
                    file_offset,
                    sector,
                });
            }
            data_index += 1;
        } else {
            return Err(
                format!("descriptor {i} has an unknown signature {:02x?}", &d[0..4]).into(),
            );
        }
    }
    Ok(Entry {
        pos,
        length,
        tail,
        seq,
        flushed_file_offset: le_u64(h, 48),
        last_file_offset: le_u64(h, 56),
        descs,
    })
}

/// Finds the active sequence (§2.3.3) and replays it into an overlay. Returns
/// `None` when the header's LogGuid is zero or no entry carries it.
pub(crate) fn replay(
    file: &str,
    src: &dyn ReadAt,
    physical_len: u64,
    header: &Header,
) -> Result<Option<Replay>, Error> {
    if header.log_guid.is_zero() {
        return Ok(None);
    }
    let off = header.log_offset;
    let len = header.log_length as u64;
    let region = "log region";
    if header.log_version != 0 {
        return Err(Error::unsupported(
            file,
            region,
            off,
            format!("LogVersion {}", header.log_version),
        ));
    }
    if len == 0 || len % MIB != 0 {
        return Err(Error::corrupt(
            file,
            region,
            off,
            format!("LogLength {len} is not a non-zero multiple of 1 MiB"),
        ));
    }
    if off < HEADER_SECTION_SIZE || off % MIB != 0 {
        return Err(Error::corrupt(
            file,
            region,
            off,
            "LogOffset is not a multiple of 1 MiB past the header section",
        ));
    }
    if len > MAX_LOG_LENGTH {
        return Err(Error::unsupported(
            file,
            region,
            off,
            format!("LogLength {len} exceeds {MAX_LOG_LENGTH}"),
        ));
    }
    if off.checked_add(len).is_none_or(|e| e > physical_len) {
        return Err(Error::corrupt(
            file,
            region,
            off,
            format!("log of {len} bytes extends past the end of the {physical_len}-byte file"),
        ));
    }
    let mut log = vec![0u8; len as usize];
    src.read_exact_at(off, &mut log)
        .map_err(|e| Error::io(file, region, off, e))?;

    let mut valid: HashMap<u64, Entry> = HashMap::new();
    let mut budget = MAX_CHECKED_LOG_LENGTHS * len;
    let mut pos = 0;
    while pos < len {
        if &log[pos as usize..pos as usize + 4] == LOG_ENTRY_SIGNATURE {
            match parse_entry(&log, pos, &header.log_guid, &mut budget, false) {
                Ok(e) => {
                    valid.insert(pos, e);
                }
                Err(Invalid::Entry(why)) => {
                    tracing::debug!(file, log_pos = pos, why, "ignoring invalid log entry");
                }
                Err(Invalid::Budget) => {
                    return Err(Error::corrupt(
                        file,
                        region,
                        off + pos,
                        format!(
                            "its entry headers claim more than {MAX_CHECKED_LOG_LENGTHS} times \
                             the log's {len} bytes; refusing to check them all"
                        ),
                    ));
                }
            }
        }
        pos += LOG_SECTOR;
    }
    if valid.is_empty() {
        return Ok(None);
    }

    // The active sequence is the one ending in the valid entry with the
    // largest sequence number whose chain from its Tail is complete.
    let mut heads: Vec<&Entry> = valid.values().collect();
    heads.sort_by_key(|e| std::cmp::Reverse(e.seq));
    let mut active: Option<Vec<&Entry>> = None;
    for head in &heads {
        let mut chain = Vec::new();
        let mut p = head.tail;
        let mut walked = 0u64;
        let complete = loop {
            let Some(e) = valid.get(&p) else { break false };
            if let Some(prev) = chain.last().map(|x: &&Entry| x.seq) {
                if e.seq != prev + 1 {
                    break false;
                }
            }
            chain.push(e);
            walked += e.length;
            if walked > len {
                break false;
            }
            if e.pos == head.pos {
                break true;
            }
            p = (p + e.length) % len;
        };
        if complete {
            active = Some(chain);
            break;
        }
    }
    let Some(seq) = active else {
        return Err(Error::corrupt(
            file,
            "log",
            off,
            format!(
                "{} valid log entries carry LogGuid {}, but none ends a complete sequence (§2.3.3); refusing to guess",
                valid.len(),
                header.log_guid
            ),
        ));
    };

    let head = seq[seq.len() - 1];
    let max_flushed = seq.iter().map(|e| e.flushed_file_offset).max().unwrap_or(0);
    if max_flushed > physical_len {
        let e = seq
            .iter()
            .find(|e| e.flushed_file_offset == max_flushed)
            .unwrap_or(&head);
        return Err(Error::corrupt(
            file,
            format!("log entry {} (log offset {})", e.seq, e.pos),
            off + e.pos,
            format!(
                "FlushedFileOffset {max_flushed} exceeds the file size {physical_len}: the file was truncated"
            ),
        ));
    }
    let limit = seq
        .iter()
        .map(|e| e.last_file_offset)
        .max()
        .unwrap_or(0)
        .max(physical_len);
    let mut overlay = BTreeMap::new();
    let mut touched = 0u64;
    // The chain's lengths add up to at most the log's (checked as it was walked).
    let mut chain_budget = len;
    for e in &seq {
        let where_ = format!("log entry {} (log offset {})", e.seq, e.pos);
        let descs = match parse_entry(&log, e.pos, &header.log_guid, &mut chain_budget, true) {
            Ok(full) => full.descs,
            Err(Invalid::Entry(why)) => {
                return Err(Error::corrupt(file, &where_, off + e.pos, why))
            }
            Err(Invalid::Budget) => {
                return Err(Error::corrupt(
                    file,
                    &where_,
                    off + e.pos,
                    "the active sequence is longer than the log",
                ))
            }
        };
        for (i, d) in descs.iter().enumerate() {
            let (fo, l) = match d {
                Desc::Data { file_offset, .. } => (*file_offset, LOG_SECTOR),
                Desc::Zero {
                    file_offset,
                    length,
                } => (*file_offset, *length),
            };
            if fo < REGION_TABLE_OFFSETS[0] {
                return Err(Error::corrupt(
                    file,
                    &where_,
                    off + e.pos,
                    format!("descriptor {i} writes file offset {fo}, inside the file identifier or headers"),
                ));
            }
            if fo.checked_add(l).is_none_or(|end| end > limit) {
                return Err(Error::corrupt(
                    file,
                    &where_,
                    off + e.pos,
                    format!("descriptor {i} writes {l} bytes at {fo}, past LastFileOffset/file size {limit}"),
                ));
            }
            touched += l / LOG_SECTOR;
            if touched > MAX_OVERLAY_SECTORS {
                return Err(Error::unsupported(
                    file,
                    &where_,
                    off + e.pos,
                    "log replay touches more than 4 GiB",
                ));
            }
            match d {
                Desc::Data {
                    file_offset,
                    sector,
                } => {
                    overlay.insert(*file_offset, Sector::Data(sector.clone()));
                }
                Desc::Zero {
                    file_offset,
                    length,
                } => {
                    let mut s = *file_offset;
                    while s < file_offset + length {
                        overlay.insert(s, Sector::Zero);
                        s += LOG_SECTOR;
                    }
                }
            }
        }
    }
    tracing::info!(
        file,
        entries = seq.len(),
        first = seq[0].seq,
        last = head.seq,
        "replayed VHDX log in memory"
    );
    Ok(Some(Replay {
        overlay,
        entries: seq.len(),
        first_sequence: seq[0].seq,
        last_sequence: head.seq,
        logical_len: limit,
    }))
}
