//! Streams a virtual disk out as a dynamic VHDX.
//!
//! Layout (all offsets 1 MiB aligned, MS-VHDX §2.1):
//! `0` file identifier, headers and region tables; `1 MiB` an empty 1 MiB
//! log; `2 MiB` metadata region (1 MiB); `3 MiB` BAT region; then payload
//! blocks, appended in the order they are first written with non-zero data.
//! Blocks never written (or written only with zeros) stay NOT_PRESENT.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::Error;
use super::format::*;
use super::guid::Guid;
use super::staged::{StagedWrites, DIRECT_ALIGN};

const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
/// Granularity of zero detection inside allocated blocks.
const GRAIN: u64 = 64 * KIB;

/// Writes a dynamic VHDX. Data may come in any order; call `finish` at the end.
pub struct VhdxWriter {
    file: File,
    path: PathBuf,
    name: String,
    virtual_size: u64,
    block_size: u32,
    lss: u32,
    chunk_ratio: u64,
    bat_length: u64,
    /// File offset of each payload block, 0 when not allocated.
    blocks: Vec<u64>,
    next_free: u64,
    /// Per block, one bit per 64 KiB grain that holds data in the file.
    /// Grains never written are holes (zeros), so zero writes there are skipped.
    dirty: Vec<Option<Box<[u64]>>>,
    disk_id: Guid,
    data_write_guid: Guid,
    finished: bool,
    /// Payload data gathered for direct writes, written on a thread of its own (`None`: the file
    /// system takes no direct writes, and payload goes through the page cache like everything
    /// else). Payload data goes out in direct writes of up to 4 MiB: on the benchmark machine a
    /// single writer reached 728 MB/s with 256 KiB direct writes, 2 GB/s with 2 MiB ones, and
    /// about 520 MB/s through the page cache (docs/BENCHMARKS.md).
    stage: Option<StagedWrites>,
}

fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.split_at(b.len() & !15);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&x| x == 0)
}

