//! Restore-point random reads, the overlay merge and hydration against a real (in-memory)
//! repository: every answer is checked against the bytes that were backed up.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use blockvault_chunker::RangeSet;
use blockvault_engine::{
    backup, start_hydration, BackupOptions, DiskJob, DiskReader, DiskSource, MountedDisk, Overlay,
    Progress, RandomReadOptions, RandomReader, ReadPlan, ReaderOptions, Segment,
};
use blockvault_repo::{KdfParams, OpenOptions, Repository, SourceInfo, Storage};
use rand::{Rng, RngCore, SeedableRng};

const CHUNK: usize = 64 * 1024;

struct MemDisk(Vec<u8>);

impl DiskSource for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn allocated(&self) -> io::Result<RangeSet> {
        Ok(RangeSet::from_ranges(std::iter::once(
            0..self.0.len() as u64,
        )))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn describe(&self) -> SourceInfo {
        SourceInfo {
            format: "memory".into(),
            path: String::new(),
            logical_sector_size: None,
        }
    }
}

/// 40 chunks: every third chunk zero, the rest random.
fn image() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut d = vec![0u8; 40 * CHUNK];
    for (i, c) in d.chunks_mut(CHUNK).enumerate() {
        if i % 3 != 1 {
            rng.fill_bytes(c);
        }
    }
    d
}

