//! Integrity verification as a library operation returning a serialisable report.
//!
//! Every run checks that every chunk and chunk-map page any restore point references is known to
//! the index and that its pack exists. Runs that read data choose packs with [`select`] (all, a
//! rotating share, a fixed slice, what was not verified recently, what some points need), read
//! them on every core and record what they found in a sealed verify record in the repository, so
//! every host sees which packs were read when, which blobs are damaged and each restore point's
//! state. Damage is attributed to the restore points, disks and byte ranges it affects. A run
//! writes nothing but its record.

/// One pack to read: its id, its listing number and size, and (for `--point`/`--vm`) only the
/// blobs wanted from it.
type PackJob = (PackId, u64, u64, Option<Vec<(ChunkId, Location)>>);

pub mod select;
mod state;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockvault_repo::{
    ChunkId, ChunkMapPage, DiskDamage, LeaseKind, Location, PackId, PackResult, PointId,
    PointManifest, PointStatus, Repository, StorageStats, VerifyRecord, SLOTS_PER_PAGE,
};
use futures::StreamExt;
use serde::Serialize;

use crate::progress::Progress;
use crate::Result;
pub use select::{parse_duration, Selection};
use state::{History, PointTally};

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// What to read (`Selection::None`: references only).
    pub selection: Selection,
    /// Only what these points need (ids or unique prefixes).
    pub points: Vec<String>,
    /// Only what the points of these VMs need.
    pub vms: Vec<String>,
    /// Cap on the bytes one run reads.
    pub max_bytes: Option<u64>,
    /// Packs read at once.
    pub parallel: usize,
    /// Host name stored in the record.
    pub host: String,
    /// Store a verify record (the default; off only for dry runs and tests).
    pub record: bool,
}

impl VerifyOptions {
    pub fn new(selection: Selection) -> Self {
        Self {
            selection,
            points: Vec::new(),
            vms: Vec::new(),
            max_bytes: None,
            parallel: 2,
            host: String::new(),
            record: true,
        }
    }
}

/// The outcome a script or scheduler acts on (exit codes 0, 7 and 9 of the CLI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Nothing damaged, everything asked for was checked.
    Clean,
    /// Damage found (now or by an earlier run, and not healed since).
    Damaged,
    /// Nothing damaged found, but some of what was asked for could not be checked.
    Incomplete,
}

/// Damaged byte ranges of one disk of one point.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PointDamage {
    pub point: String,
    pub disk: String,
    pub ranges: Vec<(u64, u64)>,
}

/// One damaged or missing object and what it affects.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub object: String,
    pub detail: String,
    pub affected_points: Vec<String>,
    /// The disk byte ranges lost through this object, per point and disk.
    pub damage: Vec<PointDamage>,
}

/// Something that could not be checked (the store failed, not the data).
#[derive(Clone, Debug, Serialize)]
pub struct Unchecked {
    pub object: String,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub verdict: Verdict,
    pub selection: String,
    /// Number of this data-reading run (rotations count by it).
    pub run: Option<u64>,
    /// Name of the verify record written.
    pub record: Option<String>,
    pub points: usize,
    pub chunks_referenced: usize,
    pub packs: usize,
    pub bytes_stored: u64,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Packs a rotation had to read now that `--max-bytes` left out.
    pub overdue_packs: usize,
    pub problems: Vec<Problem>,
    pub unchecked: Vec<Unchecked>,
    /// Every restore point's verify state after this run.
    pub point_states: Vec<PointStatus>,
    /// Object-store requests and bytes this run made (its egress is `bytes_downloaded`).
    pub storage: StorageStats,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.verdict == Verdict::Clean
    }
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(crate) fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Everything the restore points reference, loaded once.
struct References {
    points: Vec<PointManifest>,
    /// Decoded pages by id (`Err`: the page could not be read).
    pages: HashMap<ChunkId, std::result::Result<Arc<ChunkMapPage>, String>>,
    /// Every referenced chunk (data, pages, config pieces) and where the index has it.
    chunks: HashMap<ChunkId, Option<Location>>,
}

