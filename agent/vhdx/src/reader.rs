//! Read-only VHDX access: open (headers, log replay, regions, metadata, BAT,
//! parent chain) and reads of the virtual disk.

use std::fs::File;
use std::ops::Range;

use crate::ranges::merge;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::Error;
use super::format::*;
use super::guid::Guid;
use super::log;
use super::parent::{self, ParentLocator};
use super::source::{FileView, ReadAt};

/// How to open a VHDX file and find the parents of a differencing disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct VhdxOpenOptions {
    /// Rewrites of parent paths recorded in locators: a path starting with
    /// `from` (case-insensitive, `\` or `/`, `\\?\` ignored) is looked up
    /// under `to` instead. For disks moved from the Hyper-V host.
    pub parent_path_map: Vec<(String, PathBuf)>,
    /// Directories searched for the parent's file name when the recorded
    /// paths do not lead to it.
    pub parent_search_dirs: Vec<PathBuf>,
    /// Longest parent chain accepted (the child counts as 1).
    pub max_chain_depth: usize,
}

impl Default for VhdxOpenOptions {
    fn default() -> Self {
        VhdxOpenOptions {
            parent_path_map: Vec::new(),
            parent_search_dirs: Vec::new(),
            max_chain_depth: 64,
        }
    }
}

impl VhdxOpenOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn map_parent_path(mut self, from: impl Into<String>, to: impl Into<PathBuf>) -> Self {
        self.parent_path_map.push((from.into(), to.into()));
        self
    }
    pub fn parent_search_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.parent_search_dirs.push(dir.into());
        self
    }
}

/// Counts of BAT entries by state.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BatStats {
    pub payload_blocks: u64,
    pub not_present: u64,
    pub undefined: u64,
    pub zero: u64,
    pub unmapped: u64,
    pub fully_present: u64,
    pub partially_present: u64,
    pub sector_bitmaps_present: u64,
}

/// One region table entry.
#[derive(Clone, Debug, Serialize)]
pub struct RegionInfo {
    pub name: String,
    pub guid: String,
    pub file_offset: u64,
    pub length: u64,
    pub required: bool,
}

/// The log as found at open.
#[derive(Clone, Debug, Serialize)]
pub struct LogInfo {
    pub log_guid: String,
    pub offset: u64,
    pub length: u64,
    /// Whether a pending log was replayed (in memory).
    pub replayed: bool,
    pub entries_replayed: usize,
    /// First and last sequence number replayed.
    pub sequence_range: Option<(u64, u64)>,
}

/// What `VhdxDisk::info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VhdxInfo {
    pub path: String,
    pub file_size: u64,
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub chunk_ratio: u64,
    pub disk_id: String,
    pub data_write_guid: String,
    pub file_write_guid: String,
    /// 1 or 2: which header is current, and its sequence number.
    pub current_header: usize,
    pub header_sequence: u64,
    pub has_parent: bool,
    /// Parents, nearest first.
    pub parent_chain: Vec<String>,
    pub leave_block_allocated: bool,
    pub bat: BatStats,
    pub log: LogInfo,
    pub regions: Vec<RegionInfo>,
}

/// One file of a chain.
pub(crate) struct Layer {
    name: String,
    path: Option<PathBuf>,
    view: FileView,
    header: Header,
    header_index: usize,
    virtual_size: u64,
    block_size: u32,
    lss: u32,
    pss: u32,
    chunk_ratio: u64,
    has_parent: bool,
    leave_block_allocated: bool,
    disk_id: Guid,
    bat: Vec<u64>,
    stats: BatStats,
    regions: Vec<RegionEntry>,
    log: LogInfo,
    locator: Option<ParentLocator>,
}

/// A VHDX disk opened read-only, its log replayed in memory and its parent
/// chain resolved. `read_at` may be called from many threads at once.
pub struct VhdxDisk {
    layers: Vec<Layer>,
}

impl std::fmt::Debug for VhdxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxDisk")
            .field("path", &self.layers[0].name)
            .field("virtual_size", &self.layers[0].virtual_size)
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn region_name(g: &Guid) -> &'static str {
    if *g == BAT_REGION {
        "BAT"
    } else if *g == METADATA_REGION {
        "metadata"
    } else {
        "unknown"
    }
}

