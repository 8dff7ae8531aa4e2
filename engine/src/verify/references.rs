//! The reference check: is every chunk a restore point needs known to the index, in a listed pack,
//! and not found damaged?
//!
//! Each distinct chunk-map page is loaded once, its chunks are looked up and judged, and only a
//! summary of the page stays in memory (a tally and its damaged slots). Memory therefore grows with
//! the number of distinct pages, one per 4096 chunks of a disk, and not with the number of chunks:
//! the pages and chunk locations of a large repository are never all held at once. A chunk that
//! two pages share is judged once per page.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockvault_repo::{ChunkId, ChunkMapPage, Location, PackId, PointManifest, Repository};
use futures::StreamExt;

use super::state::{History, PointTally};
use super::Unchecked;
use crate::Result;

/// Pages loaded and judged at once.
const PAGES_IN_FLIGHT: usize = 16;

/// A damaged or missing object and why: (object, detail).
pub(super) type Damage = (String, String);

/// What the verify history and the pack listing say about blobs.
pub(super) struct Judge {
    pub listed: HashMap<PackId, u64>,
    pub history: History,
    /// Chunks of lost packs (gone though no prune deleted them), and the pack each was in: the
    /// index no longer has them, and the loss is named by its pack.
    pub lost: HashMap<ChunkId, PackId>,
}

impl Judge {
    /// Why the blob `id`, which the index has at `loc` (`None`: nowhere), cannot be read.
    pub fn damage(&self, id: &ChunkId, loc: Option<&Location>) -> Option<Damage> {
        match loc {
            None => Some(match self.lost.get(id) {
                Some(pack) => (format!("pack {pack}"), super::state::LOST.into()),
                None => (
                    format!("chunk {id}"),
                    "referenced chunk is missing: no pack holds it".into(),
                ),
            }),
            Some(l) if !self.listed.contains_key(&l.pack) => Some((
                format!("pack {}", l.pack),
                "missing from the repository".into(),
            )),
            Some(l) => self
                .history
                .damaged(&l.pack, l.offset)
                .map(|d| (format!("pack {}", l.pack), d.to_string())),
        }
    }

    /// Where the blob `id` is read from: the index's copy or, where a run found that one damaged,
    /// another copy the index knows that none found damaged (the index reads that one from the
    /// moment this run's record is absorbed, so the points that need the chunk are whole).
    pub fn locate(&self, repo: &Repository, id: &ChunkId) -> Result<Option<Location>> {
        let loc = repo.lookup_any(id)?;
        match loc {
            Some(l) if self.damage(id, Some(&l)).is_some() => Ok(repo
                .other_copies(id)?
                .into_iter()
                .find(|c| self.damage(id, Some(c)).is_none())
                .or(loc)),
            _ => Ok(loc),
        }
    }

    /// Adds one blob to a tally.
    pub fn tally(&self, tally: &mut PointTally, id: &ChunkId, loc: Option<&Location>) {
        let damaged = self.damage(id, loc).is_some();
        tally.add(
            loc.map_or(0, |l| l.len as u64),
            damaged,
            loc.and_then(|l| self.history.verified_at(l)),
        );
    }
}

/// One distinct chunk-map page, judged.
#[derive(Default)]
pub(super) struct PageSummary {
    /// Why the page itself cannot be used (every slot it covers is lost).
    pub problem: Option<Damage>,
    /// The page's blob and its distinct chunks.
    pub tally: PointTally,
    /// Damaged slots and why.
    pub damaged: Vec<(u32, Damage)>,
    /// Distinct chunks the page references.
    pub chunks: u32,
}

/// Every page and config piece the restore points reference, judged.
pub(super) struct References {
    pub pages: HashMap<ChunkId, PageSummary>,
    /// Config pieces and where the index has them (a few per point).
    pub configs: HashMap<ChunkId, Option<Location>>,
    /// Pages the store failed to give (not damage: they were not checked).
    pub unchecked: Vec<Unchecked>,
}