pub async fn verify(
    repo: Arc<Repository>,
    opts: VerifyOptions,
    progress: Arc<Progress>,
) -> Result<VerifyReport> {
    let started = now_secs();
    let stats_before = repo.storage().stats();
    // The lease keeps every pack condemned after this moment from being deleted while this run
    // reads it (docs/OPERATIONS.md, "Verify and prune"); packs condemned earlier are skipped
    // below. A run that records nothing writes nothing, not even a lease.
    let lease = if opts.record {
        Some(repo.take_lease(LeaseKind::Verify).await?)
    } else {
        None
    };
    // Plans again, though opening the repository read them: only a plan read after the lease
    // was taken is known to hold every condemnation the lease does not cover.
    repo.refresh_plans().await?;
    repo.sync_verify_records().await?;
    repo.sync_index(true).await?;

    let (points, unreadable_manifests) = repo.list_points().await?;
    let refs = load_references(&repo, points).await?;

    // Packs and their store times.
    let listed: Vec<(PackId, u64, i64)> = repo
        .storage()
        .list_with_times(blockvault_repo::format::PACKS_DIR)
        .await?
        .into_iter()
        .filter_map(|(name, size, t)| {
            let id = name.rsplit('/').next()?.parse::<PackId>().ok()?;
            Some((id, size, t))
        })
        .collect();
    let listed_ids: HashMap<PackId, u64> = listed.iter().map(|(id, s, _)| (*id, *s)).collect();

    let mut history = History::load(&repo).await?;
    let mut report = VerifyReport {
        verdict: Verdict::Clean,
        selection: opts.selection.describe(),
        run: None,
        record: None,
        points: refs.points.len() + unreadable_manifests.len(),
        chunks_referenced: refs.chunks.len(),
        packs: listed.len(),
        bytes_stored: listed.iter().map(|(_, s, _)| s).sum(),
        packs_read: 0,
        bytes_read: 0,
        overdue_packs: 0,
        problems: Vec::new(),
        unchecked: history
            .unreadable
            .iter()
            .map(|(n, e)| Unchecked {
                object: format!("verify record {n}"),
                detail: e.clone(),
            })
            .collect(),
        point_states: Vec::new(),
        storage: StorageStats::default(),
    };

    // Scope: the points whose data this run reads.
    let scoped = scope_points(&repo, &refs, &opts).await?;
    let mut only: Option<HashMap<PackId, Vec<(ChunkId, Location)>>> = None;
    // Packs a prune condemned before the lease was taken may be deleted while this run reads:
    // no listed point needs them, so they are not read (a point that does is reported below).
    let condemned = repo.condemned_packs();
    let mut candidates: Vec<select::PackState> = listed
        .iter()
        .filter(|(id, _, _)| !condemned.contains(id) && !repo.is_deleted(id))
        .map(|(id, size, t)| history.pack_state(*id, *size, *t))
        .collect();
    if let Some(scoped) = &scoped {
        let mut wanted: HashMap<ChunkId, Location> = HashMap::new();
        for (pi, p) in refs.points.iter().enumerate() {
            if !scoped.contains(&pi) {
                continue;
            }
            for_each_chunk(&refs, pi, |id| {
                if let Some(Some(l)) = refs.chunks.get(&id) {
                    wanted.insert(id, *l);
                }
            });
            let _ = p;
        }
        let grouped = blockvault_repo::by_pack(wanted);
        candidates.retain(|p| grouped.contains_key(&p.id));
        // A point-scoped run reads the blobs the points need, so its bytes are theirs.
        for c in &mut candidates {
            c.size = grouped[&c.id].iter().map(|(_, l)| l.len as u64).sum();
        }
        only = Some(grouped);
    }

    let selection = match (&opts.selection, &scoped) {
        (Selection::None, Some(_)) => Selection::All,
        (s, _) => s.clone(),
    };
    let run = history.next_run();
    let chosen = select::select(&candidates, &selection, run, started, opts.max_bytes);
    report.overdue_packs = chosen.overdue.len();
    let reads_data = selection != Selection::None;
    if reads_data {
        report.run = Some(run);
    }

    // Read.
    blockvault_repo::test_hold("verify-reading").await;
    let sizes: HashMap<PackId, u64> = candidates.iter().map(|c| (c.id, c.size)).collect();
    progress
        .bytes_total
        .store(chosen.bytes, std::sync::atomic::Ordering::Relaxed);
    let mut results: Vec<PackResult> = Vec::new();
    // Owned job descriptions: the stream must not borrow locals (the future stays `Send` for
    // callers that spawn it).
    let jobs: Vec<PackJob> = chosen
        .packs
        .iter()
        .map(|id| {
            let part = only.as_ref().map(|o| o[id].clone());
            (*id, listed_ids[id], sizes[id], part)
        })
        .collect();
    let reader = repo.clone();
    let mut stream = futures::stream::iter(jobs)
        .map(move |(id, size, charged, part)| {
            let repo = reader.clone();
            async move { (charged, repo.check_pack(id, size, part).await) }
        })
        .buffer_unordered(opts.parallel.max(1));
    while let Some((charged, r)) = stream.next().await {
        Progress::add(&progress.bytes_done, charged);
        match r {
            Ok(res) => {
                report.packs_read += 1;
                report.bytes_read += charged;
                results.push(res);
            }
            Err(u) => report.unchecked.push(Unchecked {
                object: format!("pack {}", u.pack),
                detail: u.error.to_string(),
            }),
        }
    }
    drop(stream);
    let finished = now_secs();
    results.sort_by(|a, b| a.pack.cmp(&b.pack));
    history.apply(&results, finished);

    // Damage, from this run and from earlier records.
    attribute(
        &refs,
        &listed_ids,
        &history,
        &unreadable_manifests,
        &mut report,
    );
    report.point_states = point_states(&refs, &listed_ids, &history, &unreadable_manifests);
    report.verdict = if !report.problems.is_empty() {
        Verdict::Damaged
    } else if !report.unchecked.is_empty() {
        Verdict::Incomplete
    } else {
        Verdict::Clean
    };

    if opts.record {
        let record = VerifyRecord {
            version: 1,
            host: opts.host.clone(),
            started: rfc3339(started),
            finished: rfc3339(finished),
            run: report.run,
            selection: report.selection.clone(),
            packs: results,
            points: report.point_states.clone(),
        };
        let name = repo.save_verify_record(&record).await?;
        report.record = Some(name.to_string());
    }
    if let Some(l) = lease {
        if let Err(e) = l.release().await {
            // A stale lease goes by itself (it is no longer refreshed): not a failed verify.
            tracing::warn!("releasing the verify lease: {e}");
        }
    }
    let after = repo.storage().stats();
    report.storage = StorageStats {
        requests: after.requests - stats_before.requests,
        bytes_uploaded: after.bytes_uploaded - stats_before.bytes_uploaded,
        bytes_downloaded: after.bytes_downloaded - stats_before.bytes_downloaded,
    };
    Ok(report)
}

