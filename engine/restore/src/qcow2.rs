//! A qcow2 (version 3) image writer for disks written front to back, as `restore vm --format
//! qcow2` does. docs/qcow2.md lists the format facts it relies on. The layout it produces:
//!
//! ```text
//! cluster 0          header (104 bytes, no extensions)
//! cluster 1..        L1 table
//! then               data clusters and L2 tables, in the order they are written
//! at the end         refcount blocks, then the refcount table
//! ```
//!
//! All-zero clusters are never written: their L2 entry stays 0 (unallocated, reads as zeros with
//! no backing file), so the image is as sparse as the disk. Every cluster of the file is used
//! exactly once, so every refcount is 1 and every L1/L2 entry carries the COPIED flag.
//!
//! Data clusters and L2 tables are allocated in the order they are written, so from the first
//! data cluster on the file is written front to back. Where staged writes are given (the VHDX
//! writer's, `blockvault_vhdx::staged`), those clusters are gathered into 4 MiB runs and written
//! bypassing the page cache on a thread of their own: through the cache, 64 KiB at a time, an
//! export spent as much time in the kernel as the whole raw export took, and twice that in some
//! runs (docs/BENCHMARKS.md, "qcow2 export writes directly").

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use blockvault_vhdx::staged::StagedWrites;

pub const MAGIC: u32 = 0x5146_49fb;
/// 64 KiB clusters, qemu-img's default.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts (refcount_order 4).
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
const COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 104;

pub struct Qcow2Writer {
    file: File,
    /// Direct writes of the front-to-back part, where given.
    stage: Option<StagedWrites>,
    size: u64,
    l1: Vec<u64>,
    /// The L2 table being filled: its L1 index and entries.
    l2: Option<(u64, Vec<u64>)>,
    /// Host offset of the next cluster to allocate; every cluster before it is in use.
    next_free: u64,
    /// Guest clusters must come in increasing order.
    next_guest: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Qcow2Writer {
    /// Starts an image of `size` guest bytes in `file` (which should be new and empty).
    pub fn new(file: File, size: u64) -> io::Result<Self> {
        if size == 0 || size > (1 << 56) {
            return Err(invalid(format!("a qcow2 image of {size} bytes")));
        }
        let clusters = size.div_ceil(CLUSTER);
        let l1_size = clusters.div_ceil(L2_ENTRIES);
        let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
        file.set_len(0)?;
        Ok(Self {
            file,
            stage: None,
            size,
            l1: vec![0; l1_size as usize],
            l2: None,
            next_free: (1 + l1_clusters) * CLUSTER,
            next_guest: 0,
        })
    }

    /// Writes the front-to-back part through `stage` (staged direct writes on the same file).
    pub fn with_stage(mut self, stage: StagedWrites) -> Self {
        self.stage = Some(stage);
        self
    }

    /// Writes `data` for the clusters allocated at `at`, padded with zeros to whole clusters.
    fn put(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        let padded;
        let data = if (data.len() as u64).is_multiple_of(CLUSTER) {
            data
        } else {
            let mut full = data.to_vec();
            full.resize((data.len() as u64).next_multiple_of(CLUSTER) as usize, 0);
            padded = full;
            &padded
        };
        match self.stage.as_mut() {
            Some(stage) => stage.add(data, at).map_err(io::Error::from),
            None => self.file.write_all_at(data, at),
        }
    }

    pub fn cluster_size() -> u64 {
        CLUSTER
    }

    fn allocate(&mut self) -> u64 {
        let at = self.next_free;
        self.next_free += CLUSTER;
        at
    }

    fn flush_l2(&mut self) -> io::Result<()> {
        if let Some((idx, table)) = self.l2.take() {
            let at = self.allocate();
            let mut buf = Vec::with_capacity(CLUSTER as usize);
            for e in table {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            self.put(at, &buf)?;
            self.l1[idx as usize] = at | COPIED;
        }
        Ok(())
    }

    /// Writes guest cluster `index` (bytes `index * 64 KiB ..`); `data` is at most one cluster
    /// (a short last cluster is padded with zeros). All-zero data is skipped.
    pub fn write_cluster(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
        if index < self.next_guest || index * CLUSTER >= self.size || data.len() as u64 > CLUSTER {
            return Err(invalid(format!(
                "cluster {index} ({} bytes) out of order or outside the image",
                data.len()
            )));
        }
        self.next_guest = index + 1;
        if data.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let l1_index = index / L2_ENTRIES;
        if self.l2.as_ref().map(|(i, _)| *i) != Some(l1_index) {
            self.flush_l2()?;
            self.l2 = Some((l1_index, vec![0; L2_ENTRIES as usize]));
        }
        let at = self.allocate();
        self.put(at, data)?;
        let (_, table) = self.l2.as_mut().expect("just set");
        table[(index % L2_ENTRIES) as usize] = at | COPIED;
        Ok(())
    }

    /// Writes guest bytes at `offset` (a multiple of the cluster size), cluster by cluster.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !offset.is_multiple_of(CLUSTER) {
            return Err(invalid(format!("offset {offset} is not cluster-aligned")));
        }
        for (i, c) in data.chunks(CLUSTER as usize).enumerate() {
            self.write_cluster(offset / CLUSTER + i as u64, c)?;
        }
        Ok(())
    }