impl References {
    /// Distinct chunks per distinct page, summed, plus the pages and config pieces themselves.
    pub fn chunk_count(&self) -> usize {
        self.pages
            .values()
            .map(|p| p.chunks as usize + 1)
            .sum::<usize>()
            + self.configs.len()
    }
}

/// The distinct pages of `points` and the slot count each decodes to.
pub(super) fn distinct_pages<'a>(
    points: impl IntoIterator<Item = &'a PointManifest>,
) -> Vec<(ChunkId, usize)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for point in points {
        for disk in &point.disks {
            for (page_no, page_id) in disk.pages.iter().enumerate() {
                let Some(page_id) = page_id else { continue };
                if seen.insert(page_id.0) {
                    out.push((page_id.0, disk.page_slots(point.chunk_size, page_no)));
                }
            }
        }
    }
    out
}

/// A page's distinct chunks and where the index has them, looked up on a blocking thread.
async fn locate_all(
    repo: &Arc<Repository>,
    ids: Vec<ChunkId>,
) -> Result<Vec<(ChunkId, Option<Location>)>> {
    let r = repo.clone();
    tokio::task::spawn_blocking(move || lookup_all(&r, ids))
        .await
        .map_err(crate::Error::task)?
        .map_err(Into::into)
}

/// Where the index has each of `ids`. Call from a blocking thread.
fn lookup_all(
    repo: &Repository,
    ids: Vec<ChunkId>,
) -> blockvault_repo::Result<Vec<(ChunkId, Option<Location>)>> {
    ids.into_iter()
        .map(|id| Ok((id, repo.lookup_any(&id)?)))
        .collect()
}

fn distinct_slots(page: &ChunkMapPage) -> Vec<ChunkId> {
    let mut seen = HashSet::new();
    page.slots
        .iter()
        .flatten()
        .filter(|id| seen.insert(**id))
        .copied()
        .collect()
}

/// Every page of `pages`, loaded or the error, several loading at once.
fn load_pages(
    repo: &Arc<Repository>,
    pages: Vec<(ChunkId, usize)>,
) -> impl futures::Stream<Item = (ChunkId, blockvault_repo::Result<ChunkMapPage>)> {
    let loader = repo.clone();
    futures::stream::iter(pages)
        .map(move |(id, slots)| {
            let repo = loader.clone();
            async move { (id, repo.load_page(&id, slots).await) }
        })
        .buffer_unordered(PAGES_IN_FLIGHT)
}

/// The blobs `points` need, grouped by the pack the index has them in, for a run that reads only
/// those (a chunk the index has nowhere is left out: the reference check reports it). Pages are
/// loaded and their chunks looked up several at once (`on_page_threads`), and each page's result
/// is merged as it comes, so besides the result only the pages in flight are held, not every
/// page's chunk list at once.
pub(super) async fn wanted_blobs(
    repo: &Arc<Repository>,
    points: &[&PointManifest],
) -> Result<HashMap<PackId, Vec<(ChunkId, Location)>>> {
    let mut ids: Vec<ChunkId> = Vec::new();
    for p in points {
        for c in &p.configs {
            ids.extend(c.blobs.iter().map(|b| b.0));
        }
    }
    let pages = distinct_pages(points.iter().copied());
    ids.extend(pages.iter().map(|(id, _)| *id));
    let mut wanted = Wanted::default();
    wanted.add(locate_all(repo, ids).await?);
    on_page_threads(
        repo,
        pages,
        |repo, _, page| match page {
            Ok(page) => lookup_all(repo, distinct_slots(&page)),
            // Reported by the reference check after the read.
            Err(_) => Ok(Vec::new()),
        },
        |found| wanted.add(found),
    )
    .await?;
    Ok(wanted.finish())
}

/// The blobs found so far for a point-scoped run, per pack. A chunk that several pages share is
/// added once per page, and its repeats go when its pack's list is next compacted (sorted by
/// offset, repeats removed), which happens whenever the list has doubled since: a set of every
/// chunk seen, kept to add each once, took as much memory again as the lists
/// (docs/BENCHMARKS.md, "Point-scoped verify without a set of seen chunks").
#[derive(Default)]
struct Wanted {
    by_pack: HashMap<PackId, PackBlobs>,
}