/// Loads every point's pages (each distinct page once) and looks up every referenced chunk.
async fn load_references(repo: &Arc<Repository>, points: Vec<PointManifest>) -> Result<References> {
    let mut refs = References {
        points,
        pages: HashMap::new(),
        chunks: HashMap::new(),
    };
    let mut wanted: Vec<(ChunkId, usize)> = Vec::new();
    let mut asked: HashSet<ChunkId> = HashSet::new();
    for point in &refs.points {
        for disk in &point.disks {
            let chunks = disk.size.div_ceil(point.chunk_size as u64);
            for (page_no, page_id) in disk.pages.iter().enumerate() {
                let Some(page_id) = page_id else { continue };
                let first = page_no as u64 * SLOTS_PER_PAGE as u64;
                let slots = chunks.saturating_sub(first).min(SLOTS_PER_PAGE as u64) as usize;
                if asked.insert(page_id.0) {
                    wanted.push((page_id.0, slots));
                }
            }
        }
    }
    let pager = repo.clone();
    let loaded: Vec<(ChunkId, std::result::Result<ChunkMapPage, String>)> =
        futures::stream::iter(wanted)
            .map(move |(id, slots)| {
                let repo = pager.clone();
                async move {
                    let r = repo.load_page(&id, slots).await.map_err(|e| e.to_string());
                    (id, r)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    for (id, r) in loaded {
        refs.pages.insert(id, r.map(Arc::new));
    }
    let mut ids: HashSet<ChunkId> = HashSet::new();
    for (page_id, page) in &refs.pages {
        ids.insert(*page_id);
        if let Ok(p) = page {
            ids.extend(p.slots.iter().flatten().copied());
        }
    }
    for p in &refs.points {
        for c in &p.configs {
            ids.extend(c.blobs.iter().map(|b| b.0));
        }
    }
    let r = repo.clone();
    refs.chunks = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .map(|id| Ok((id, r.lookup_any(&id)?)))
            .collect::<std::result::Result<HashMap<_, _>, blockvault_repo::Error>>()
    })
    .await
    .map_err(crate::Error::task)??;
    Ok(refs)
}

/// Calls `f` with every chunk point `pi` needs (its pages, their chunks, its config pieces).
fn for_each_chunk(refs: &References, pi: usize, mut f: impl FnMut(ChunkId)) {
    let point = &refs.points[pi];
    for c in &point.configs {
        for b in &c.blobs {
            f(b.0);
        }
    }
    for disk in &point.disks {
        for page_id in disk.pages.iter().flatten() {
            f(page_id.0);
            if let Some(Ok(page)) = refs.pages.get(&page_id.0) {
                for id in page.slots.iter().flatten() {
                    f(*id);
                }
            }
        }
    }
}

/// Indexes (into `refs.points`) of the points `--point` / `--vm` name, or `None` for all.
async fn scope_points(
    repo: &Repository,
    refs: &References,
    opts: &VerifyOptions,
) -> Result<Option<HashSet<usize>>> {
    if opts.points.is_empty() && opts.vms.is_empty() {
        return Ok(None);
    }
    let mut out = HashSet::new();
    for text in &opts.points {
        let id = repo.resolve_point(text).await?;
        let i = refs
            .points
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| blockvault_repo::Error::PointNotFound(text.clone()))?;
        out.insert(i);
    }
    for vm in &opts.vms {
        let before = out.len();
        out.extend(
            refs.points
                .iter()
                .enumerate()
                .filter(|(_, p)| &p.vm == vm)
                .map(|(i, _)| i),
        );
        if out.len() == before && !refs.points.iter().any(|p| &p.vm == vm) {
            return Err(crate::Error::Invalid(format!(
                "--vm {vm}: no restore point of that VM"
            )));
        }
    }
    Ok(Some(out))
}