impl VhdxWriter {
    /// Creates (truncating) `path` for a disk of `virtual_size` bytes.
    pub fn create(
        path: &Path,
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
    ) -> Result<Self, Error> {
        if logical_sector_size != 512 && logical_sector_size != 4096 {
            return Err(Error::InvalidArgument(format!(
                "logical sector size {logical_sector_size} is neither 512 nor 4096"
            )));
        }
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
            )));
        }
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || virtual_size % logical_sector_size as u64 != 0
        {
            return Err(Error::InvalidArgument(format!(
                "virtual size {virtual_size} is not a non-zero multiple of {logical_sector_size} up to 64 TiB"
            )));
        }
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(&name, "file", 0, e))?;
        let stage = StagedWrites::open(path, &file);
        let cr = chunk_ratio(logical_sector_size, block_size);
        let entries = bat_entry_count(virtual_size, block_size, cr, false);
        let bat_length = (entries * 8).div_ceil(MIB).max(1) * MIB;
        let blocks = vec![0u64; virtual_size.div_ceil(block_size as u64) as usize];
        Ok(VhdxWriter {
            file,
            path: path.to_path_buf(),
            name,
            virtual_size,
            block_size,
            lss: logical_sector_size,
            chunk_ratio: cr,
            bat_length,
            blocks,
            next_free: BAT_OFFSET + bat_length,
            dirty: vec![None; virtual_size.div_ceil(block_size as u64) as usize],
            disk_id: Guid::random(),
            data_write_guid: Guid::random(),
            finished: false,
            stage,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// The VirtualDiskId the file will carry.
    pub fn disk_id(&self) -> Guid {
        self.disk_id
    }
    /// The DataWriteGuid the file will carry.
    pub fn data_write_guid(&self) -> Guid {
        self.data_write_guid
    }

    fn werr(&self, what: impl Into<String>, off: u64, e: io::Error) -> Error {
        Error::io(&self.name, what, off, e)
    }

    /// Writes `data` at virtual offset `offset`. All-zero pieces of blocks not
    /// yet allocated are skipped; overwriting earlier data is allowed.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        if self.finished {
            return Err(Error::InvalidArgument("write after finish".into()));
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(Error::OutOfRange {
                file: self.name.clone(),
                offset,
                len: data.len() as u64,
                size: self.virtual_size,
            });
        }
        let bs = self.block_size as u64;
        let mut done = 0usize;
        while done < data.len() {
            let p = offset + done as u64;
            let blk = (p / bs) as usize;
            let inb = p % bs;
            let n = ((bs - inb) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            if self.blocks[blk] == 0 {
                if is_zero(piece) {
                    done += n;
                    continue;
                }
                self.blocks[blk] = self.next_free;
                self.next_free += bs;
            }
            // Coalesce following blocks allocated contiguously in this call.
            let fo = self.blocks[blk] + inb;
            let mut run = n;
            let mut next = blk + 1;
            while done + run < data.len() && next < self.blocks.len() {
                let m = (bs as usize).min(data.len() - done - run);
                let expect = self.blocks[blk] + (next - blk) as u64 * bs;
                if self.blocks[next] == 0
                    && self.next_free == expect
                    && !is_zero(&data[done + run..done + run + m])
                {
                    self.blocks[next] = self.next_free;
                    self.next_free += bs;
                } else if self.blocks[next] != expect {
                    break;
                }
                run += m;
                next += 1;
            }
            self.write_run(offset + done as u64, fo, &data[done..done + run])?;
            done += run;
        }
        Ok(())
    }

    /// Writes `data` (virtual offset `voff`, file offset `fo`, blocks
    /// contiguous in the file) skipping all-zero pieces of grains that never
    /// held data, in as few positional writes as possible.
    fn write_run(&mut self, voff: u64, fo: u64, data: &[u8]) -> Result<(), Error> {
        let bs = self.block_size as u64;
        let grains = (bs / GRAIN) as usize;
        let mut pending: Option<(usize, usize)> = None;
        let mut i = 0usize;
        while i <= data.len() {
            let seg = if i < data.len() {
                let v = voff + i as u64;
                let n = ((GRAIN - v % GRAIN) as usize).min(data.len() - i);
                Some((v, n))
            } else {
                None
            };
            let write = match seg {
                Some((v, n)) => {
                    let blk = (v / bs) as usize;
                    let g = ((v % bs) / GRAIN) as usize;
                    let bits = self.dirty[blk]
                        .get_or_insert_with(|| vec![0u64; grains.div_ceil(64)].into_boxed_slice());
                    let was_dirty = bits[g / 64] >> (g % 64) & 1 == 1;
                    let zero = is_zero(&data[i..i + n]);
                    if !zero {
                        bits[g / 64] |= 1 << (g % 64);
                    }
                    was_dirty || !zero
                }
                None => false,
            };
            if write {
                let n = seg.map_or(0, |s| s.1);
                pending = Some(match pending {
                    Some((a, _)) => (a, i + n),
                    None => (i, i + n),
                });
            } else if let Some((a, b)) = pending.take() {
                let at = fo + a as u64;
                self.write_payload(&data[a..b], at).map_err(|e| {
                    self.werr(format!("payload block {}", (voff + a as u64) / bs), at, e)
                })?;
            }
            match seg {
                Some((_, n)) => i += n,
                None => break,
            }
        }
        Ok(())
    }

    /// Writes payload bytes at file offset `at`: gathered for a direct write when they are
    /// aligned, else (after every gathered write has ended, so none can overtake this one) through
    /// the page cache.
    fn write_payload(&mut self, data: &[u8], at: u64) -> io::Result<()> {
        let aligned =
            at.is_multiple_of(DIRECT_ALIGN as u64) && data.len().is_multiple_of(DIRECT_ALIGN);
        match self.stage.as_mut() {
            Some(stage) if aligned => stage.add(data, at).map_err(io::Error::from),
            stage => {
                if let Some(stage) = stage {
                    stage.drain().map_err(io::Error::from)?;
                }
                self.file.write_all_at(data, at)
            }
        }
    }

    /// Writes payload block `index` (the last block may be shorter).
    pub fn write_block(&mut self, index: u64, data: &[u8]) -> Result<(), Error> {
        let bs = self.block_size as u64;
        let start = index
            .checked_mul(bs)
            .filter(|s| *s < self.virtual_size)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("block {index} is past the end of the disk"))
            })?;
        let expect = bs.min(self.virtual_size - start);
        if data.len() as u64 != expect {
            return Err(Error::InvalidArgument(format!(
                "block {index} must be {expect} bytes, got {}",
                data.len()
            )));
        }
        self.write_at(start, data)
    }

    /// Writes the BAT, metadata, region tables and headers, extends the file
    /// to hold every allocated block, and fsyncs. The headers go last, so a
    /// file cut short by a crash has no valid header.
    pub fn finish(mut self) -> Result<(), Error> {
        self.finished = true;
        if let Some(mut stage) = self.stage.take() {
            stage
                .drain()
                .map_err(|f| self.werr("payload data", f.at.unwrap_or(self.next_free), f.error))?;
        }
        let cr = self.chunk_ratio;
        let entries = bat_entry_count(self.virtual_size, self.block_size, cr, false);
        let mut bat = vec![0u8; self.bat_length as usize];
        for (i, &fo) in self.blocks.iter().enumerate() {
            let idx = payload_bat_index(i as u64, cr);
            debug_assert!(idx < entries);
            let e = if fo == 0 {
                bat_entry(PAYLOAD_BLOCK_NOT_PRESENT, 0)
            } else {
                bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, fo)
            };
            put_u64(&mut bat, idx as usize * 8, e);
        }
        self.file
            .write_all_at(&bat, BAT_OFFSET)
            .map_err(|e| self.werr("BAT region", BAT_OFFSET, e))?;

        let md = metadata_region(
            self.block_size,
            self.virtual_size,
            self.disk_id,
            self.lss,
            self.lss.max(4096),
            None,
        );
        self.file
            .write_all_at(&md, METADATA_OFFSET)
            .map_err(|e| self.werr("metadata region", METADATA_OFFSET, e))?;
        let log = vec![0u8; LOG_LENGTH as usize];
        self.file
            .write_all_at(&log, LOG_OFFSET)
            .map_err(|e| self.werr("log region", LOG_OFFSET, e))?;
        self.file
            .set_len(self.next_free)
            .map_err(|e| self.werr("file", self.next_free, e))?;

        let mut head = vec![0u8; FILE_ID_SIZE];
        head[0..8].copy_from_slice(FILE_ID_SIGNATURE);
        let creator = utf16le("blockvault");
        head[8..8 + creator.len()].copy_from_slice(&creator);
        self.file
            .write_all_at(&head, 0)
            .map_err(|e| self.werr("file type identifier", 0, e))?;
        let regions = [
            RegionEntry {
                guid: BAT_REGION,
                file_offset: BAT_OFFSET,
                length: self.bat_length as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: METADATA_OFFSET,
                length: METADATA_LENGTH as u32,
                required: true,
            },
        ];
        let rt = region_table_bytes(&regions);
        for off in REGION_TABLE_OFFSETS {
            self.file
                .write_all_at(&rt, off)
                .map_err(|e| self.werr("region table", off, e))?;
        }
        self.file.sync_all().map_err(|e| self.werr("file", 0, e))?;
        let file_write_guid = Guid::random();
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let h = Header {
                sequence_number: i as u64 + 1,
                file_write_guid,
                data_write_guid: self.data_write_guid,
                log_guid: Guid::ZERO,
                log_version: 0,
                version: 1,
                log_length: LOG_LENGTH as u32,
                log_offset: LOG_OFFSET,
            };
            self.file
                .write_all_at(&h.to_bytes(), *off)
                .map_err(|e| self.werr(format!("VHDX header {}", i + 1), *off, e))?;
        }
        self.file.sync_all().map_err(|e| self.werr("file", 0, e))?;
        Ok(())
    }
}

