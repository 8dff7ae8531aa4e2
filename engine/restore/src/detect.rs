//! What a partition (or a whole disk) holds, told by the signatures in its first sectors. Only
//! NTFS and ext2/3/4 are read; the rest are named so the user knows why and what to do instead.

use serde::Serialize;

use crate::device::Window;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ntfs,
    Ext4,
    /// Named but not readable here: XFS, LVM, BitLocker, ReFS, LUKS, btrfs, FAT, swap ...
    Other(String),
    /// Only zeros where superblocks would be.
    Empty,
    Unknown,
}

impl FsKind {
    pub fn readable(&self) -> bool {
        matches!(self, FsKind::Ntfs | FsKind::Ext4)
    }

    pub fn name(&self) -> String {
        match self {
            FsKind::Ntfs => "NTFS".into(),
            FsKind::Ext4 => "ext2/3/4".into(),
            FsKind::Other(s) => s.clone(),
            FsKind::Empty => "nothing (zeros)".into(),
            FsKind::Unknown => "an unknown or encrypted file system".into(),
        }
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Bytes read from the start of a volume: enough for every signature below but btrfs's.
const HEAD: usize = 8192;

/// Looks at the signatures at the start of `w`. Read errors (a window past the disk's end) count
/// as "unknown"; the caller reports those separately.
pub fn detect(w: &mut Window) -> FsKind {
    let mut head = vec![0u8; HEAD.min(w.len() as usize)];
    if w.read_exact_at(0, &mut head).is_err() {
        return FsKind::Unknown;
    }
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    // Boot-sector OEM ids (offset 3) of Windows volumes.
    if at(3, b"NTFS    ") {
        return FsKind::Ntfs;
    }
    if at(3, b"-FVE-FS-") {
        return FsKind::Other("BitLocker (encrypted)".into());
    }
    if at(3, b"ReFS\0\0\0\0") {
        return FsKind::Other("ReFS".into());
    }
    if at(3, b"EXFAT   ") {
        return FsKind::Other("exFAT".into());
    }
    // ext2/3/4: the superblock at 1024 holds the magic 0xEF53 at offset 56.
    if at(1024 + 56, &[0x53, 0xef]) {
        return FsKind::Ext4;
    }
    if at(0, b"XFSB") {
        return FsKind::Other("XFS".into());
    }
    if at(0, b"LUKS\xba\xbe") {
        return FsKind::Other("LUKS (encrypted)".into());
    }
    // LVM2 physical volume: a label "LABELONE" in one of the first four sectors, type "LVM2 001".
    for s in 0..4 {
        if at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001") {
            return FsKind::Other("an LVM2 physical volume".into());
        }
    }
    // Linux software RAID (md metadata 1.1 at 0, 1.2 at 4096).
    if at(0, &[0xfc, 0x4e, 0x2b, 0xa9]) || at(4096, &[0xfc, 0x4e, 0x2b, 0xa9]) {
        return FsKind::Other("a Linux RAID member".into());
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return FsKind::Other("Linux swap".into());
    }
    if at(82, b"FAT32   ") || at(54, b"FAT16   ") || at(54, b"FAT12   ") {
        return FsKind::Other("FAT".into());
    }
    let mut btrfs = [0u8; 8];
    if w.read_exact_at(0x10040, &mut btrfs).is_ok() && &btrfs == b"_BHRfS_M" {
        return FsKind::Other("btrfs".into());
    }
    if head.iter().all(|b| *b == 0) {
        return FsKind::Empty;
    }
    FsKind::Unknown
}
