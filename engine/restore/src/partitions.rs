//! The partitions of a disk: GPT (through the `gpt` crate), MBR with logical partitions, or one
//! file system spanning the whole disk. A partition that runs past the end of
//! the disk is listed with its problem and cannot be opened.

use std::sync::Arc;

use serde::Serialize;

use crate::detect::{detect, FsKind};
use crate::device::{ReadAt, Window};
use crate::{guarded, Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// 1-based as tools number them (`p1`); 0 for a file system on the whole disk.
    pub index: u32,
    /// Type as recorded in the table (a GUID or an MBR type byte) and its usual meaning.
    pub type_id: String,
    pub type_name: String,
    /// GPT partition name, if any.
    pub name: String,
    pub start: u64,
    pub size: u64,
    /// What the signatures at its start say.
    pub filesystem: FsKind,
    /// Why the partition cannot be read, if it cannot (e.g. it runs past the end of the disk).
    pub problem: Option<String>,
}

impl Partition {
    /// How a path names this partition: `p2`, or `disk` for a whole-disk file system.
    pub fn selector(&self) -> String {
        if self.index == 0 {
            "disk".into()
        } else {
            format!("p{}", self.index)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionTable {
    /// "gpt", "mbr", or "none" (a file system, or nothing known, on the whole disk).
    pub scheme: String,
    pub disk_size: u64,
    pub sector_size: u32,
    pub partitions: Vec<Partition>,
}

/// GPT tables with more entries than this are refused (the standard minimum is 128; tools use 128).
const MAX_GPT_ENTRIES: u32 = 4096;
/// MBR logical partitions are a linked list of EBRs on the disk; a longer chain is refused.
const MAX_EBR_READS: u64 = 128;

/// Reads the partition table of `dev`.
pub fn partitions(dev: &Arc<dyn ReadAt>) -> Result<PartitionTable> {
    let size = dev.size();
    let mut whole = Window::new(dev.clone(), 0, size);
    let mut mbr = [0u8; 512];
    if size < 512 || whole.read_exact_at(0, &mut mbr).is_err() {
        return Err(Error::Corrupt {
            what: "the disk".into(),
            detail: format!("it has only {size} bytes"),
        });
    }
    let boot_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let types: Vec<u8> = (0..4).map(|i| mbr[446 + 16 * i + 4]).collect();
    // A file system on the whole disk also ends its boot sector with 0x55AA (NTFS, FAT): trust
    // its signature before reading the sector as a partition table.
    let fs = detect(&mut whole);
    if fs.readable() || !boot_sig || types.iter().all(|t| *t == 0) {
        return Ok(PartitionTable {
            scheme: "none".into(),
            disk_size: size,
            sector_size: 512,
            partitions: vec![Partition {
                index: 0,
                type_id: String::new(),
                type_name: "whole disk".into(),
                name: String::new(),
                start: 0,
                size,
                filesystem: fs,
                problem: None,
            }],
        });
    }
    if types.contains(&0xee) {
        return guarded("the GPT partition table", || gpt_table(dev));
    }
    guarded("the MBR partition table", || mbr_table(dev))
}

fn finish(dev: &Arc<dyn ReadAt>, p: &mut Partition) {
    let size = dev.size();
    match p.start.checked_add(p.size) {
        Some(end) if end <= size && p.size > 0 => {
            p.filesystem = detect(&mut Window::new(dev.clone(), p.start, p.size));
        }
        _ => {
            p.filesystem = FsKind::Unknown;
            p.problem = Some(format!(
                "it spans bytes {}..{} but the disk has {size} bytes",
                p.start,
                p.start as u128 + p.size as u128
            ));
        }
    }
}

/// Checks the header fields the `gpt` crate trusts: it asserts 128-byte entries and loops over
/// as many entries as the header claims.
fn check_gpt_header(w: &mut Window, lba: u64, sector: u64) -> Result<bool> {
    let mut h = [0u8; 92];
    if w.read_exact_at(lba * sector, &mut h).is_err() || &h[..8] != b"EFI PART" {
        return Ok(false);
    }
    let entries = u32::from_le_bytes(h[80..84].try_into().expect("4 bytes"));
    let entry_size = u32::from_le_bytes(h[84..88].try_into().expect("4 bytes"));
    if entry_size != 128 || entries > MAX_GPT_ENTRIES {
        return Err(Error::Corrupt {
            what: "the GPT partition table".into(),
            detail: format!(
                "its header at LBA {lba} declares {entries} entries of {entry_size} bytes; at most {MAX_GPT_ENTRIES} entries of 128 bytes are read"
            ),
        });
    }
    Ok(true)
}

fn gpt_table(dev: &Arc<dyn ReadAt>) -> Result<PartitionTable> {
    let size = dev.size();
    let mut last_err = String::from("no GPT header found at LBA 1");
    for sector in [512u64, 4096] {
        let mut w = Window::new(dev.clone(), 0, size);
        let primary = check_gpt_header(&mut w, 1, sector)?;
        let backup = size >= sector && check_gpt_header(&mut w, size / sector - 1, sector)?;
        if !primary && !backup {
            continue;
        }
        let lb = if sector == 512 {
            gpt::disk::LogicalBlockSize::Lb512
        } else {
            gpt::disk::LogicalBlockSize::Lb4096
        };
        let disk = match gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(w.with_read_budget(MAX_GPT_ENTRIES as u64 + 64))
        {
            Ok(d) => d,
            Err(e) => {
                last_err = e.to_string();
                continue;
            }
        };
        let mut parts = Vec::new();
        for (id, p) in disk.partitions() {
            if !p.is_used() {
                continue;
            }
            let start = p.first_lba.saturating_mul(sector);
            let len = p
                .last_lba
                .checked_sub(p.first_lba)
                .map(|n| (n + 1).saturating_mul(sector))
                .unwrap_or(0);
            let guid = p.part_type_guid.guid.to_string().to_uppercase();
            let mut part = Partition {
                index: *id,
                type_name: gpt_type_name(&guid).into(),
                type_id: guid,
                name: p.name.clone(),
                start,
                size: len,
                filesystem: FsKind::Unknown,
                problem: None,
            };
            finish(dev, &mut part);
            parts.push(part);
        }
        return Ok(PartitionTable {
            scheme: "gpt".into(),
            disk_size: size,
            sector_size: sector as u32,
            partitions: parts,
        });
    }
    Err(Error::Corrupt {
        what: "the GPT partition table".into(),
        detail: last_err,
    })
}

/// One 16-byte MBR/EBR partition entry: boot flag, CHS start, type, CHS end, start LBA (u32 LE),
/// sector count (u32 LE).
fn mbr_entry(sector: &[u8], i: usize) -> (u8, u64, u64) {
    let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
    let start = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as u64;
    let count = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) as u64;
    (e[4], start, count)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// The MBR: four primary entries, and logical partitions in the chain of extended boot records
/// (EBRs) inside an extended partition. Each EBR's first entry is a logical partition, its start
/// relative to that EBR; its second entry points to the next EBR, relative to the extended
/// partition's start. Read here rather than with a crate: the MBR crates pull in serde features
/// that would rebuild most of the workspace, and this is the whole of the format.
fn mbr_table(dev: &Arc<dyn ReadAt>) -> Result<PartitionTable> {
    let size = dev.size();
    let mut w = Window::new(dev.clone(), 0, size);
    let mut mbr = [0u8; 512];
    w.read_exact_at(0, &mut mbr).map_err(|e| Error::Read {
        offset: 0,
        source: e,
    })?;
    let mut parts = Vec::new();
    let mut push = |index: u32, t: u8, start_lba: u64, count: u64| {
        let mut part = Partition {
            index,
            type_id: format!("0x{t:02x}"),
            type_name: mbr_type_name(t).into(),
            name: String::new(),
            start: start_lba * 512,
            size: count * 512,
            filesystem: FsKind::Unknown,
            problem: None,
        };
        finish(dev, &mut part);
        parts.push(part);
    };
    let mut extended = None;
    for i in 0..4 {
        let (t, start, count) = mbr_entry(&mbr, i);
        if t == 0 || count == 0 {
            continue;
        }
        if is_extended(t) {
            extended.get_or_insert((start, count));
            continue;
        }
        push(i as u32 + 1, t, start, count);
    }
    if let Some((ext_start, ext_count)) = extended {
        let mut rel = 0u64;
        let mut index = 5u32;
        let mut ebr = [0u8; 512];
        for _ in 0..MAX_EBR_READS {
            let at = (ext_start + rel) * 512;
            if w.read_exact_at(at, &mut ebr).is_err() || ebr[510..512] != [0x55, 0xaa] {
                if rel == 0 {
                    break; // an empty extended partition need not hold an EBR
                }
                return Err(Error::Corrupt {
                    what: "the MBR partition table".into(),
                    detail: format!(
                        "the extended boot record at byte {at} is missing or unreadable"
                    ),
                });
            }
            let (t, start, count) = mbr_entry(&ebr, 0);
            if t != 0 && count > 0 {
                push(index, t, ext_start + rel + start, count);
                index += 1;
            }
            let (nt, next, _) = mbr_entry(&ebr, 1);
            if nt == 0 || next == 0 {
                return Ok(mbr_result(size, parts));
            }
            // Each EBR must lie after the previous one and inside the extended partition, so
            // the chain cannot loop.
            if !is_extended(nt) || next <= rel || next >= ext_count {
                return Err(Error::Corrupt {
                    what: "the MBR partition table".into(),
                    detail: format!(
                        "the extended boot record at byte {at} links to sector {next} of the extended partition, which is not after it and inside it"
                    ),
                });
            }
            rel = next;
        }
        if rel != 0 {
            return Err(Error::Corrupt {
                what: "the MBR partition table".into(),
                detail: format!("more than {MAX_EBR_READS} logical partitions"),
            });
        }
    }
    Ok(mbr_result(size, parts))
}

fn mbr_result(size: u64, partitions: Vec<Partition>) -> PartitionTable {
    PartitionTable {
        scheme: "mbr".into(),
        disk_size: size,
        sector_size: 512,
        partitions,
    }
}

fn gpt_type_name(guid: &str) -> &'static str {
    match guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3" => "Windows LDM metadata",
        "AF9B60A0-1431-4F62-BC68-3311714A69AD" => "Windows LDM data",
        "E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D" => "Windows Storage Spaces",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "CA7D7CCB-63ED-4C53-861C-1742536059CC" => "Linux LUKS",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        _ => "unknown type",
    }
}

fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e => "FAT",
        0x07 => "NTFS/exFAT",
        0x27 => "Windows recovery",
        0x42 => "Windows dynamic disk",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xee => "GPT protective",
        0xef => "EFI system",
        0xfd => "Linux RAID",
        _ => "unknown type",
    }
}
