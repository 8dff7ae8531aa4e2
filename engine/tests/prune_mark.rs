//! The live set prune marks: every stored chunk and chunk-map page of every point, whatever the
//! number of pages and however points share them.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use blockvault_chunker::RangeSet;
use blockvault_engine::{backup, mark, BackupOptions, DiskJob, DiskSource, Progress, ReadPlan};
use blockvault_repo::{
    ChunkId, KdfParams, OpenOptions, PointManifest, Repository, SourceInfo, Storage, SLOTS_PER_PAGE,
};

const CHUNK: u64 = 64 * 1024;
/// The bytes one chunk-map page covers.
const PAGE_SPAN: u64 = SLOTS_PER_PAGE as u64 * CHUNK;

/// A sparse disk of `pages` chunk-map pages with a few data chunks in each: chunk `n` of the
/// disk holds bytes derived from `n` and `seed`, when `n` is one of `chunks`.
struct SparseDisk {
    pages: u64,
    chunks: Vec<u64>,
    seed: u8,
}

impl SparseDisk {
    fn chunk(&self, n: u64) -> Vec<u8> {
        let mut x = (n << 8 | self.seed as u64) | 1;
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

impl DiskSource for SparseDisk {
    fn size(&self) -> u64 {
        self.pages * PAGE_SPAN
    }
    fn allocated(&self) -> io::Result<RangeSet> {
        Ok(RangeSet::from_ranges(
            self.chunks.iter().map(|n| n * CHUNK..(n + 1) * CHUNK),
        ))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (n, within) = (at / CHUNK, (at % CHUNK) as usize);
            let len = (CHUNK as usize - within).min(buf.len() - done);
            let part = &mut buf[done..done + len];
            if self.chunks.contains(&n) {
                part.copy_from_slice(&self.chunk(n)[within..within + len]);
            } else {
                part.fill(0);
            }
            done += len;
        }
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

async fn back_up(repo: &Arc<Repository>, disk: Arc<SparseDisk>) -> PointManifest {
    let job = DiskJob {
        name: "d".into(),
        source: disk,
        plan: ReadPlan::Full { reason: None },
        rct_id: None,
        consistency: None,
    };
    backup(
        repo.clone(),
        vec![job],
        BackupOptions::new("vm"),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap()
    .manifest
}

/// What the points need, from what was backed up: each data chunk and each page.
fn expected(
    repo: &Repository,
    disks: &[&SparseDisk],
    points: &[PointManifest],
) -> HashSet<ChunkId> {
    let mut out: HashSet<ChunkId> = disks
        .iter()
        .flat_map(|d| d.chunks.iter().map(|n| repo.chunk_id(&d.chunk(*n))))
        .collect();
    for p in points {
        for d in &p.disks {
            out.extend(d.pages.iter().flatten().map(|page| page.0));
        }
    }
    out
}

#[test]
fn mark_holds_every_chunk_and_page_of_every_point() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
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
            cache_dir: dir.path().join("cache"),
            zstd_level: 1,
        };
        let repo = Repository::open(storage, b"pw", &opts).await.unwrap();
        let per_page = |page: u64| (0..3).map(move |i| page * SLOTS_PER_PAGE as u64 + i * 97);
        // Five pages; the second point changes only the chunks of page 3, so it shares the
        // other four pages with the first.
        let first = SparseDisk {
            pages: 5,
            chunks: (0..5).flat_map(per_page).collect(),
            seed: 1,
        };
        let mut second_chunks: Vec<u64> = (0..5).filter(|p| *p != 3).flat_map(per_page).collect();
        second_chunks.extend(per_page(3).map(|n| n + 1));
        let second = SparseDisk {
            pages: 5,
            chunks: second_chunks,
            seed: 1,
        };
        let first = Arc::new(first);
        let second = Arc::new(second);
        let points = vec![
            back_up(&repo, first.clone()).await,
            back_up(&repo, second.clone()).await,
        ];
        let shared: HashSet<_> = points[0].disks[0].pages.iter().flatten().collect();
        let also: HashSet<_> = points[1].disks[0].pages.iter().flatten().collect();
        assert_eq!(shared.intersection(&also).count(), 4, "four pages shared");

        let live = mark(&repo, &points).await.unwrap();
        assert_eq!(live, expected(&repo, &[&first, &second], &points));
        let one = mark(&repo, &points[..1]).await.unwrap();
        assert_eq!(one, expected(&repo, &[&first], &points[..1]));
        assert!(mark(&repo, &[]).await.unwrap().is_empty());
    });
}
