//! A cancelled backup (its token cancelled, or its future dropped) stops reading its disks
//! before it returns or soon after it is dropped, and writes no restore point.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockvault_chunker::RangeSet;
use blockvault_engine::{backup, BackupOptions, DiskJob, DiskSource, Error, Progress, ReadPlan};
use blockvault_repo::{KdfParams, OpenOptions, Repository, SourceInfo, Storage};

const CHUNK: usize = 64 * 1024;

/// 64 MiB of slow reads (2 ms per chunk: about 2 s in all), counted.
struct SlowDisk {
    reads: Arc<AtomicU64>,
}

impl DiskSource for SlowDisk {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn allocated(&self) -> io::Result<RangeSet> {
        Ok(RangeSet::from_ranges(std::iter::once(0..self.size())))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(2));
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset as usize + i) % 251) as u8 | 1;
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
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

async fn repo(dir: &std::path::Path) -> Arc<Repository> {
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
    Repository::open(storage, b"pw", &opts).await.unwrap()
}

fn job(reads: &Arc<AtomicU64>) -> Vec<DiskJob> {
    vec![DiskJob {
        name: "d".into(),
        source: Arc::new(SlowDisk {
            reads: reads.clone(),
        }),
        plan: ReadPlan::Full { reason: None },
        rct_id: None,
        consistency: None,
    }]
}

/// Reads that still happen after `since`, counted over a quiet period.
async fn reads_after(reads: &AtomicU64) -> u64 {
    let before = reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    reads.load(Ordering::SeqCst) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_backup_returns_once_it_stopped_reading_and_stores_no_point() {
    let d = tempfile::tempdir().unwrap();
    let repo = repo(d.path()).await;
    let reads = Arc::new(AtomicU64::new(0));
    let opts = BackupOptions::new("vm");
    let cancel = opts.cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let r = backup(
        repo.clone(),
        job(&reads),
        opts,
        Arc::new(Progress::default()),
    )
    .await;
    canceller.await.unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let total = reads.load(Ordering::SeqCst);
    assert!(total > 0 && total < 1024, "read {total} of 1024 chunks");
    assert_eq!(
        reads_after(&reads).await,
        0,
        "reads went on after the backup returned"
    );
    let (points, _) = repo.list_points().await.unwrap();
    assert!(points.is_empty(), "{points:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_backup_stops_reading() {
    let d = tempfile::tempdir().unwrap();
    let repo = repo(d.path()).await;
    let reads = Arc::new(AtomicU64::new(0));
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        backup(
            repo.clone(),
            job(&reads),
            BackupOptions::new("vm"),
            Arc::new(Progress::default()),
        ),
    )
    .await;
    assert!(r.is_err(), "the backup ended within 300 ms");
    // The threads see the stop at their next chunk.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        reads_after(&reads).await,
        0,
        "reads went on after the backup was dropped"
    );
    assert!(reads.load(Ordering::SeqCst) < 1024);
}