fn read_struct(
    view: &FileView,
    name: &str,
    what: &str,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    let mut b = vec![0u8; len];
    view.read_exact_at(off, &mut b)
        .map_err(|e| Error::io(name, what, off, e))?;
    Ok(b)
}

/// Opens one file without resolving its parent.
fn open_layer(name: &str, path: Option<PathBuf>, src: Arc<dyn ReadAt>) -> Result<Layer, Error> {
    let physical_len = src.size().map_err(|e| Error::io(name, "file", 0, e))?;
    let min_len = REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE as u64;
    if physical_len < min_len {
        return Err(Error::corrupt(
            name,
            "file",
            0,
            format!("file is {physical_len} bytes, too short for the VHDX header section ({min_len} bytes)"),
        ));
    }
    let mut view = FileView::new(src, physical_len);

    // §2.2.1 file type identifier.
    let id = read_struct(&view, name, "file type identifier", 0, 8)?;
    if id != FILE_ID_SIGNATURE {
        return Err(Error::corrupt(
            name,
            "file type identifier",
            0,
            format!("signature {:02x?} is not \"vhdxfile\"", &id[..]),
        ));
    }

    // §2.2.2 headers: the valid one with the larger sequence number.
    let mut parsed = Vec::new();
    let mut raw = Vec::new();
    for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
        let b = read_struct(
            &view,
            name,
            &format!("VHDX header {}", i + 1),
            off,
            HEADER_SIZE,
        )?;
        parsed.push(Header::parse(&b));
        raw.push(b);
    }
    let (header_index, header) = match (&parsed[0], &parsed[1]) {
        (Err(a), Err(b)) => {
            return Err(Error::corrupt(
                name,
                "VHDX headers",
                HEADER_OFFSETS[0],
                format!(
                    "no valid header: header 1 at offset {}: {a}; header 2 at offset {}: {b}",
                    HEADER_OFFSETS[0], HEADER_OFFSETS[1]
                ),
            ))
        }
        (Ok(h), Err(why)) => {
            tracing::warn!(file = name, why, "VHDX header 2 invalid, using header 1");
            (0, h.clone())
        }
        (Err(why), Ok(h)) => {
            tracing::warn!(file = name, why, "VHDX header 1 invalid, using header 2");
            (1, h.clone())
        }
        (Ok(a), Ok(b)) => {
            if a.sequence_number > b.sequence_number {
                (0, a.clone())
            } else if b.sequence_number > a.sequence_number {
                (1, b.clone())
            } else if raw[0] == raw[1] {
                (0, a.clone())
            } else {
                return Err(Error::corrupt(
                    name,
                    "VHDX headers",
                    HEADER_OFFSETS[0],
                    format!(
                        "headers 1 and 2 are both valid with sequence number {} but differ; no header is current",
                        a.sequence_number
                    ),
                ));
            }
        }
    };
    let hname = format!("VHDX header {}", header_index + 1);
    if header.version != 1 {
        return Err(Error::unsupported(
            name,
            &hname,
            HEADER_OFFSETS[header_index],
            format!("Version {} (only 1 is defined)", header.version),
        ));
    }

    // §2.3.3 log replay, into the view.
    let replay = log::replay(name, view.source().as_ref(), physical_len, &header)?;
    let log_info = LogInfo {
        log_guid: header.log_guid.to_string(),
        offset: header.log_offset,
        length: header.log_length as u64,
        replayed: replay.is_some(),
        entries_replayed: replay.as_ref().map_or(0, |r| r.entries),
        sequence_range: replay.as_ref().map(|r| (r.first_sequence, r.last_sequence)),
    };
    if let Some(r) = replay {
        view.set_overlay(r.overlay, r.logical_len);
    }
    let file_len = view.len();

    // §2.2.3 region tables: the first valid copy.
    let mut why = Vec::new();
    let mut table = None;
    for (i, &off) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let b = read_struct(
            &view,
            name,
            &format!("region table {}", i + 1),
            off,
            REGION_TABLE_SIZE,
        )?;
        match parse_region_table(&b) {
            Ok(t) => {
                table = Some((i, off, t));
                break;
            }
            Err(w) => why.push(format!("region table {} at offset {off}: {w}", i + 1)),
        }
    }
    let Some((ti, toff, regions)) = table else {
        return Err(Error::corrupt(
            name,
            "region tables",
            REGION_TABLE_OFFSETS[0],
            format!("no valid region table: {}", why.join("; ")),
        ));
    };
    if ti == 1 {
        tracing::warn!(file = name, why = why.join("; "), "using region table 2");
    }
    let mut bat_region: Option<(u64, u64)> = None;
    let mut md_region: Option<(u64, u64)> = None;
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    if !header.log_guid.is_zero() || header.log_length != 0 {
        spans.push((header.log_offset, header.log_length as u64, "log".into()));
    }
    for (i, r) in regions.iter().enumerate() {
        let what = format!(
            "region table {} entry {i} ({} region)",
            ti + 1,
            region_name(&r.guid)
        );
        let at = toff + 16 + i as u64 * 32;
        let known = r.guid == BAT_REGION || r.guid == METADATA_REGION;
        if !known {
            if r.required {
                return Err(Error::unsupported(
                    name,
                    what,
                    at,
                    format!("unknown required region {}", r.guid),
                ));
            }
            continue;
        }
        let len = r.length as u64;
        if r.file_offset < HEADER_SECTION_SIZE
            || r.file_offset % MIB != 0
            || len == 0
            || len % MIB != 0
        {
            return Err(Error::corrupt(
                name,
                what,
                at,
                format!(
                    "region at {} length {len} is not 1 MiB aligned past the header section",
                    r.file_offset
                ),
            ));
        }
        if r.file_offset.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(
                name,
                what,
                at,
                format!(
                    "region [{}, {}) extends past the end of the {file_len}-byte file",
                    r.file_offset,
                    r.file_offset.saturating_add(len)
                ),
            ));
        }
        let slot = if r.guid == BAT_REGION {
            &mut bat_region
        } else {
            &mut md_region
        };
        if slot.is_some() {
            return Err(Error::corrupt(name, what, at, "region listed twice"));
        }
        *slot = Some((r.file_offset, len));
        spans.push((
            r.file_offset,
            len,
            format!("{} region", region_name(&r.guid)),
        ));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[0].0.saturating_add(w[0].1) > w[1].0 {
            return Err(Error::corrupt(
                name,
                format!("region table {}", ti + 1),
                toff,
                format!(
                    "{} [{}, {}) overlaps {} [{}, {})",
                    w[0].2,
                    w[0].0,
                    w[0].0.saturating_add(w[0].1),
                    w[1].2,
                    w[1].0,
                    w[1].0 + w[1].1
                ),
            ));
        }
    }
    let Some((bat_off, bat_len)) = bat_region else {
        return Err(Error::corrupt(
            name,
            format!("region table {}", ti + 1),
            toff,
            "no BAT region",
        ));
    };
    let Some((md_off, md_len)) = md_region else {
        return Err(Error::corrupt(
            name,
            format!("region table {}", ti + 1),
            toff,
            "no metadata region",
        ));
    };

    // §2.6.1 metadata table; items in any order.
    let t = read_struct(&view, name, "metadata table", md_off, METADATA_TABLE_SIZE)?;
    if &t[0..8] != METADATA_SIGNATURE {
        return Err(Error::corrupt(
            name,
            "metadata table",
            md_off,
            "signature is not \"metadata\"",
        ));
    }
    let count = le_u16(&t, 10);
    if count > METADATA_MAX_ENTRIES {
        return Err(Error::corrupt(
            name,
            "metadata table",
            md_off,
            format!("entry count {count} exceeds the maximum {METADATA_MAX_ENTRIES}"),
        ));
    }
    let mut items: Vec<(MetadataEntry, u64)> = Vec::new();
    for i in 0..count as usize {
        let e = &t[32 + i * 32..64 + i * 32];
        let me = MetadataEntry {
            item_id: Guid::from_bytes(&e[0..16]),
            offset: le_u32(e, 16),
            length: le_u32(e, 20),
            flags: le_u32(e, 24),
        };
        let at = md_off + 32 + i as u64 * 32;
        let what = format!("metadata table entry {i} (item {})", me.item_id);
        if items.iter().any(|(x, _)| {
            x.item_id == me.item_id && x.flags & MD_FLAG_IS_USER == me.flags & MD_FLAG_IS_USER
        }) {
            return Err(Error::corrupt(name, what, at, "item listed twice"));
        }
        if me.length > 0 {
            let end = me.offset as u64 + me.length as u64;
            if (me.offset as u64) < METADATA_TABLE_SIZE as u64 || end > md_len {
                return Err(Error::corrupt(
                    name,
                    what,
                    at,
                    format!(
                        "item [{}, {end}) lies outside the metadata region's item area [65536, {md_len})",
                        me.offset
                    ),
                ));
            }
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if (me.flags & MD_FLAG_IS_USER != 0 || !known.contains(&me.item_id))
            && me.flags & MD_FLAG_IS_REQUIRED != 0
        {
            return Err(Error::unsupported(
                name,
                what,
                at,
                "unknown required metadata item",
            ));
        }
        items.push((me, at));
    }
    let item = |id: Guid, label: &str, min: u32| -> Result<Option<(Vec<u8>, u64)>, Error> {
        let Some((e, at)) = items
            .iter()
            .find(|(e, _)| e.item_id == id && e.flags & MD_FLAG_IS_USER == 0)
        else {
            return Ok(None);
        };
        if e.length < min {
            return Err(Error::corrupt(
                name,
                format!("{label} metadata item"),
                *at,
                format!("length {} is shorter than {min}", e.length),
            ));
        }
        // Only what the reader uses is read: a fixed-size item's first `min` bytes, and at most
        // MAX_LOCATOR_LEN of a parent locator. A hostile table could otherwise make each of
        // five items gigabytes long and have them all read into memory.
        let len = if label == "Parent Locator" {
            if e.length > MAX_LOCATOR_LEN {
                return Err(Error::corrupt(
                    name,
                    format!("{label} metadata item"),
                    *at,
                    format!("length {} is longer than {MAX_LOCATOR_LEN}", e.length),
                ));
            }
            e.length
        } else {
            min
        };
        let off = md_off + e.offset as u64;
        Ok(Some((
            read_struct(
                &view,
                name,
                &format!("{label} metadata item"),
                off,
                len as usize,
            )?,
            off,
        )))
    };
    let need = |v: Option<(Vec<u8>, u64)>, label: &str| -> Result<(Vec<u8>, u64), Error> {
        v.ok_or_else(|| {
            Error::corrupt(
                name,
                "metadata table",
                md_off,
                format!("required item {label} is missing"),
            )
        })
    };
    let (fp, fp_off) = need(
        item(FILE_PARAMETERS, "File Parameters", 8)?,
        "File Parameters",
    )?;
    let (vs, vs_off) = need(
        item(VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?,
        "Virtual Disk Size",
    )?;
    let (vid, _) = need(
        item(VIRTUAL_DISK_ID, "Virtual Disk ID", 16)?,
        "Virtual Disk ID",
    )?;
    let (ls, ls_off) = need(
        item(LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4)?,
        "Logical Sector Size",
    )?;
    let (ps, ps_off) = need(
        item(PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)?,
        "Physical Sector Size",
    )?;
    let block_size = le_u32(&fp, 0);
    let fp_flags = le_u32(&fp, 4);
    let leave_block_allocated = fp_flags & 1 != 0;
    let has_parent = fp_flags & 2 != 0;
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::corrupt(
            name,
            "File Parameters metadata item",
            fp_off,
            format!("BlockSize {block_size} is not a power of two between 1 MiB and 256 MiB"),
        ));
    }
    let lss = le_u32(&ls, 0);
    if lss != 512 && lss != 4096 {
        return Err(Error::corrupt(
            name,
            "Logical Sector Size metadata item",
            ls_off,
            format!("{lss} is neither 512 nor 4096"),
        ));
    }
    let pss = le_u32(&ps, 0);
    if pss != 512 && pss != 4096 {
        return Err(Error::corrupt(
            name,
            "Physical Sector Size metadata item",
            ps_off,
            format!("{pss} is neither 512 nor 4096"),
        ));
    }
    let virtual_size = le_u64(&vs, 0);
    if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || virtual_size % lss as u64 != 0 {
        return Err(Error::corrupt(
            name,
            "Virtual Disk Size metadata item",
            vs_off,
            format!("VirtualDiskSize {virtual_size} is not a non-zero multiple of the {lss}-byte sector up to 64 TiB"),
        ));
    }
    let disk_id = Guid::from_bytes(&vid);
    let locator = if has_parent {
        let (pl, pl_off) = need(
            item(PARENT_LOCATOR, "Parent Locator", 20)?,
            "Parent Locator (HasParent is set)",
        )?;
        Some(parent::parse_locator(name, &pl, pl_off)?)
    } else {
        None
    };

    // §2.5 BAT.
    let cr = chunk_ratio(lss, block_size);
    let entries = bat_entry_count(virtual_size, block_size, cr, has_parent);
    if entries * 8 > bat_len {
        return Err(Error::corrupt(
            name,
            "BAT region",
            bat_off,
            format!(
                "region of {bat_len} bytes holds {} entries, the disk needs {entries}",
                bat_len / 8
            ),
        ));
    }
    let raw_bat = read_struct(&view, name, "BAT region", bat_off, (entries * 8) as usize)?;
    let bat: Vec<u64> = raw_bat.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
    let data_blocks = virtual_size.div_ceil(block_size as u64);
    let mut stats = BatStats {
        payload_blocks: data_blocks,
        ..Default::default()
    };
    let bat_what = |idx: u64| format!("BAT entry {idx}");
    let reserved: Vec<(u64, u64, &str)> = {
        let mut v = vec![
            (0, HEADER_SECTION_SIZE, "the header section"),
            (bat_off, bat_len, "the BAT region"),
            (md_off, md_len, "the metadata region"),
        ];
        if header.log_length != 0 {
            v.push((header.log_offset, header.log_length as u64, "the log"));
        }
        v
    };
    let mut allocated: Vec<(u64, u64, u64)> = Vec::new();
    let mut check_space = |idx: u64, fo: u64, need: u64, what: &str| -> Result<(), Error> {
        if fo.checked_add(need).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(
                name,
                bat_what(idx),
                bat_off + idx * 8,
                format!("{what} at file offset {fo} (+{need} bytes) points past end of file ({file_len} bytes)"),
            ));
        }
        for (ro, rl, rn) in &reserved {
            if fo < ro.saturating_add(*rl) && *ro < fo + need {
                return Err(Error::corrupt(
                    name,
                    bat_what(idx),
                    bat_off + idx * 8,
                    format!("{what} at file offset {fo} overlaps {rn}"),
                ));
            }
        }
        allocated.push((fo, need, idx));
        Ok(())
    };
    for c in 0..data_blocks.div_ceil(cr) {
        if !has_parent {
            break;
        }
        let idx = bitmap_bat_index(c, cr);
        let e = bat[idx as usize];
        match (e & BAT_STATE_MASK) as u8 {
            SB_BLOCK_NOT_PRESENT => {}
            SB_BLOCK_PRESENT => {
                stats.sector_bitmaps_present += 1;
                let sectors = ((virtual_size / lss as u64) - c * SECTORS_PER_BITMAP_BLOCK)
                    .min(SECTORS_PER_BITMAP_BLOCK);
                check_space(
                    idx,
                    e & BAT_OFFSET_MASK,
                    sectors.div_ceil(8),
                    "sector bitmap block",
                )?;
            }
            s => {
                return Err(Error::corrupt(
                    name,
                    bat_what(idx),
                    bat_off + idx * 8,
                    format!("invalid sector bitmap state {s}"),
                ));
            }
        }
    }
    for i in 0..data_blocks {
        let idx = payload_bat_index(i, cr);
        let e = bat[idx as usize];
        let state = (e & BAT_STATE_MASK) as u8;
        let need = (block_size as u64).min(virtual_size - i * block_size as u64);
        match state {
            PAYLOAD_BLOCK_NOT_PRESENT => stats.not_present += 1,
            PAYLOAD_BLOCK_UNDEFINED => stats.undefined += 1,
            PAYLOAD_BLOCK_ZERO => stats.zero += 1,
            PAYLOAD_BLOCK_UNMAPPED | PAYLOAD_BLOCK_UNMAPPED_V095 => stats.unmapped += 1,
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                stats.fully_present += 1;
                check_space(idx, e & BAT_OFFSET_MASK, need, "payload block")?;
            }
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                if !has_parent {
                    return Err(Error::corrupt(
                        name,
                        bat_what(idx),
                        bat_off + idx * 8,
                        "PARTIALLY_PRESENT in a disk without parent (§2.5.1.1)",
                    ));
                }
                let sb = bitmap_bat_index(i / cr, cr);
                if (bat[sb as usize] & BAT_STATE_MASK) as u8 != SB_BLOCK_PRESENT {
                    return Err(Error::corrupt(
                        name,
                        bat_what(idx),
                        bat_off + idx * 8,
                        format!("PARTIALLY_PRESENT but the sector bitmap entry {sb} is not present (§2.5.1.2)"),
                    ));
                }
                stats.partially_present += 1;
                check_space(idx, e & BAT_OFFSET_MASK, need, "payload block")?;
            }
            s => {
                return Err(Error::corrupt(
                    name,
                    bat_what(idx),
                    bat_off + idx * 8,
                    format!("reserved payload block state {s}"),
                ));
            }
        }
    }
    allocated.sort();
    for w in allocated.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(Error::corrupt(
                name,
                bat_what(w[1].2),
                bat_off + w[1].2 * 8,
                format!(
                    "block at file offset {} overlaps the block of BAT entry {} at {}",
                    w[1].0, w[0].2, w[0].0
                ),
            ));
        }
    }

    Ok(Layer {
        name: name.to_string(),
        path,
        view,
        header,
        header_index,
        virtual_size,
        block_size,
        lss,
        pss,
        chunk_ratio: cr,
        has_parent,
        leave_block_allocated,
        disk_id,
        bat,
        stats,
        regions,
        log: log_info,
        locator,
    })
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn open_chain(
    path: &Path,
    opts: &VhdxOpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Vec<Layer>, Error> {
    let name = display(path);
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if chain.contains(&canon) {
        return Err(Error::ParentChain {
            child: display(chain.last().map(|p| p.as_path()).unwrap_or(path)),
            reason: format!(
                "loop: {} is already in the chain {:?}",
                canon.display(),
                chain
            ),
        });
    }
    if chain.len() >= opts.max_chain_depth.max(1) {
        return Err(Error::ParentChain {
            child: name,
            reason: format!("chain deeper than {} files", opts.max_chain_depth),
        });
    }
    let file = File::open(path).map_err(|e| Error::io(&name, "file", 0, e))?;
    let layer = open_layer(&name, Some(path.to_path_buf()), Arc::new(file))?;
    chain.push(canon);
    let r = attach_parent(layer, opts, chain);
    chain.pop();
    r
}

fn attach_parent(
    layer: Layer,
    opts: &VhdxOpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Vec<Layer>, Error> {
    let Some(loc) = layer.locator.clone() else {
        return Ok(vec![layer]);
    };
    let linkages = loc.linkages();
    let linkage_text = loc.get("parent_linkage").unwrap_or_default().to_string();
    let cands = parent::candidates(
        layer.path.as_deref(),
        &loc,
        &opts.parent_path_map,
        &opts.parent_search_dirs,
    );
    let mut mismatch: Option<Error> = None;
    let mut failure: Option<Error> = None;
    for c in &cands {
        if !c.is_file() {
            continue;
        }
        match open_chain(c, opts, chain) {
            Ok(parent_layers) => {
                let p = &parent_layers[0];
                if !linkages.contains(&p.header.data_write_guid) {
                    if mismatch.is_none() {
                        mismatch = Some(Error::ParentMismatch {
                            child: layer.name.clone(),
                            parent: c.clone(),
                            expected: linkage_text.clone(),
                            found: p.header.data_write_guid.to_string(),
                        });
                    }
                    continue;
                }
                if p.virtual_size != layer.virtual_size || p.lss != layer.lss {
                    return Err(Error::ParentChain {
                        child: layer.name.clone(),
                        reason: format!(
                            "parent {} has virtual size {} / sector size {}, the child {} / {}",
                            p.name, p.virtual_size, p.lss, layer.virtual_size, layer.lss
                        ),
                    });
                }
                let mut v = vec![layer];
                v.extend(parent_layers);
                return Ok(v);
            }
            Err(e @ Error::ParentChain { .. }) => return Err(e),
            Err(e) => {
                if failure.is_none() {
                    failure = Some(e);
                }
            }
        }
    }
    if let Some(e) = mismatch.or(failure) {
        return Err(e);
    }
    Err(Error::ParentNotFound {
        child: layer.name.clone(),
        linkage: linkage_text,
        tried: cands,
    })
}

fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].start.max(b[j].start);
        let e = a[i].end.min(b[j].end);
        if s < e {
            out.push(s..e);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl Layer {
    fn state(&self, block: u64) -> (u8, u64) {
        let e = self.bat[payload_bat_index(block, self.chunk_ratio) as usize];
        ((e & BAT_STATE_MASK) as u8, e & BAT_OFFSET_MASK)
    }

    fn io_err(&self, what: String, off: u64, e: std::io::Error) -> Error {
        Error::io(&self.name, what, off, e)
    }
}

fn read_layers(layers: &[Layer], level: usize, pos: u64, buf: &mut [u8]) -> Result<(), Error> {
    let Some(l) = layers.get(level) else {
        buf.fill(0);
        return Ok(());
    };
    let bs = l.block_size as u64;
    let len = buf.len() as u64;
    let mut done = 0u64;
    while done < len {
        let p = pos + done;
        let blk = p / bs;
        let inb = p % bs;
        let n = (bs - inb).min(len - done);
        let (state, fo) = l.state(blk);
        match state {
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                // Coalesce following blocks laid out contiguously in the file.
                let mut run = n;
                let mut next = blk + 1;
                while done + run < len {
                    let (s2, fo2) = l.state(next);
                    if s2 != PAYLOAD_BLOCK_FULLY_PRESENT || fo2 != fo + (next - blk) * bs {
                        break;
                    }
                    run += bs.min(len - done - run);
                    next += 1;
                }
                let dst = &mut buf[done as usize..(done + run) as usize];
                l.view
                    .read_exact_at(fo + inb, dst)
                    .map_err(|e| l.io_err(format!("payload block {blk}"), fo + inb, e))?;
                done += run;
                continue;
            }
            PAYLOAD_BLOCK_NOT_PRESENT if l.has_parent => {
                read_layers(
                    layers,
                    level + 1,
                    p,
                    &mut buf[done as usize..(done + n) as usize],
                )?;
            }
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                read_partial(
                    layers,
                    level,
                    p,
                    fo,
                    &mut buf[done as usize..(done + n) as usize],
                )?;
            }
            _ => buf[done as usize..(done + n) as usize].fill(0),
        }
        done += n;
    }
    Ok(())
}