async fn mounted(
    dir: &std::path::Path,
    data: &[u8],
    cache_bytes: usize,
) -> (Arc<RandomReader>, String) {
    let storage = Storage::open("memory://", true).unwrap();
    Repository::init(
        &storage,
        b"pw",
        CHUNK as u32,
        KdfParams::with_memory(8 * 1024),
    )
    .await
    .unwrap();
    let opts = OpenOptions {
        cache_dir: dir.join("cache"),
        zstd_level: 1,
    };
    let repo = Repository::open(storage, b"pw", &opts).await.unwrap();
    let job = DiskJob {
        name: "d".into(),
        source: Arc::new(MemDisk(data.to_vec())),
        plan: ReadPlan::Full { reason: None },
        rct_id: None,
        consistency: None,
    };
    let m = backup(
        repo.clone(),
        vec![job],
        BackupOptions::new("vm"),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap()
    .manifest;
    let reader = Arc::new(DiskReader::open(repo, &m, "d", ReaderOptions::default()).unwrap());
    let opts = RandomReadOptions {
        cache_bytes,
        parallel: 4,
        readahead_chunks: 4,
    };
    (
        Arc::new(RandomReader::open(reader, opts).await.unwrap()),
        m.id.to_hex(),
    )
}

fn flatten(segs: Vec<Segment>) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        match s {
            Segment::Data(b) => out.extend_from_slice(&b),
            Segment::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn random_reads_match_the_image_and_zero_chunks_are_holes() {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    rt().block_on(async {
        let (r, _) = mounted(dir.path(), &data, 3 * CHUNK).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let off = rng.gen_range(0..data.len() as u64);
            let len = rng.gen_range(0..=(data.len() as u64 - off).min(300_000));
            let r = r.clone();
            // Half the reads fetch every chunk on their own task, as file extraction does.
            tasks.push(tokio::spawn(async move {
                let segs = if i % 2 == 0 {
                    r.read_at(off, len).await
                } else {
                    r.read_at_here(off, len).await
                };
                (off, len, segs)
            }));
        }
        for t in tasks {
            let (off, len, segs) = t.await.unwrap();
            let segs = segs.unwrap();
            assert_eq!(segs.iter().map(Segment::len).sum::<u64>(), len);
            assert!(
                flatten(segs) == data[off as usize..(off + len) as usize],
                "read of {len} at {off} differs"
            );
            let stats = r.cache_stats();
            assert!(stats.bytes <= 3 * CHUNK, "cache over its bound: {stats:?}");
        }
        // A whole zero chunk is one hole, never fetched data.
        let segs = r.read_at(CHUNK as u64, CHUNK as u64).await.unwrap();
        assert_eq!(segs, vec![Segment::Zero(CHUNK as u64)]);
        let map = r.map(0, 3 * CHUNK as u64).unwrap();
        assert_eq!(
            map.iter().map(|m| (m.length, m.zero)).collect::<Vec<_>>(),
            vec![
                (CHUNK as u64, false),
                (CHUNK as u64, true),
                (CHUNK as u64, false)
            ]
        );
        assert!(r.read_at(data.len() as u64 - 10, 11).await.is_err());
    });
}

#[test]
fn overlay_merges_over_the_backup_and_hydration_copies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    rt().block_on(async {
        let (r, point) = mounted(dir.path(), &data, 8 * CHUNK).await;
        let o = Overlay::open(&dir.path().join("ov"), "d", &point, r.size()).unwrap();
        let disk = std::sync::Arc::new(MountedDisk::new(r.clone(), Some(o)).unwrap());
        disk.write(8192, bytes::Bytes::from(vec![0xee; 12288]))
            .await
            .unwrap();
        disk.write_zeroes(3 * CHUNK as u64, 4096, true)
            .await
            .unwrap();
        let mut expect = data.clone();
        expect[8192..20480].fill(0xee);
        expect[3 * CHUNK..3 * CHUNK + 4096].fill(0);
        let got = flatten(disk.read_at(0, data.len() as u64).await.unwrap());
        assert!(got == expect, "merged read differs");
        let st = disk.block_status(0, 2 * CHUNK as u64).unwrap();
        assert_eq!(st.iter().map(|s| s.length).sum::<u64>(), 2 * CHUNK as u64);
        assert!(st.last().unwrap().hole && st.last().unwrap().zero);

        let file = dir.path().join("hydrated.raw");
        let h = start_hydration(disk.clone(), file.clone(), 3).unwrap();
        for _ in 0..500 {
            if h.is_complete() || h.status().error.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = h.status();
        assert!(s.complete, "{s:?}");
        assert_eq!(s.bytes_done, s.bytes_total);
        // The overlay was merged in, and the disk is now served from the file.
        assert!(
            std::fs::read(&file).unwrap() == expect,
            "hydrated copy differs from the point plus the overlay"
        );
        assert_eq!(disk.local_path().as_deref(), Some(file.as_path()));
        disk.write(4 * CHUNK as u64, bytes::Bytes::from(vec![0x11; 4096]))
            .await
            .unwrap();
        disk.write_zeroes(0, 4096, true).await.unwrap();
        disk.flush().await.unwrap();
        expect[4 * CHUNK..4 * CHUNK + 4096].fill(0x11);
        expect[..4096].fill(0);
        assert!(
            std::fs::read(&file).unwrap() == expect,
            "a write after the switch-over did not reach the file"
        );
        let got = flatten(disk.read_at(0, data.len() as u64).await.unwrap());
        assert!(got == expect, "reads after the switch-over differ");
        assert!(
            disk.overlay().unwrap().merged_into().unwrap().as_deref() == Some(file.as_path()),
            "no merge record"
        );
    });
}

/// A chunk leaves the memory cache once block-device readers were given every byte of it
/// ("drop-behind"), and only then: a chunk read in part stays, also while a sequential scan of the rest of the
/// disk (with readahead) goes through a cache too small to hold both.
#[test]
fn chunks_served_in_full_leave_the_cache_and_a_scan_does_not_push_out_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let c = CHUNK as u64;
    rt().block_on(async {
        let (r, _) = mounted(dir.path(), &data, 6 * CHUNK).await;
        let read = |off: u64, len: u64| {
            let r = r.clone();
            let data = &data;
            async move {
                let got = flatten(r.read_at(off, len).await.unwrap());
                assert!(
                    got == data[off as usize..(off + len) as usize],
                    "read at {off}"
                );
            }
        };
        // Half of chunk 0: it stays.
        read(0, c / 2).await;
        assert_eq!(r.cache_stats().chunks, 1);
        // Chunk 2 in 4 KiB pieces, last first (no readahead): it stays until the last piece.
        let pieces: Vec<u64> = (0..16).rev().map(|i| 2 * c + i * 4096).collect();
        for &off in &pieces[..15] {
            read(off, 4096).await;
        }
        assert_eq!(r.cache_stats().chunks, 2);
        read(pieces[15], 4096).await;
        assert_eq!(r.cache_stats().chunks, 1, "chunk 2 was served in full");
        // A scan of chunks 3..40 in reads of three quarters of a chunk, with readahead.
        let mut off = 3 * c;
        while off < data.len() as u64 {
            let len = (c / 4 * 3).min(data.len() as u64 - off);
            read(off, len).await;
            off += len;
            assert!(r.cache_stats().bytes <= 6 * CHUNK);
        }
        // Readahead started during the scan has settled.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = r.cache_stats();
        assert_eq!((stats.chunks, stats.bytes), (1, CHUNK), "{stats:?}");
        // The chunk left is chunk 0: reading its other half empties the cache.
        read(c / 2, c / 2).await;
        assert_eq!(r.cache_stats().chunks, 0);
        // A file system reader's chunks stay, served in full or not.
        let got = flatten(r.read_at_here(0, c).await.unwrap());
        assert!(got == data[..CHUNK]);
        assert_eq!(r.cache_stats().chunks, 1);
    });
}