    /// Writes the remaining L2 table, the refcounts, the L1 table and the header; syncs.
    pub fn finish(mut self) -> io::Result<File> {
        self.flush_l2()?;
        // Every staged write ends before the tables are written through the page cache.
        if let Some(mut stage) = self.stage.take() {
            stage.drain()?;
        }
        let used = self.next_free / CLUSTER;
        // The refcount blocks and table count themselves too: grow until they cover everything.
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = used + blocks + table;
            let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let t = (b * 8).div_ceil(CLUSTER);
            if b == blocks && t == table {
                break;
            }
            (blocks, table) = (b, t);
        }
        let total = used + blocks + table;
        let blocks_at = self.next_free;
        let table_at = blocks_at + blocks * CLUSTER;
        let mut block = vec![0u8; CLUSTER as usize];
        for b in 0..blocks {
            block.fill(0);
            let first = b * REFCOUNTS_PER_BLOCK;
            let n = total.saturating_sub(first).min(REFCOUNTS_PER_BLOCK);
            for i in 0..n as usize {
                block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.file.write_all_at(&block, blocks_at + b * CLUSTER)?;
        }
        let mut rt = vec![0u8; (table * CLUSTER) as usize];
        for b in 0..blocks as usize {
            rt[b * 8..b * 8 + 8].copy_from_slice(&(blocks_at + b as u64 * CLUSTER).to_be_bytes());
        }
        self.file.write_all_at(&rt, table_at)?;
        let mut l1 = Vec::with_capacity(self.l1.len() * 8);
        for e in &self.l1 {
            l1.extend_from_slice(&e.to_be_bytes());
        }
        self.file.write_all_at(&l1, CLUSTER)?;
        self.file.set_len(total * CLUSTER)?;
        let mut h = vec![0u8; CLUSTER as usize];
        let mut put = |off: usize, v: &[u8]| h[off..off + v.len()].copy_from_slice(v);
        put(0, &MAGIC.to_be_bytes());
        put(4, &3u32.to_be_bytes()); // version
        put(20, &CLUSTER_BITS.to_be_bytes());
        // QEMU counts a qcow2 disk in whole 512-byte sectors, rounding the size down: a disk
        // whose size is not a multiple of 512 would lose its last bytes. Rounded up instead, the
        // tail reads as written and the padding as zeros (as `qemu-img convert` does).
        put(24, &self.size.next_multiple_of(512).to_be_bytes());
        put(36, &(self.l1.len() as u32).to_be_bytes());
        put(40, &CLUSTER.to_be_bytes()); // l1_table_offset
        put(48, &table_at.to_be_bytes());
        put(56, &(table as u32).to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // Bytes 104..112 stay zero: the end-of-extensions marker.
        self.file.sync_all()?;
        // The header last: until it is written the file is not a qcow2 image at all.
        self.file.write_all_at(&h, 0)?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_cover_their_own_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x.qcow2")).unwrap();
        let mut w = Qcow2Writer::new(f, 10 * CLUSTER + 5).unwrap();
        w.write_cluster(0, &[1; 100]).unwrap();
        w.write_cluster(3, &[0; 65536]).unwrap();
        w.write_cluster(10, &[2; 5]).unwrap();
        assert!(w.write_cluster(2, &[1]).is_err(), "out of order");
        let f = w.finish().unwrap();
        // header, L1, data, data, L2, one refcount block, the refcount table.
        assert_eq!(f.metadata().unwrap().len(), 7 * CLUSTER);
    }

    fn qemu_img(args: &[&str], files: &[&std::path::Path]) -> String {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .args(files)
            .output()
            .expect("qemu-img runs (Debian package qemu-utils, see scripts/install-deps.sh)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "qemu-img {args:?}: {text}");
        text
    }

    /// An image of several runs and two L2 tables, written through a direct handle and through
    /// the page cache alone: `qemu-img` finds both clean and equal to the raw disk they were
    /// written from.
    #[test]
    fn direct_and_buffered_images_equal_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        // Past one L2 table's 512 MiB, with a short last cluster.
        let size = 600 * (1 << 20) + 5;
        let raw = dir.path().join("disk.raw");
        let disk = File::create(&raw).unwrap();
        disk.set_len(size).unwrap();
        let last = size / CLUSTER;
        let clusters: Vec<u64> = (0..130).chain(8190..8196).chain([last]).collect();
        let data = |c: u64| -> Vec<u8> {
            let len = (size - c * CLUSTER).min(CLUSTER) as usize;
            (0..len)
                .map(|i| (c as usize * 7 + i / 512) as u8 | 1)
                .collect()
        };
        for &c in &clusters {
            disk.write_all_at(&data(c), c * CLUSTER).unwrap();
        }
        for direct in [true, false] {
            let img = dir.path().join(format!("direct-{direct}.qcow2"));
            let mut w = Qcow2Writer::new(File::create(&img).unwrap(), size).unwrap();
            if direct {
                let f = w.file.try_clone().unwrap();
                let stage =
                    StagedWrites::open(&img, &f).expect("the test directory takes O_DIRECT");
                w = w.with_stage(stage);
            }
            // Cluster by cluster, and several clusters in one call.
            w.write_at(0, &(0..64).flat_map(data).collect::<Vec<u8>>())
                .unwrap();
            for &c in &clusters[64..] {
                w.write_cluster(c, &data(c)).unwrap();
            }
            w.finish().unwrap();
            qemu_img(&["check", "-f", "qcow2"], &[&img]);
            let same = qemu_img(&["compare", "-f", "qcow2", "-F", "raw"], &[&img, &raw]);
            assert!(same.contains("identical"), "{same}");
        }
    }
}