/// Reads a piece of one PARTIALLY_PRESENT block: sectors whose bitmap bit is
/// set come from this file, the others from the parent (§2.4).
fn read_partial(
    layers: &[Layer],
    level: usize,
    pos: u64,
    block_fo: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    let l = &layers[level];
    let lss = l.lss as u64;
    let bs = l.block_size as u64;
    let end = pos + buf.len() as u64;
    let s0 = pos / lss;
    let s1 = (end - 1) / lss;
    let chunk = s0 / SECTORS_PER_BITMAP_BLOCK;
    let sb_idx = bitmap_bat_index(chunk, l.chunk_ratio);
    let sb_fo = l.bat[sb_idx as usize] & BAT_OFFSET_MASK;
    let bit0 = s0 % SECTORS_PER_BITMAP_BLOCK;
    let byte0 = bit0 / 8;
    let byte1 = (s1 % SECTORS_PER_BITMAP_BLOCK) / 8;
    let mut bits = vec![0u8; (byte1 - byte0 + 1) as usize];
    l.view
        .read_exact_at(sb_fo + byte0, &mut bits)
        .map_err(|e| l.io_err(format!("sector bitmap block {chunk}"), sb_fo + byte0, e))?;
    let bit = |s: u64| {
        let rel = (s % SECTORS_PER_BITMAP_BLOCK) - byte0 * 8;
        bits[(rel / 8) as usize] >> (rel % 8) & 1 == 1
    };
    let block_start = (pos / bs) * bs;
    let mut s = s0;
    while s <= s1 {
        let present = bit(s);
        let mut e = s + 1;
        while e <= s1 && bit(e) == present {
            e += 1;
        }
        let a = (s * lss).max(pos);
        let b = (e * lss).min(end);
        let dst = &mut buf[(a - pos) as usize..(b - pos) as usize];
        if present {
            let fo = block_fo + (a - block_start);
            l.view
                .read_exact_at(fo, dst)
                .map_err(|er| l.io_err(format!("payload block {}", pos / bs), fo, er))?;
        } else {
            read_layers(layers, level + 1, a, dst)?;
        }
        s = e;
    }
    Ok(())
}