/// A 1 MiB metadata region: table, then the items from 64 KiB on (§2.6).
pub(crate) fn metadata_region(
    block_size: u32,
    virtual_size: u64,
    disk_id: Guid,
    lss: u32,
    pss: u32,
    parent_locator: Option<&[u8]>,
) -> Vec<u8> {
    let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
    let flags = if parent_locator.is_some() { 2u32 } else { 0 };
    let mut fp = vec![0u8; 8];
    put_u32(&mut fp, 0, block_size);
    put_u32(&mut fp, 4, flags);
    items.push((FILE_PARAMETERS, fp, MD_FLAG_IS_REQUIRED));
    items.push((
        VIRTUAL_DISK_SIZE,
        virtual_size.to_le_bytes().to_vec(),
        MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
    ));
    items.push((
        VIRTUAL_DISK_ID,
        disk_id.0.to_vec(),
        MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
    ));
    items.push((
        LOGICAL_SECTOR_SIZE,
        lss.to_le_bytes().to_vec(),
        MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
    ));
    items.push((
        PHYSICAL_SECTOR_SIZE,
        pss.to_le_bytes().to_vec(),
        MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
    ));
    if let Some(pl) = parent_locator {
        items.push((PARENT_LOCATOR, pl.to_vec(), MD_FLAG_IS_REQUIRED));
    }
    lay_out_metadata(METADATA_LENGTH as usize, items)
}

/// A metadata region of `len` bytes: the table, then each item's data in order, 8-byte aligned.
pub(crate) fn lay_out_metadata(len: usize, items: Vec<(Guid, Vec<u8>, u32)>) -> Vec<u8> {
    let mut region = vec![0u8; len];
    let mut entries = Vec::new();
    let mut off = METADATA_TABLE_SIZE;
    for (id, data, flags) in items {
        region[off..off + data.len()].copy_from_slice(&data);
        entries.push(MetadataEntry {
            item_id: id,
            offset: off as u32,
            length: data.len() as u32,
            flags,
        });
        off += data.len().div_ceil(8) * 8;
    }
    region[..METADATA_TABLE_SIZE].copy_from_slice(&metadata_table_bytes(&entries));
    region
}
