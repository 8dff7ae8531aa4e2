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

mod reading;
mod references;
pub mod select;
mod state;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockvault_repo::{
    ChunkId, DiskDamage, LeaseKind, Location, PackId, PackResult, PointId, PointManifest,
    PointStatus, Repository, StorageStats, VerifyRecord, SLOTS_PER_PAGE,
};
use serde::Serialize;

use crate::progress::Progress;
use crate::Result;
use references::{Damage, Judge, References};
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
    /// Packs fetched ahead of the two being decoded.
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

/// The outcome a script or scheduler acts on (exit codes 0, 7 and 10 of the CLI).
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
    /// Earlier verify records this run merged into one summary record.
    pub records_merged: usize,
    pub points: usize,
    pub chunks_referenced: usize,
    pub packs: usize,
    pub bytes_stored: u64,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Packs the selection asked for that `--max-bytes` left out (of a rotation, those whose
    /// deadline has come); the next run takes them first.
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
    // Points before the index: a backup stores its packs and its index segment before its
    // manifest, so every chunk of a point listed here is in a segment the sync below reads. The
    // other way round, a backup finishing in between left a point whose new chunks (its config
    // pieces first: they are looked up before any page load re-syncs) the index did not know,
    // and it was reported and recorded as damaged.
    let (points, failed_manifests) = repo.list_points_from_store().await?;
    blockvault_repo::test_hold("verify-listed-points").await;
    let sync = repo.sync_index(true).await?;
    let (unreadable_manifests, mut unchecked_manifests) = sort_failed_manifests(failed_manifests);

    // Records before packs: a pack a record names existed before the record was stored, so one
    // missing from the listing that follows was deleted, and a summary may forget it.
    let mut history = History::load(&repo).await?;
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
    let mut listed_ids: HashMap<PackId, u64> = listed.iter().map(|(id, s, _)| (*id, *s)).collect();
    // Made now, from what earlier runs found; stored after this run's own record.
    let summary = match opts.record {
        true => history.summary(
            &opts.host,
            &listed_ids,
            listed.iter().map(|(_, _, t)| *t).min(),
        ),
        false => None,
    };
    let mut report = VerifyReport {
        verdict: Verdict::Clean,
        selection: opts.selection.describe(),
        run: None,
        record: None,
        records_merged: 0,
        points: points.len() + unreadable_manifests.len(),
        chunks_referenced: 0,
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

    for s in &sync.unreadable_segments {
        let (object, detail) = s.split_once(": ").unwrap_or((s.as_str(), ""));
        report.problems.push(Problem {
            object: object.to_string(),
            detail: format!(
                "{detail}; no data is lost (its packs were indexed from their own tables), but \
                 prune refuses to run until it is deleted (docs/OPERATIONS.md, \"An unreadable \
                 index segment\")"
            ),
            affected_points: Vec::new(),
            damage: Vec::new(),
        });
    }
    // Scope: the points whose data this run reads.
    let scoped = scope_points(&repo, &points, &opts).await?;
    let mut only: Option<HashMap<PackId, Vec<(ChunkId, Location)>>> = None;
    // Packs a prune condemned before the lease was taken may be deleted while this run reads:
    // no listed point needs them, so they are not read (a point that does is reported below).
    let condemned = repo.condemned_packs();
    let live = listed
        .iter()
        .filter(|(id, _, _)| !condemned.contains(id) && !repo.is_deleted(id));
    let candidates: Vec<select::PackState> = match &scoped {
        None => live
            .map(|(id, size, t)| history.pack_state(*id, *size, *t))
            .collect(),
        Some(scoped) => {
            let chosen: Vec<&PointManifest> = scoped.iter().map(|i| &points[*i]).collect();
            let grouped = references::wanted_blobs(&repo, &chosen).await?;
            // A point-scoped run reads the blobs the points need, so its bytes are theirs, and
            // a pack waits as long as the least recently read of them (select.rs).
            let c = live
                .filter_map(|(id, _, t)| Some(history.scoped_state(*id, *t, grouped.get(id)?)))
                .collect();
            only = Some(grouped);
            c
        }
    };

    let selection = match (&opts.selection, &scoped) {
        (Selection::None, Some(_)) => Selection::All,
        (s, _) => s.clone(),
    };
    if scoped.is_some() {
        // What was read, not what was typed: `--point P` alone reads all of P's blobs.
        report.selection = format!("{} of the chosen points", selection.describe());
    }
    // Only runs that read whole packs are numbered: rotation deadlines count them. A
    // point-scoped run reads single blobs and moves no pack's deadline; numbered, it would make
    // every pack due sooner, and a "5 %" run read far more. Unnumbered, it goes by read times.
    let run = history.next_run();
    let numbered = scoped.is_none().then_some(run);
    let chosen = select::select(&candidates, &selection, numbered, started, opts.max_bytes);
    report.overdue_packs = chosen.overdue.len();
    if selection != Selection::None {
        report.run = numbered;
    }

    // Read.
    blockvault_repo::test_hold("verify-reading").await;
    let sizes: HashMap<PackId, u64> = candidates.iter().map(|c| (c.id, c.size)).collect();
    progress
        .bytes_total
        .store(chosen.bytes, std::sync::atomic::Ordering::Relaxed);
    let mut results: Vec<PackResult> = Vec::new();
    let jobs: Vec<PackJob> = chosen
        .packs
        .iter()
        .map(|id| {
            let part = only.as_ref().map(|o| o[id].clone());
            (*id, listed_ids[id], sizes[id], part)
        })
        .collect();
    let mut vanished = Vec::new();
    reading::read_packs(&repo, jobs, opts.parallel, |charged, r| {
        Progress::add(&progress.bytes_done, charged);
        match r {
            // Deleted since the listing: nothing was read, and the points that need it are
            // judged as needing a pack that is gone, not by what earlier runs read of it.
            Ok(res) if res.outcome == blockvault_repo::PackOutcome::Missing => {
                vanished.extend(res.pack_id());
                results.push(res);
            }
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
    })
    .await;
    let finished = now_secs();

    for pack in &vanished {
        listed_ids.remove(pack);
    }
    // Packs this host found gone though no prune deleted them: named in this run's record, so
    // that every host counts their blobs damaged (no backup deduplicates against them, and
    // incrementals read those ranges from their source again).
    let mut lost_now = Vec::new();
    for l in repo.lost_packs().await? {
        if listed_ids.contains_key(&l.pack) {
            continue; // put back since: read like any other pack
        }
        let damaged = l
            .blobs
            .iter()
            .map(|(id, offset, len)| blockvault_repo::DamagedBlob {
                chunk: blockvault_repo::ChunkIdHex(*id),
                offset: *offset,
                len: *len,
                detail: state::LOST.into(),
            })
            .collect();
        results.push(state::lost_result(l.pack, damaged));
        lost_now.push(l.pack);
    }
    results.sort_by(|a, b| a.pack.cmp(&b.pack));
    let found_now = newly_damaged(&results, &history);
    history.apply(&results, finished);
    let mut lost: HashMap<ChunkId, PackId> = HashMap::new();
    for (pack, blobs) in &history.lost {
        if listed_ids.contains_key(pack) {
            continue;
        }
        for b in blobs {
            lost.insert(b.chunk.0, *pack);
        }
    }

    // References and damage, from this run and from earlier records.
    let judge = Arc::new(references::Judge {
        listed: listed_ids,
        history,
        lost,
    });
    let mut refs = references::check(&repo, &points, &judge).await?;
    report.chunks_referenced = refs.chunk_count();
    report.unchecked.append(&mut refs.unchecked);
    report.unchecked.append(&mut unchecked_manifests);
    attribute(&points, &refs, &judge, &unreadable_manifests, &mut report);
    report_unread_damage(&found_now, &mut report);
    report.point_states = point_states(&points, &refs, &judge, &unreadable_manifests);
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
            summary: None,
        };
        let name = repo.save_verify_record(&record).await?;
        report.record = Some(name.to_string());
        repo.forget_lost_packs(lost_now).await?;
    }
    if let Some((name, summary)) = summary {
        let merged = summary.summary.as_ref().map_or(0, |s| s.replaces.len());
        // Not a failed verify: the records stay, and a later run merges them.
        match repo.save_verify_summary(&summary, &name).await {
            Ok(()) => report.records_merged = merged,
            Err(e) => tracing::warn!("merging {merged} verify records into {name}: {e}"),
        }
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

/// Indexes (into `points`) of the points `--point` / `--vm` name, or `None` for all.
async fn scope_points(
    repo: &Repository,
    points: &[PointManifest],
    opts: &VerifyOptions,
) -> Result<Option<Vec<usize>>> {
    if opts.points.is_empty() && opts.vms.is_empty() {
        return Ok(None);
    }
    let mut out = HashSet::new();
    for text in &opts.points {
        let id = repo.resolve_point(text).await?;
        let i = points
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| blockvault_repo::Error::PointNotFound(text.clone()))?;
        out.insert(i);
    }
    for vm in &opts.vms {
        if !points.iter().any(|p| &p.vm == vm) {
            return Err(crate::Error::Invalid(format!(
                "--vm {vm}: no restore point of that VM"
            )));
        }
        out.extend(
            points
                .iter()
                .enumerate()
                .filter(|(_, p)| &p.vm == vm)
                .map(|(i, _)| i),
        );
    }
    let mut out: Vec<usize> = out.into_iter().collect();
    out.sort_unstable();
    Ok(Some(out))
}

/// Calls `f(disk, damage, range)` for every byte range of `point` that damage makes unreadable.
fn each_damage(
    point: &PointManifest,
    refs: &References,
    judge: &Judge,
    mut f: impl FnMut(&str, &Damage, (u64, u64)),
) {
    let cs = point.chunk_size as u64;
    for c in &point.configs {
        let disk = format!("config {}", c.name);
        for (i, b) in c.blobs.iter().enumerate() {
            let loc = refs.configs.get(&b.0).and_then(Option::as_ref);
            if let Some(d) = judge.damage(&b.0, loc) {
                let start = i as u64 * cs;
                f(&disk, &d, (start, (start + cs).min(c.size)));
            }
        }
    }
    for disk in &point.disks {
        for (page_no, page_id) in disk.pages.iter().enumerate() {
            let Some(page_id) = page_id else { continue };
            let Some(summary) = refs.pages.get(&page_id.0) else {
                continue;
            };
            let first = page_no as u64 * SLOTS_PER_PAGE as u64;
            if let Some(d) = &summary.problem {
                let end = ((first + SLOTS_PER_PAGE as u64) * cs).min(disk.size);
                f(&disk.name, d, (first * cs, end));
            }
            for (slot, d) in &summary.damaged {
                let s = (first + *slot as u64) * cs;
                f(&disk.name, d, (s, (s + cs).min(disk.size)));
            }
        }
    }
}

/// Per pack, the blobs this run found damaged that no earlier run had found damaged: (pack,
/// count, the first one's detail).
fn newly_damaged(results: &[PackResult], history: &History) -> Vec<(PackId, usize, String)> {
    results
        .iter()
        .filter_map(|r| {
            let pack = r.pack_id()?;
            let new: Vec<_> = r
                .damaged
                .iter()
                .filter(|d| history.damaged(&pack, d.offset).is_none())
                .collect();
            Some((pack, new.len(), new.first()?.detail.clone()))
        })
        .collect()
}

/// Damage this run found first, in packs no point's damage names: reported once, though no
/// restore point reads those blobs (each chunk is read from another copy, or no point needs it),
/// since a store that damages data is news. Later runs that find it again stay clean.
fn report_unread_damage(found: &[(PackId, usize, String)], report: &mut VerifyReport) {
    for (pack, n, detail) in found {
        let object = format!("pack {pack}");
        if report.problems.iter().any(|p| p.object == object) {
            continue;
        }
        report.problems.push(Problem {
            object,
            detail: format!(
                "{detail} ({n} blob(s) found damaged; no restore point reads them: their chunks \
                 are read from other copies, or no point needs them)"
            ),
            affected_points: Vec::new(),
            damage: Vec::new(),
        });
    }
}

/// Builds the problem list: every damaged object with the points, disks and ranges it affects.
fn attribute(
    points: &[PointManifest],
    refs: &References,
    judge: &Judge,
    unreadable_manifests: &[(PointId, blockvault_repo::Error)],
    report: &mut VerifyReport,
) {
    let mut problems: Vec<Problem> = Vec::new();
    let mut by_object: HashMap<String, usize> = HashMap::new();
    let mut add =
        |(object, detail): &Damage, point: &PointId, disk: &str, range: Option<(u64, u64)>| {
            let i = *by_object.entry(object.clone()).or_insert_with(|| {
                problems.push(Problem {
                    object: object.clone(),
                    detail: detail.clone(),
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
        let d = (format!("restore point {id} manifest"), e.to_string());
        add(&d, id, "", None);
    }
    for point in points {
        each_damage(point, refs, judge, |disk, d, range| {
            add(d, &point.id, disk, Some(range))
        });
    }
    for p in &mut problems {
        for d in &mut p.damage {
            d.ranges = merge_ranges(std::mem::take(&mut d.ranges));
        }
    }
    // Packs whose table is damaged but whose blobs are intact affect no point: still reported.
    for (pack, detail) in judge.history.table_damage() {
        if judge.listed.contains_key(&pack) && !by_object.contains_key(&format!("pack {pack}")) {
            problems.push(Problem {
                object: format!("pack {pack}"),
                detail,
                affected_points: Vec::new(),
                damage: Vec::new(),
            });
        }
    }
    report.problems.append(&mut problems);
}

/// Only a manifest that was read and does not open is damage. One a concurrent `forget` removed
/// since the listing is no longer a point; one the store failed to give was not checked, and must
/// not be reported (or alerted on) as damage. Returns (damaged, unchecked).
fn sort_failed_manifests(
    failed: Vec<(PointId, blockvault_repo::Error)>,
) -> (Vec<(PointId, blockvault_repo::Error)>, Vec<Unchecked>) {
    let (mut damaged, mut unchecked) = (Vec::new(), Vec::new());
    for (id, e) in failed {
        match e {
            blockvault_repo::Error::PointNotFound(_) => {}
            e if e.is_transient() => unchecked.push(Unchecked {
                object: format!("restore point {id} manifest"),
                detail: e.to_string(),
            }),
            e => damaged.push((id, e)),
        }
    }
    (damaged, unchecked)
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

/// Every point's verify state. A point's bytes are those of its config pieces and, per distinct
/// page, of the page and its distinct chunks (a chunk two pages share counts twice).
fn point_states(
    points: &[PointManifest],
    refs: &References,
    judge: &Judge,
    unreadable_manifests: &[(PointId, blockvault_repo::Error)],
) -> Vec<PointStatus> {
    let mut out = Vec::new();
    for (id, e) in unreadable_manifests {
        out.push(PointTally::default().finish(*id, Vec::new(), Some(e.to_string())));
    }
    for point in points {
        let mut tally = PointTally::default();
        let mut seen = HashSet::new();
        for c in &point.configs {
            for b in &c.blobs {
                if seen.insert(b.0) {
                    let loc = refs.configs.get(&b.0).and_then(Option::as_ref);
                    judge.tally(&mut tally, &b.0, loc);
                }
            }
        }
        for page_id in point.disks.iter().flat_map(|d| d.pages.iter().flatten()) {
            if seen.insert(page_id.0) {
                if let Some(s) = refs.pages.get(&page_id.0) {
                    tally.merge(&s.tally);
                }
            }
        }
        let mut by_disk: Vec<DiskDamage> = Vec::new();
        each_damage(point, refs, judge, |disk, _, range| {
            match by_disk.iter_mut().find(|d| d.disk == disk) {
                Some(d) => d.ranges.push(range),
                None => by_disk.push(DiskDamage {
                    disk: disk.to_string(),
                    ranges: vec![range],
                }),
            }
        });
        for d in &mut by_disk {
            d.ranges = merge_ranges(std::mem::take(&mut d.ranges));
        }
        if !by_disk.is_empty() {
            tally.damaged = true;
        }
        out.push(tally.finish(point.id, by_disk, None));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifests_that_do_not_open_are_damage() {
        let id = |n: u8| PointId([n; 8]);
        let failed = vec![
            (id(1), blockvault_repo::Error::PointNotFound("0101".into())),
            (
                id(2),
                blockvault_repo::Error::Store {
                    object: "points/0202".into(),
                    source: object_store::Error::Generic {
                        store: "S3",
                        source: "connection reset".into(),
                    },
                },
            ),
            (
                id(3),
                blockvault_repo::Error::Tampered {
                    object: "points/0303".into(),
                    detail: "authentication failed".into(),
                },
            ),
        ];
        let (damaged, unchecked) = sort_failed_manifests(failed);
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].0, id(3));
        assert_eq!(unchecked.len(), 1);
        assert_eq!(
            unchecked[0].object,
            format!("restore point {} manifest", id(2))
        );
    }
}