fn allocated(layers: &[Layer], level: usize) -> Vec<Range<u64>> {
    let Some(l) = layers.get(level) else {
        return Vec::new();
    };
    let bs = l.block_size as u64;
    let blocks = l.virtual_size.div_ceil(bs);
    let mut own = Vec::new();
    let mut through = Vec::new();
    for b in 0..blocks {
        let r = b * bs..((b + 1) * bs).min(l.virtual_size);
        match l.state(b).0 {
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT => own.push(r),
            PAYLOAD_BLOCK_NOT_PRESENT if l.has_parent => through.push(r),
            _ => {}
        }
    }
    let through = merge(through);
    if !through.is_empty() {
        let parent = allocated(layers, level + 1);
        own.extend(intersect(&parent, &through));
    }
    merge(own)
}

impl VhdxDisk {
    /// Opens `path` read-only, replays a pending log in memory and resolves
    /// the parent chain of a differencing disk.
    pub fn open(path: &Path, opts: &VhdxOpenOptions) -> Result<Self, Error> {
        let mut chain = Vec::new();
        let layers = open_chain(path, opts, &mut chain)?;
        Ok(VhdxDisk { layers })
    }

    /// Opens a disk from any byte source (memory, for tests and fuzzing).
    /// A differencing disk is resolved only through absolute paths and the
    /// options' search dirs and path map.
    pub fn open_source(
        src: Arc<dyn ReadAt>,
        name: &str,
        opts: &VhdxOpenOptions,
    ) -> Result<Self, Error> {
        let layer = open_layer(name, None, src)?;
        let mut chain = Vec::new();
        Ok(VhdxDisk {
            layers: attach_parent(layer, opts, &mut chain)?,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size
    }
    pub fn logical_sector_size(&self) -> u32 {
        self.layers[0].lss
    }
    pub fn physical_sector_size(&self) -> u32 {
        self.layers[0].pss
    }
    pub fn block_size(&self) -> u32 {
        self.layers[0].block_size
    }
    pub fn has_parent(&self) -> bool {
        self.layers[0].has_parent
    }
    /// The disk's VirtualDiskId.
    pub fn disk_id(&self) -> Guid {
        self.layers[0].disk_id
    }
    /// DataWriteGuid of the current header (what a child's parent_linkage names).
    pub fn data_write_guid(&self) -> Guid {
        self.layers[0].header.data_write_guid
    }
    /// Paths of the parents, nearest first.
    pub fn parent_chain(&self) -> Vec<PathBuf> {
        self.layers[1..]
            .iter()
            .map(|l| l.path.clone().unwrap_or_else(|| PathBuf::from(&l.name)))
            .collect()
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`. Reads past the
    /// end are an error. Safe to call from many threads at once.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Error::OutOfRange {
                file: self.layers[0].name.clone(),
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        read_layers(&self.layers, 0, offset, buf)
    }

    /// Sorted, merged byte ranges of the virtual disk that may hold non-zero
    /// data; everything outside reads as zeros.
    pub fn allocated_ranges(&self) -> Vec<Range<u64>> {
        allocated(&self.layers, 0)
    }

    pub fn info(&self) -> VhdxInfo {
        let l = &self.layers[0];
        VhdxInfo {
            path: l.name.clone(),
            file_size: l.view.physical_len(),
            virtual_size: l.virtual_size,
            block_size: l.block_size,
            logical_sector_size: l.lss,
            physical_sector_size: l.pss,
            chunk_ratio: l.chunk_ratio,
            disk_id: l.disk_id.to_string(),
            data_write_guid: l.header.data_write_guid.to_string(),
            file_write_guid: l.header.file_write_guid.to_string(),
            current_header: l.header_index + 1,
            header_sequence: l.header.sequence_number,
            has_parent: l.has_parent,
            parent_chain: self.layers[1..].iter().map(|p| p.name.clone()).collect(),
            leave_block_allocated: l.leave_block_allocated,
            bat: l.stats.clone(),
            log: l.log.clone(),
            regions: l
                .regions
                .iter()
                .map(|r| RegionInfo {
                    name: region_name(&r.guid).to_string(),
                    guid: r.guid.to_string(),
                    file_offset: r.file_offset,
                    length: r.length as u64,
                    required: r.required,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn range_algebra() {
        assert_eq!(
            merge(vec![5..7, 0..2, 2..3, 6..9, 10..10]),
            vec![0..3, 5..9]
        );
        assert_eq!(intersect(&[0..10, 20..30], &[5..25]), vec![5..10, 20..25]);
        assert_eq!(intersect(&[0..10], &[]), Vec::<Range<u64>>::new());
    }
}