/// Why a chunk cannot be read, if it cannot.
fn chunk_damage(
    id: &ChunkId,
    refs: &References,
    listed: &HashMap<PackId, u64>,
    history: &History,
) -> Option<(String, String)> {
    match refs.chunks.get(id) {
        None => None,
        Some(None) => Some((
            format!("chunk {id}"),
            "referenced chunk is missing: no pack holds it".into(),
        )),
        Some(Some(l)) if !listed.contains_key(&l.pack) => Some((
            format!("pack {}", l.pack),
            "missing from the repository".into(),
        )),
        Some(Some(l)) => history
            .damaged(&l.pack, l.offset)
            .map(|d| (format!("pack {}", l.pack), d.to_string())),
    }
}

/// Builds the problem list: every damaged object with the points, disks and ranges it affects.
fn attribute(
    refs: &References,
    listed: &HashMap<PackId, u64>,
    history: &History,
    unreadable_manifests: &[(PointId, blockvault_repo::Error)],
    report: &mut VerifyReport,
) {
    let mut problems: Vec<Problem> = Vec::new();
    let mut by_object: HashMap<String, usize> = HashMap::new();
    let mut add =
        |object: String, detail: String, point: &PointId, disk: &str, range: Option<(u64, u64)>| {
            let i = *by_object.entry(object.clone()).or_insert_with(|| {
                problems.push(Problem {
                    object,
                    detail,
                    affected_points: Vec::new(),
                    damage: Vec::new(),
                });
                problems.len() - 1
            });
            let p = &mut problems[i];
            let ph = point.to_hex();
            if !p.affected_points.contains(&ph) {
                p.affected_points.push(ph.clone());
            }
            if let Some(r) = range {
                match p
                    .damage
                    .iter_mut()
                    .find(|d| d.point == ph && d.disk == disk)
                {
                    Some(d) => d.ranges.push(r),
                    None => p.damage.push(PointDamage {
                        point: ph,
                        disk: disk.to_string(),
                        ranges: vec![r],
                    }),
                }
            }
        };
    for (id, e) in unreadable_manifests {
        add(
            format!("restore point {id} manifest"),
            e.to_string(),
            id,
            "",
            None,
        );
    }
    for (pi, point) in refs.points.iter().enumerate() {
        let cs = point.chunk_size as u64;
        for c in &point.configs {
            for (i, b) in c.blobs.iter().enumerate() {
                if let Some((obj, why)) = chunk_damage(&b.0, refs, listed, history) {
                    let start = i as u64 * cs;
                    let range = (start, (start + cs).min(c.size));
                    add(
                        obj,
                        why,
                        &point.id,
                        &format!("config {}", c.name),
                        Some(range),
                    );
                }
            }
        }
        for disk in &point.disks {
            for (page_no, page_id) in disk.pages.iter().enumerate() {
                let Some(page_id) = page_id else { continue };
                let first = page_no as u64 * SLOTS_PER_PAGE as u64;
                let page_range = (
                    first * cs,
                    ((first + SLOTS_PER_PAGE as u64) * cs).min(disk.size),
                );
                let page_problem = match (
                    chunk_damage(&page_id.0, refs, listed, history),
                    refs.pages.get(&page_id.0),
                ) {
                    (Some(d), _) => Some(d),
                    (None, Some(Err(e))) => Some((
                        format!("chunk-map page {} of disk '{}'", page_id.0, disk.name),
                        e.clone(),
                    )),
                    (None, _) => None,
                };
                if let Some((obj, why)) = page_problem {
                    add(obj, why, &point.id, &disk.name, Some(page_range));
                }
                let Some(Ok(page)) = refs.pages.get(&page_id.0) else {
                    continue;
                };
                for (i, slot) in page.slots.iter().enumerate() {
                    let Some(id) = slot else { continue };
                    if let Some((obj, why)) = chunk_damage(id, refs, listed, history) {
                        let s = (first + i as u64) * cs;
                        add(
                            obj,
                            why,
                            &point.id,
                            &disk.name,
                            Some((s, (s + cs).min(disk.size))),
                        );
                    }
                }
            }
        }
        let _ = pi;
    }
    for p in &mut problems {
        for d in &mut p.damage {
            d.ranges = merge_ranges(std::mem::take(&mut d.ranges));
        }
    }
    // Packs whose table is damaged but whose blobs are intact affect no point: still reported.
    for (pack, detail) in history.table_damage() {
        if listed.contains_key(&pack) && !by_object.contains_key(&format!("pack {pack}")) {
            problems.push(Problem {
                object: format!("pack {pack}"),
                detail,
                affected_points: Vec::new(),
                damage: Vec::new(),
            });
        }
    }
    report.problems = problems;
}

