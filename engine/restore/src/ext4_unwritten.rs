//! Finds ext4 files with unwritten (preallocated) extents, which `ext4-view` 1.0 reads wrongly.
//!
//! An extent whose length field is above 32,768 is unwritten: `fallocate` reserved its blocks but
//! nothing was written there, and the file reads as zeros over it (ext4 on-disk layout, "Extent
//! Tree": `ee_len` above 32768 means uninitialized, of length `ee_len - 32768`). The crate takes
//! the raw field as the length: it returns whatever those blocks hold (stale data, another file's
//! deleted contents) and places every later extent of the file wrong. Preallocation is common
//! (databases, journald, download managers), so such files are found here and refused by name
//! rather than extracted wrong.
//!
//! The check reads the inode and its extent tree from the disk as last checkpointed; a file whose
//! extents changed only in the journal is checked as they were before.

use crate::device::Window;

/// The geometry needed to find an inode, from the superblock.
#[derive(Clone, Debug)]
pub struct InodeTables {
    block_size: u64,
    inodes_per_group: u64,
    inode_size: u64,
    /// Byte offset of the group descriptor table, and the size of one descriptor.
    gdt: u64,
    desc_size: u64,
    /// Each block group's inode table (its first block), as read: files of one directory
    /// mostly share a group, so most checks read the inode alone.
    tables: std::collections::HashMap<u64, u64>,
}

const EXTENTS_FL: u32 = 0x8_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_INIT_LEN: u16 = 32768;
/// Deeper trees than this do not exist (the kernel's limit is 5).
const MAX_DEPTH: u16 = 5;
/// Tree nodes read for one file at most.
const MAX_NODES: usize = 4096;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn corrupt(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

impl InodeTables {
    /// From the 1024-byte superblock; `None` when it gives no usable geometry (the crate,
    /// which opened the file system, would have refused it).
    pub fn from_superblock(sb: &[u8; 1024]) -> Option<Self> {
        let log = u32_at(sb, 0x18);
        if log > 6 {
            return None;
        }
        let block_size = 1024u64 << log;
        let inodes_per_group = u64::from(u32_at(sb, 0x28));
        let inode_size = match u32_at(sb, 0x4C) {
            0 => 128,
            _ => u64::from(u16_at(sb, 0x58)),
        };
        let desc_size = match u32_at(sb, 0x60) & 0x80 {
            0 => 32,
            _ => u64::from(u16_at(sb, 0xFE)).max(32),
        };
        if inodes_per_group == 0 || inode_size < 128 {
            return None;
        }
        let first_data_block = u64::from(u32_at(sb, 0x14));
        Some(Self {
            block_size,
            inodes_per_group,
            inode_size,
            gdt: (first_data_block + 1) * block_size,
            desc_size,
            tables: std::collections::HashMap::new(),
        })
    }

    /// True when inode `ino` maps any unwritten extent.
    pub fn has_unwritten_extents(&mut self, w: &mut Window, ino: u64) -> std::io::Result<bool> {
        let index = ino.checked_sub(1).ok_or_else(|| corrupt("inode 0"))?;
        let group = index / self.inodes_per_group;
        let table = match self.tables.get(&group) {
            Some(t) => *t,
            None => {
                let mut desc = vec![0u8; self.desc_size as usize];
                w.read_exact_at(self.gdt + group * self.desc_size, &mut desc)?;
                let mut t = u64::from(u32_at(&desc, 0x08));
                if self.desc_size >= 64 {
                    t |= u64::from(u32_at(&desc, 0x28)) << 32;
                }
                self.tables.insert(group, t);
                t
            }
        };
        let at = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add((index % self.inodes_per_group) * self.inode_size))
            .ok_or_else(|| corrupt("inode table past the end"))?;
        let mut inode = [0u8; 128];
        w.read_exact_at(at, &mut inode)?;
        if u32_at(&inode, 0x20) & EXTENTS_FL == 0 {
            return Ok(false);
        }
        let mut pending: Vec<Vec<u8>> = vec![inode[0x28..0x28 + 60].to_vec()];
        let mut nodes = 0;
        while let Some(node) = pending.pop() {
            nodes += 1;
            if nodes > MAX_NODES {
                return Err(corrupt("extent tree too large"));
            }
            if node.len() < 12 || u16_at(&node, 0) != EXTENT_MAGIC {
                return Err(corrupt("extent header magic missing"));
            }
            let entries = usize::from(u16_at(&node, 2));
            let depth = u16_at(&node, 6);
            if depth > MAX_DEPTH || 12 + entries * 12 > node.len() {
                return Err(corrupt("extent header out of bounds"));
            }
            for e in node[12..12 + entries * 12].chunks_exact(12) {
                if depth == 0 {
                    if u16_at(e, 4) > MAX_INIT_LEN {
                        return Ok(true);
                    }
                } else {
                    let leaf = u64::from(u32_at(e, 4)) | u64::from(u16_at(e, 8)) << 32;
                    let mut b = vec![0u8; self.block_size as usize];
                    w.read_exact_at(
                        leaf.checked_mul(self.block_size)
                            .ok_or_else(|| corrupt("extent node past the end"))?,
                        &mut b,
                    )?;
                    pending.push(b);
                }
            }
        }
        Ok(false)
    }
}
