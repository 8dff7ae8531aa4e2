//! Property test: random images, random sequences of full and incremental backups; every restore
//! point reads back bit-exact, including after later points were taken.

use std::io;
use std::sync::{Arc, Mutex};

use blockvault_chunker::RangeSet;
use blockvault_engine::{
    backup, export_raw, BackupOptions, DiskJob, DiskReader, DiskSource, ExportTarget, Progress,
    ReadPlan, ReaderOptions,
};
use blockvault_repo::{KdfParams, OpenOptions, PointManifest, Repository, SourceInfo, Storage};
use proptest::prelude::*;

struct MemDisk(Mutex<Vec<u8>>);

impl DiskSource for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn allocated(&self) -> io::Result<RangeSet> {
        // Report only 4 KiB blocks holding data, like a sparse file would.
        let d = self.0.lock().unwrap();
        let mut v = Vec::new();
        for (i, block) in d.chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let s = i as u64 * 4096;
                v.push(s..s + block.len() as u64);
            }
        }
        Ok(RangeSet::from_ranges(v))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past end"));
        }
        buf.copy_from_slice(&d[offset as usize..end]);
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

#[derive(Clone, Debug)]
enum Fill {
    Zero,
    Byte(u8),
    Noise(u64),
}

fn write(data: &mut [u8], off: usize, len: usize, fill: &Fill) {
    let end = (off + len).min(data.len());
    match fill {
        Fill::Zero => data[off..end].fill(0),
        Fill::Byte(b) => data[off..end].fill(*b),
        Fill::Noise(seed) => {
            let mut x = *seed | 1;
            for b in &mut data[off..end] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
}

fn arb_fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        Just(Fill::Zero),
        any::<u8>().prop_map(Fill::Byte),
        any::<u64>().prop_map(Fill::Noise)
    ]
}

type Step = (bool, Vec<(usize, usize, Fill)>);

fn arb_steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            proptest::collection::vec((0usize..1_500_000, 1usize..200_000, arb_fill()), 0..6),
        ),
        1..5,
    )
}

async fn read_back(
    repo: &Arc<Repository>,
    point: &PointManifest,
    dir: &std::path::Path,
) -> Vec<u8> {
    let reader = Arc::new(
        DiskReader::open(repo.clone(), point, "d", ReaderOptions { parallel: 4 }).unwrap(),
    );
    let out = dir.join(format!("{}.raw", point.id));
    export_raw(reader, ExportTarget::Path(out.clone()), Arc::default())
        .await
        .unwrap();
    std::fs::read(out).unwrap()
}

fn run_case(size: usize, steps: Vec<Step>) -> Vec<PointManifest> {
    run_case_in("memory://", 64 * 1024, size, steps, |_| {})
}

/// Runs `steps` against a repository at `location` (created with chunks of `chunk` bytes) and
/// checks every point; `before_reading` gets the temporary directory (which holds a local
/// repository's files) before the points are read back.
fn run_case_in(
    location: &str,
    chunk: u32,
    size: usize,
    steps: Vec<Step>,
    before_reading: impl FnOnce(&std::path::Path),
) -> Vec<PointManifest> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let location = location.replace("{dir}", &dir.path().display().to_string());
    rt.block_on(async move {
        let storage = Storage::open(&location, true).unwrap();
        Repository::init(&storage, b"pw", chunk, KdfParams::with_memory(8 * 1024))
            .await
            .unwrap();
        let opts = OpenOptions {
            cache_dir: dir.path().join("cache"),
            zstd_level: 1,
        };
        let repo = Repository::open(storage, b"pw", &opts).await.unwrap();

        let disk = Arc::new(MemDisk(Mutex::new(vec![0u8; size])));
        let mut history: Vec<(PointManifest, Vec<u8>)> = Vec::new();
        for (incremental, writes) in steps {
            let mut changed = Vec::new();
            {
                let mut d = disk.0.lock().unwrap();
                for (off, len, fill) in &writes {
                    let off = off % size;
                    write(&mut d, off, *len, fill);
                    changed.push(off as u64..(off + len).min(size) as u64);
                }
            }
            let plan = match history.last() {
                Some((parent, _)) if incremental => ReadPlan::Incremental {
                    parent: parent.id,
                    parent_pages: parent.disks[0]
                        .pages
                        .iter()
                        .map(|p| p.map(|h| h.0))
                        .collect(),
                    changed: RangeSet::from_ranges(changed),
                },
                _ => ReadPlan::Full { reason: None },
            };
            let mut bo = BackupOptions::new("vm");
            bo.pack_size = 256 * 1024;
            let job = DiskJob {
                name: "d".into(),
                source: disk.clone(),
                plan,
                rct_id: None,
                consistency: None,
            };
            let m = backup(repo.clone(), vec![job], bo, Arc::new(Progress::default()))
                .await
                .unwrap()
                .manifest;
            history.push((m, disk.0.lock().unwrap().clone()));
        }
        before_reading(dir.path());
        // Every point is complete on its own, whatever came after it.
        for (m, expect) in &history {
            let got = read_back(&repo, m, dir.path()).await;
            assert!(got == *expect, "point {} reads back different data", m.id);
        }
        history.into_iter().map(|(m, _)| m).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn every_point_reads_back_exactly(size in 65_536usize..1_600_000, steps in arb_steps()) {
        run_case(size, steps);
    }
}

#[test]
fn incremental_reads_and_writes_only_what_changed() {
    // Two chunk-map pages (64 KiB chunks, 4096 slots a page), data in both.
    let size = 300 << 20;
    let steps = vec![
        (
            false,
            vec![
                (0usize, 100_000usize, Fill::Noise(1)),
                (290 << 20, 100_000, Fill::Noise(2)),
            ],
        ),
        (true, vec![(5 << 20, 10, Fill::Byte(7))]),
    ];
    let points = run_case(size, steps);
    let (full, inc) = (&points[0].disks[0], &points[1].disks[0]);
    assert_eq!(full.pages.len(), 2);
    assert_eq!(
        inc.stats.bytes_read, 65536,
        "only the changed chunk is read"
    );
    assert_eq!(inc.stats.new_chunks, 1);
    assert_ne!(inc.pages[0], full.pages[0], "the touched page is rewritten");
    assert_eq!(
        inc.pages[1], full.pages[1],
        "the untouched page is shared with the parent"
    );
    assert_eq!(inc.parent, Some(points[0].id));
}

/// Drops the page cache's copy of every file under `dir` (after writing it out).
fn drop_cached_pages(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            drop_cached_pages(&e.path());
        } else {
            let f = std::fs::File::open(e.path()).unwrap();
            f.sync_all().unwrap();
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
    }
}

/// A local directory's blobs are decoded on the reading task when their bytes are in the page
/// cache, and on a blocking thread when they are not or when a blob is over 1 MiB: every way
/// reads back the same bytes (the points are read twice, first with the packs' pages dropped).
#[test]
fn local_packs_read_back_from_the_page_cache_and_from_the_device() {
    for chunk in [64 * 1024, 2 << 20] {
        let steps = vec![
            (false, vec![(0usize, 5 << 20, Fill::Noise(3))]),
            (true, vec![(1 << 20, 300_000, Fill::Noise(4))]),
        ];
        run_case_in("{dir}/repo", chunk, 6 << 20, steps.clone(), |dir| {
            drop_cached_pages(&dir.join("repo"))
        });
        run_case_in("{dir}/repo", chunk, 6 << 20, steps, |_| {});
    }
}