#[derive(Default)]
struct PackBlobs {
    blobs: Vec<(ChunkId, Location)>,
    /// The list's length after its last compaction.
    compacted: usize,
}

impl PackBlobs {
    /// Below this many blobs a list is left as it is until the end.
    const COMPACT_FROM: usize = 256;

    fn compact(&mut self) {
        self.blobs.sort_unstable_by_key(|(_, l)| l.offset);
        self.blobs.dedup_by_key(|(_, l)| l.offset);
        self.compacted = self.blobs.len();
    }
}

impl Wanted {
    /// Adds the chunks the index has somewhere.
    fn add(&mut self, found: Vec<(ChunkId, Option<Location>)>) {
        for (id, loc) in found {
            let Some(l) = loc else { continue };
            let pack = self.by_pack.entry(l.pack).or_default();
            pack.blobs.push((id, l));
            if pack.blobs.len() >= (2 * pack.compacted).max(PackBlobs::COMPACT_FROM) {
                pack.compact();
            }
        }
    }

    /// Each pack's blobs, each once, in the order they are stored.
    fn finish(self) -> HashMap<PackId, Vec<(ChunkId, Location)>> {
        self.by_pack
            .into_iter()
            .map(|(pack, mut p)| {
                p.compact();
                p.blobs.shrink_to_fit();
                (pack, p.blobs)
            })
            .collect()
    }
}

/// Loads and judges every distinct page of `points` and looks up their config pieces.
pub(super) async fn check(
    repo: &Arc<Repository>,
    points: &[PointManifest],
    judge: &Arc<Judge>,
) -> Result<References> {
    let mut refs = References {
        pages: HashMap::new(),
        configs: HashMap::new(),
        unchecked: Vec::new(),
    };
    let config_ids: Vec<ChunkId> = points
        .iter()
        .flat_map(|p| p.configs.iter().flat_map(|c| c.blobs.iter().map(|b| b.0)))
        .collect();
    let (r, j) = (repo.clone(), judge.clone());
    refs.configs = tokio::task::spawn_blocking(move || {
        config_ids
            .into_iter()
            .map(|id| Ok((id, j.locate(&r, &id)?)))
            .collect::<Result<HashMap<_, _>>>()
    })
    .await
    .map_err(crate::Error::task)??;

    let judge = judge.clone();
    on_page_threads(
        repo,
        distinct_pages(points),
        move |repo, id, page| summarize(repo, &judge, id, page).map(|done| (id, done)),
        |(id, (summary, unchecked))| {
            refs.unchecked.extend(unchecked);
            refs.pages.insert(id, summary);
        },
    )
    .await?;
    Ok(refs)
}