/// Sorted, touching ranges joined.
pub(crate) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Every point's verify state.
fn point_states(
    refs: &References,
    listed: &HashMap<PackId, u64>,
    history: &History,
    unreadable_manifests: &[(PointId, blockvault_repo::Error)],
) -> Vec<PointStatus> {
    let mut out = Vec::new();
    for (id, e) in unreadable_manifests {
        out.push(PointTally::default().finish(*id, Vec::new(), Some(e.to_string())));
    }
    for (pi, point) in refs.points.iter().enumerate() {
        let mut tally = PointTally::default();
        let mut seen = HashSet::new();
        for_each_chunk(refs, pi, |id| {
            if !seen.insert(id) {
                return;
            }
            let loc = refs.chunks.get(&id).copied().flatten();
            let damaged = chunk_damage(&id, refs, listed, history).is_some();
            tally.add(
                loc.map_or(0, |l| l.len as u64),
                damaged,
                loc.and_then(|l| history.verified_at(&l)),
            );
        });
        let mut damage: Vec<DiskDamage> = Vec::new();
        if tally.damaged {
            // Ranges per disk, as in the problem list.
            let cs = point.chunk_size as u64;
            for disk in &point.disks {
                let mut ranges = Vec::new();
                for (page_no, page_id) in disk.pages.iter().enumerate() {
                    let Some(page_id) = page_id else { continue };
                    let first = page_no as u64 * SLOTS_PER_PAGE as u64;
                    let page_bad = matches!(refs.pages.get(&page_id.0), Some(Err(_)))
                        || chunk_damage(&page_id.0, refs, listed, history).is_some();
                    if page_bad {
                        ranges.push((
                            first * cs,
                            ((first + SLOTS_PER_PAGE as u64) * cs).min(disk.size),
                        ));
                        continue;
                    }
                    if let Some(Ok(page)) = refs.pages.get(&page_id.0) {
                        for (i, slot) in page.slots.iter().enumerate() {
                            if let Some(id) = slot {
                                if chunk_damage(id, refs, listed, history).is_some() {
                                    let s = (first + i as u64) * cs;
                                    ranges.push((s, (s + cs).min(disk.size)));
                                }
                            }
                        }
                    }
                }
                if !ranges.is_empty() {
                    damage.push(DiskDamage {
                        disk: disk.name.clone(),
                        ranges: merge_ranges(ranges),
                    });
                }
            }
            for c in &point.configs {
                if c.blobs
                    .iter()
                    .any(|b| chunk_damage(&b.0, refs, listed, history).is_some())
                {
                    damage.push(DiskDamage {
                        disk: format!("config {}", c.name),
                        ranges: vec![(0, c.size)],
                    });
                }
            }
        }
        out.push(tally.finish(point.id, damage, None));
    }
    out
}

/// A pack's state as `points list` shows it; re-exported for the CLI.
pub fn describe_state(s: &PointStatus) -> String {
    use blockvault_repo::PointVerifyState::*;
    match s.state {
        Verified => format!("verified {}", s.verified.as_deref().unwrap_or("")),
        Partly => format!(
            "partly verified ({:.0} %)",
            if s.bytes == 0 {
                0.0
            } else {
                s.bytes_verified as f64 * 100.0 / s.bytes as f64
            }
        ),
        Damaged => {
            let disks: Vec<String> = s
                .damage
                .iter()
                .map(|d| {
                    let lost: u64 = d.ranges.iter().map(|(a, b)| b - a).sum();
                    format!("{} ({} bytes in {} ranges)", d.disk, lost, d.ranges.len())
                })
                .collect();
            if disks.is_empty() {
                format!(
                    "damaged: {}",
                    s.detail.as_deref().unwrap_or("manifest unreadable")
                )
            } else {
                format!("damaged: {}", disks.join(", "))
            }
        }
        Never => "never verified".into(),
    }
}