/// Loads `pages` several at once and runs `work` on each, loaded or the error, on as many threads
/// of our own as there are cores, handing each result to `each` as it comes; the first error any
/// page's work returned is returned once every page is done. The work looks chunks
/// up in the local index, whose block reads and cache entries are allocated by the thread that
/// looks; spread over the runtime's blocking pool (dozens of threads, each with a malloc arena of
/// its own) they left every arena holding fragments, and the peak grew with the repository
/// (docs/OPERATIONS.md, "Memory").
async fn on_page_threads<T, E, W>(
    repo: &Arc<Repository>,
    pages: Vec<(ChunkId, usize)>,
    work: W,
    mut each: impl FnMut(T),
) -> Result<()>
where
    T: Send + 'static,
    E: Into<crate::Error> + Send + 'static,
    W: Fn(&Repository, ChunkId, blockvault_repo::Result<ChunkMapPage>) -> std::result::Result<T, E>
        + Send
        + Sync
        + 'static,
{
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (page_tx, page_rx) = tokio::sync::mpsc::channel(PAGES_IN_FLIGHT);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let worker_repo = repo.clone();
    let working = tokio::task::spawn_blocking(move || {
        let pages = std::sync::Mutex::new(page_rx);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (pages, done_tx) = (&pages, done_tx.clone());
                let (repo, work) = (&worker_repo, &work);
                scope.spawn(move || loop {
                    let next = pages
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .blocking_recv();
                    let Some((id, page)) = next else { break };
                    if done_tx.send(work(repo, id, page)).is_err() {
                        break;
                    }
                });
            }
        });
    });
    let feed = async move {
        let mut loaded = std::pin::pin!(load_pages(repo, pages));
        while let Some(page) = loaded.next().await {
            if page_tx.send(page).await.is_err() {
                break;
            }
        }
    };
    let collect = async {
        let mut first_error = None;
        while let Some(done) = done_rx.recv().await {
            match done {
                Ok(done) => each(done),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error
    };
    let ((), first_error) = tokio::join!(feed, collect);
    working.await.map_err(crate::Error::task)?;
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// Judges one page and its chunks. Call from a blocking thread.
/// Whether failing to read a page says its stored bytes are bad (damage) rather than that they
/// could not be read this time (a store or local I/O failure, a permission: not checked).
fn is_damage(e: &blockvault_repo::Error) -> bool {
    use blockvault_repo::Error as E;
    matches!(
        e,
        E::Tampered { .. } | E::Malformed { .. } | E::ChunkMissing { .. } | E::PackMissing { .. }
    )
}

fn summarize(
    repo: &Repository,
    judge: &Judge,
    id: ChunkId,
    page: blockvault_repo::Result<ChunkMapPage>,
) -> Result<(PageSummary, Option<Unchecked>)> {
    let mut summary = PageSummary::default();
    let page_loc = judge.locate(repo, &id)?;
    judge.tally(&mut summary.tally, &id, page_loc.as_ref());
    let known = judge.damage(&id, page_loc.as_ref());
    let page = match page {
        Ok(p) => p,
        Err(e) if known.is_none() && !is_damage(&e) => {
            summary.tally.add(0, false, None);
            let unchecked = Unchecked {
                object: format!("chunk-map page {id}"),
                detail: e.to_string(),
            };
            return Ok((summary, Some(unchecked)));
        }
        Err(e) => {
            summary.problem =
                known.or_else(|| Some((format!("chunk-map page {id}"), e.to_string())));
            return Ok((summary, None));
        }
    };
    summary.problem = known;
    // The page's distinct chunks and their locations, sorted by id (a slot finds its chunk by
    // binary search), in a list the judging thread keeps for its next page instead of a map of
    // up to 4,096 entries built per page.
    thread_local! {
        static LOCATED: std::cell::RefCell<Vec<(ChunkId, Option<Location>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    LOCATED.with(|cell| -> Result<()> {
        let mut located = cell.borrow_mut();
        located.clear();
        located.extend(page.slots.iter().flatten().map(|c| (*c, None)));
        located.sort_unstable_by_key(|(c, _)| *c);
        located.dedup_by_key(|(c, _)| *c);
        for (chunk, loc) in located.iter_mut() {
            *loc = judge.locate(repo, chunk)?;
            judge.tally(&mut summary.tally, chunk, loc.as_ref());
        }
        summary.chunks = located.len() as u32;
        for (slot, chunk) in page.slots.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            let at = located
                .binary_search_by_key(chunk, |(c, _)| *c)
                .expect("every slot's chunk is listed");
            if let Some(d) = judge.damage(chunk, located[at].1.as_ref()) {
                summary.damaged.push((slot as u32, d));
            }
        }
        Ok(())
    })?;
    Ok((summary, None))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use blockvault_repo::{KdfParams, OpenOptions, Storage};

    use super::*;

    /// The error a page's work returns for page `n`.
    fn failure(n: u8) -> blockvault_repo::Error {
        blockvault_repo::Error::Index {
            path: PathBuf::from("index"),
            detail: format!("lookup for page {n} failed"),
        }
    }

    fn chunk(tag: u8, n: u32) -> ChunkId {
        let mut id = [tag; 32];
        id[..4].copy_from_slice(&n.to_le_bytes());
        ChunkId(id)
    }

    fn at(pack: u8, offset: u32) -> Location {
        Location {
            pack: PackId([pack; 16]),
            offset,
            len: 100,
            raw_len: 200,
            kind: blockvault_repo::BlobKind::Data,
        }
    }

    /// Chunks that many pages share are added once per page; each pack's list stays within
    /// twice its distinct blobs (or the size below which it is not compacted), and the result
    /// holds each blob once, in offset order, and nothing the index had nowhere.
    #[test]
    fn wanted_blobs_keep_each_chunk_once_and_stay_within_twice_the_distinct() {
        let mut wanted = Wanted::default();
        // Pack 1 holds 300 chunks that 20 pages share; pack 2 holds 40 that each page has once.
        let shared: Vec<(ChunkId, Location)> = (0..300u32)
            .map(|n| (chunk(1, n), at(1, 1000 - n)))
            .collect();
        for page in 0..20u32 {
            let mut found: Vec<(ChunkId, Option<Location>)> =
                shared.iter().map(|(id, l)| (*id, Some(*l))).collect();
            found.extend((0..2u32).map(|k| {
                let n = page * 2 + k;
                (chunk(2, n), Some(at(2, n * 100)))
            }));
            found.push((chunk(3, page), None));
            wanted.add(found);
            let held = wanted.by_pack[&PackId([1; 16])].blobs.len();
            assert!(held <= 2 * 300, "page {page}: {held} held for 300 blobs");
        }
        let got = wanted.finish();
        assert_eq!(got.len(), 2);
        let mut want1 = shared.clone();
        want1.sort_by_key(|(_, l)| l.offset);
        assert_eq!(got[&PackId([1; 16])], want1);
        let want2: Vec<u32> = (0..40).map(|n| n * 100).collect();
        let got2: Vec<u32> = got[&PackId([2; 16])]
            .iter()
            .map(|(_, l)| l.offset)
            .collect();
        assert_eq!(got2, want2);
    }

    /// Pages whose work fails do not stop the others: every page is worked on once, every
    /// success reaches the caller, and one of the failures is returned once all are done (the
    /// index failing to answer for some pages must fail the run, not shorten it silently).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn page_threads_work_every_page_and_return_a_failure_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open("memory://", true).unwrap();
        Repository::init(&storage, b"pw", 64 << 10, KdfParams::with_memory(8 * 1024))
            .await
            .unwrap();
        let opts = OpenOptions {
            cache_dir: dir.path().join("cache"),
            zstd_level: 1,
        };
        let repo = Repository::open(storage, b"pw", &opts).await.unwrap();
        // Never stored: each page arrives as its load error, which the work sees.
        let pages: Vec<(ChunkId, usize)> = (0..64u8).map(|n| (ChunkId([n; 32]), 16)).collect();
        let worked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = worked.clone();
        let mut passed = Vec::new();
        let result = on_page_threads(
            &repo,
            pages,
            move |_, id, page| {
                seen.lock().unwrap().push(id.0[0]);
                assert!(page.is_err(), "page {} was never stored", id.0[0]);
                match id.0[0] % 10 {
                    3 => Err(failure(id.0[0])),
                    _ => Ok(id.0[0]),
                }
            },
            |n| passed.push(n),
        )
        .await;
        let mut worked = worked.lock().unwrap().clone();
        worked.sort_unstable();
        assert_eq!(worked, (0..64).collect::<Vec<u8>>());
        passed.sort_unstable();
        assert_eq!(passed, (0..64).filter(|n| n % 10 != 3).collect::<Vec<u8>>());
        let e = result
            .expect_err("a page's failure is returned")
            .to_string();
        assert!(
            [3, 13, 23, 33, 43, 53, 63]
                .iter()
                .any(|n| e.contains(&format!("lookup for page {n} failed"))),
            "{e}"
        );
    }
}
