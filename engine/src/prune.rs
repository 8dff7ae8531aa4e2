//! `prune`: reclaims the space of packs no restore point needs, in two phases with a grace
//! period between them, safely while other hosts back up into the same repository.
//!
//! One run n:
//! 1. claims epoch n (a second prune fails with "prune already running");
//! 2. reads the previous plan's condemned packs and splits them by the sweep rules (`gc.rs`);
//! 3. lists packs, then every restore point, and marks the live chunk set (every manifest and
//!    its chunk-map pages). Any list or read error stops the run here, before any deletion;
//! 4. takes back eligible condemned packs that hold a live chunk with no copy in a pack no plan
//!    condemns, deletes the rest;
//! 5. condemns dead packs (older than the grace period and than every live lease);
//! 6. repacks mostly-dead packs under the same conditions: copies their live blobs, checked and
//!    still sealed, into new packs and an index segment of their own, and condemns them;
//! 7. merges small index segments into larger ones;
//! 8. publishes plan n, which names the packs it deletes and the segments every host re-reads
//!    first (the keepers of other copies, the repack's and the merged segments);
//! 9. only then deletes those packs, any pack an earlier plan recorded deleted that is still
//!    there (a run stopped between its plan and its deletions), and the index segments it
//!    retired: those whose every pack is deleted and those merged.
//!
//! Killed at any step, the repository stays consistent: no pack is deleted before a published
//! plan says so and names where the other copies of its live chunks are, so a host whose index
//! still points at a deleted copy finds the other one by applying that plan; a repack's new packs
//! are extra copies until a plan names them; the next prune takes over the dead claim and
//! finishes the work.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use blockvault_repo::{
    ChunkId, Condemned, LeaseKind, Listed, ObjectKind, ObjectName, PackEntry, PackId, PackRecord,
    Plan, PointId, PointManifest, Repository, SegmentId, StorageStats,
};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::compact::{copy_live, merge_segments};
use crate::gc::{self, LeaseFact, PackFact, PackUsage, RepackLimits, SegmentFact, Wait};
use crate::{Error, Result};

/// How `prune` runs.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Time between condemning a pack and deleting it.
    pub grace: Duration,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// The share of the kept packs' bytes that may stay unused before partly dead packs are
    /// repacked (0.05: 5 %; 1.0 never repacks).
    pub max_unused: f64,
    /// The most live bytes one run copies while repacking.
    pub max_repack: u64,
    /// Size of the packs a repack writes.
    pub pack_size: usize,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(24 * 3600),
            dry_run: false,
            max_unused: 0.05,
            max_repack: u64::MAX,
            pack_size: 16 << 20,
        }
    }
}

/// Packs and their bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PackCount {
    pub packs: u64,
    pub bytes: u64,
}

impl PackCount {
    pub(crate) fn add(&mut self, bytes: u64) {
        self.packs += 1;
        self.bytes += bytes;
    }
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    /// The epoch claimed (0 for a dry run, which claims nothing).
    pub epoch: u64,
    pub dry_run: bool,
    /// Restore points marked live.
    pub points: u64,
    pub live_chunks: u64,
    /// Packs in the repository when listed, and their bytes.
    pub packs_listed: PackCount,
    /// Condemned packs deleted by this run's sweep.
    pub deleted: PackCount,
    /// Condemned packs taken back because a restore point needs them again.
    pub recovered: PackCount,
    /// Packs condemned by this run.
    pub condemned: PackCount,
    /// Condemned packs not deleted yet (this run's and older ones), and when they become
    /// deletable at the earliest (store time, RFC 3339; absent when none or held by a lease).
    pub pending: PackCount,
    pub pending_deletable_at: Option<String>,
    /// Condemned packs whose deletion waits for a live lease older than their condemnation.
    pub held_by_leases: PackCount,
    /// Partly dead packs condemned after their live blobs were copied (the bytes are the old
    /// packs' sizes).
    pub repacked: PackCount,
    /// The new packs that repack wrote, and their bytes.
    pub repack_written: PackCount,
    /// Bytes of dead blobs inside packs that stay, before and after this run's repack.
    pub unused_before: u64,
    pub unused_after: u64,
    /// Packs the repack chose but could not copy (a damaged or unreadable blob): they stay as
    /// they are, and the reason is given; `verify` reports the same damage.
    pub repack_skipped: Vec<String>,
    /// Index segments deleted: those whose every pack is deleted, and those merged.
    pub segments_retired: u64,
    /// Small index segments merged into `segments_written` new ones.
    pub segments_merged: u64,
    pub segments_written: u64,
    /// Object-store requests this run made.
    pub storage: StorageStats,
    pub duration_ms: u64,
}

/// A store time (Unix milliseconds) as RFC 3339.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Objects read at once while marking.
const PARALLEL: usize = 16;

/// The live chunk set: every chunk, page and file blob any of `points` references. Any read
/// error is returned: a prune must not decide with a partial mark.
pub async fn mark(repo: &Arc<Repository>, points: &[PointManifest]) -> Result<HashSet<ChunkId>> {
    let mut live = HashSet::new();
    let mut pages = Vec::new();
    for p in points {
        for c in &p.configs {
            live.extend(c.blobs.iter().map(|b| b.0));
        }
        for d in &p.disks {
            for (n, page) in d.pages.iter().enumerate() {
                let Some(page) = page else { continue };
                if live.insert(page.0) {
                    pages.push((page.0, d.page_slots(p.chunk_size, n)));
                }
            }
        }
    }
    // Pages are content-addressed and shared between points: each is read once, and merged as
    // it arrives: a page's slots take up to 128 KiB, and an estate may have hundreds of
    // thousands of distinct pages.
    futures::stream::iter(pages)
        .map(|(id, slots)| {
            let repo = repo.clone();
            async move { repo.load_page(&id, slots).await }
        })
        .buffer_unordered(PARALLEL)
        .map_err(Error::from)
        .try_fold(live, |mut live, page| async move {
            live.extend(page.slots.into_iter().flatten());
            Ok(live)
        })
        .await
}

/// Splits the pack listing into the packs this run decides about and those a published plan
/// already recorded deleted (a run stopped after publishing its plan and before deleting them).
/// Every reader has stopped trusting the latter, so they are deleted without further ado; they
/// must not count as copies of anything, nor be condemned again.
fn split_leftovers(repo: &Repository, packs: Vec<Listed>) -> (Vec<Listed>, Vec<(PackId, u64)>) {
    let mut leftover = Vec::new();
    let kept = packs
        .into_iter()
        .filter(|l| match l.name {
            ObjectName::Pack(id) if repo.is_deleted(&id) => {
                leftover.push((id, l.size));
                false
            }
            _ => true,
        })
        .collect();
    (kept, leftover)
}

/// The manifests that stop a prune: those listed that could not be read, except those gone
/// since the listing. A manifest gone before it was read is no restore point any more (a forget
/// on another host, or a backup that took its manifest back): nothing to mark. A point
/// committed since the listing is caught by the next run's re-mark, as ever.
fn really_unreadable(
    unreadable: Vec<(PointId, blockvault_repo::Error)>,
) -> Vec<(PointId, blockvault_repo::Error)> {
    unreadable
        .into_iter()
        .filter(|(id, e)| {
            let gone = matches!(e, blockvault_repo::Error::PointNotFound(_));
            if gone {
                tracing::debug!(point = %id, "manifest gone since the listing; not marked");
            }
            !gone
        })
        .collect()
}

/// The index segments listed: the packs each names, and its store time.
#[derive(Default)]
struct Segments {
    named: HashMap<SegmentId, Vec<PackId>>,
    modified_ms: HashMap<SegmentId, i64>,
}

/// The live chunks of which each pack holds a copy that can stand in for another: one
/// verification has not found damaged. Deleting the only good copy because a damaged one exists
/// would undo the backup that healed the chunk.
fn good_copies(
    repo: &Repository,
    contents: &HashMap<PackId, Vec<PackEntry>>,
    live: &HashSet<ChunkId>,
) -> HashMap<PackId, Vec<ChunkId>> {
    contents
        .iter()
        .filter_map(|(p, entries)| {
            let mut ids: Vec<ChunkId> = entries
                .iter()
                .filter(|e| live.contains(&e.id) && !repo.is_damaged_at(p, e.offset))
                .map(|e| e.id)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            (!ids.is_empty()).then_some((*p, ids))
        })
        .collect()
}

/// Where the other copies of the live chunks of the packs deleted now are (those packs are
/// deletable because such copies exist). A host whose index points at a deleted copy must learn
/// them, or the chunk is left with no location there.
enum Keepers {
    /// The packs holding those copies.
    Packs(HashSet<PackId>),
    /// A pack to delete is already gone (removed by hand, or by a run of an earlier version,
    /// which deleted before publishing): what it held is unknown, so hosts re-read every
    /// segment.
    Unknown,
}

fn keepers(
    to_delete: &[Condemned],
    listed: &HashSet<PackId>,
    live_in: &HashMap<PackId, Vec<ChunkId>>,
    holders: &HashMap<PackId, Vec<ChunkId>>,
    condemned: &HashSet<PackId>,
) -> Keepers {
    if to_delete.iter().any(|c| !listed.contains(&c.pack)) {
        return Keepers::Unknown;
    }
    let orphaned: HashSet<ChunkId> = to_delete
        .iter()
        .filter_map(|c| live_in.get(&c.pack))
        .flatten()
        .copied()
        .collect();
    Keepers::Packs(if orphaned.is_empty() {
        HashSet::new()
    } else {
        holders
            .iter()
            .filter(|(p, ids)| !condemned.contains(p) && ids.iter().any(|id| orphaned.contains(id)))
            .map(|(p, _)| *p)
            .collect()
    })
}

/// The segments a plan names for re-reading so that hosts find the keepers: those listing them,
/// and, for keepers no segment lists (a backup killed before its segment), one written now.
async fn keepers_segments(
    repo: &Arc<Repository>,
    keepers: Keepers,
    by_segment: &Segments,
    record: &(dyn Fn(&PackId) -> Option<PackRecord> + Sync),
) -> Result<Vec<SegmentId>> {
    let keepers = match keepers {
        Keepers::Unknown => {
            let mut all: Vec<SegmentId> = by_segment.named.keys().copied().collect();
            all.sort_unstable();
            return Ok(all);
        }
        Keepers::Packs(k) if k.is_empty() => return Ok(Vec::new()),
        Keepers::Packs(k) => k,
    };
    let mut segments: Vec<SegmentId> = Vec::new();
    let mut listed_somewhere = HashSet::new();
    for (s, packs) in &by_segment.named {
        let mine: Vec<PackId> = packs
            .iter()
            .filter(|p| keepers.contains(p))
            .copied()
            .collect();
        if !mine.is_empty() {
            segments.push(*s);
            listed_somewhere.extend(mine);
        }
    }
    let mut unlisted: Vec<PackId> = keepers.difference(&listed_somewhere).copied().collect();
    unlisted.sort_unstable();
    let records: Vec<PackRecord> = unlisted.iter().filter_map(record).collect();
    if !records.is_empty() {
        segments.push(repo.write_segment(&records).await?);
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Records one segment read: the packs it names, and the entries of the listed packs no
/// segment read before gave (every copy of a pack's record is the same).
fn absorb_segment(
    contents: &mut HashMap<PackId, Vec<PackEntry>>,
    by_segment: &mut Segments,
    listed: &HashSet<PackId>,
    sid: SegmentId,
    modified_ms: i64,
    records: Vec<PackRecord>,
) {
    by_segment.modified_ms.insert(sid, modified_ms);
    by_segment
        .named
        .insert(sid, records.iter().map(|r| r.id).collect());
    for r in records {
        if listed.contains(&r.id) {
            contents.entry(r.id).or_insert(r.entries);
        }
    }
}

/// Every listed pack's entries, from the index segments and, for packs no segment covers, from
/// the pack's own table of contents. Authoritative (every copy of a chunk counts), unlike the
/// local index, which keeps one location per chunk.
async fn pack_contents(
    repo: &Arc<Repository>,
    listed: &HashSet<PackId>,
) -> Result<(HashMap<PackId, Vec<PackEntry>>, Segments)> {
    let segments: Vec<(SegmentId, i64)> = repo
        .list_objects(ObjectKind::Segment)
        .await?
        .into_iter()
        .filter_map(|l| match l.name {
            ObjectName::Segment(id) => Some((id, l.modified_ms)),
            _ => None,
        })
        .collect();
    // Each segment is absorbed as it arrives: only the entries of listed packs not seen yet are
    // kept, never every segment's records at once (merged segments hold up to 262,144 entries).
    let (mut contents, by_segment) = futures::stream::iter(segments)
        .map(|(id, modified_ms)| {
            let repo = repo.clone();
            async move { Ok::<_, Error>((id, modified_ms, repo.read_segment(&id).await?)) }
        })
        .buffer_unordered(PARALLEL)
        .try_fold(
            (HashMap::new(), Segments::default()),
            |(mut contents, mut by_segment), (sid, modified_ms, records)| async move {
                absorb_segment(
                    &mut contents,
                    &mut by_segment,
                    listed,
                    sid,
                    modified_ms,
                    records,
                );
                Ok((contents, by_segment))
            },
        )
        .await?;
    let uncovered: Vec<PackId> = listed
        .iter()
        .filter(|p| !contents.contains_key(p))
        .copied()
        .collect();
    let tocs: Vec<(PackId, Vec<PackEntry>)> = futures::stream::iter(uncovered)
        .map(|id| {
            let repo = repo.clone();
            async move { Ok::<_, Error>((id, repo.read_toc(&id).await?)) }
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;
    contents.extend(tocs);
    Ok((contents, by_segment))
}

/// What happens to the index segments: those to delete because every pack they name is gone
/// (or a killed run retired them already), and groups of small ones to merge.
struct SegmentPlan {
    retired: Vec<SegmentId>,
    merge: Vec<Vec<SegmentId>>,
}

#[allow(clippy::too_many_arguments)]
fn segment_decisions(
    repo: &Repository,
    segments: &Segments,
    contents: &HashMap<PackId, Vec<PackEntry>>,
    listed: &HashSet<PackId>,
    gone: &HashSet<PackId>,
    previous: Option<&Plan>,
    now_ms: i64,
    grace_ms: u64,
    leases: &[LeaseFact],
) -> SegmentPlan {
    let known = |p: &PackId| listed.contains(p) || repo.is_deleted(p);
    let stays = |p: &PackId| listed.contains(p) && !gone.contains(p);
    let mut retired: Vec<SegmentId> = segments
        .named
        .iter()
        .filter(|(_, ps)| !ps.is_empty() && ps.iter().all(|p| !stays(p) && known(p)))
        .map(|(s, _)| *s)
        .collect();
    // Merged or retired by a run killed before it deleted them.
    if let Some(prev) = previous {
        for s in &prev.retired_segments {
            if segments.named.contains_key(s) && !retired.contains(s) {
                retired.push(*s);
            }
        }
    }
    let facts: Vec<SegmentFact> = segments
        .named
        .iter()
        .filter(|(s, _)| !retired.contains(s))
        .map(|(s, ps)| SegmentFact {
            id: *s,
            modified_ms: segments.modified_ms[s],
            packs: ps.iter().filter(|p| stays(p)).count(),
            entries: ps
                .iter()
                .filter(|p| stays(p))
                .map(|p| contents.get(p).map_or(0, Vec::len))
                .sum(),
            known: ps.iter().all(known),
        })
        .collect();
    SegmentPlan {
        merge: gc::choose_consolidation(&facts, now_ms, grace_ms, leases),
        retired,
    }
}

/// Runs one prune. See the module documentation for the steps and their guarantees.
pub async fn prune(repo: Arc<Repository>, opts: PruneOptions) -> Result<PruneReport> {
    let started = std::time::Instant::now();
    let before = repo.storage().stats();
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let claim = if opts.dry_run {
        None
    } else {
        Some(repo.claim_prune().await?)
    };
    if claim.is_some() {
        blockvault_repo::test_hold("prune-after-claim").await;
    }
    let result = run(&repo, claim.as_ref(), &opts, &mut report).await;
    match (claim, &result) {
        (Some(c), Ok(())) => c.release().await,
        (Some(c), Err(_)) => c.end_failed(&repo).await,
        (None, _) => {}
    }
    result?;
    let after = repo.storage().stats();
    report.storage = StorageStats {
        requests: after.requests - before.requests,
        bytes_uploaded: after.bytes_uploaded - before.bytes_uploaded,
        bytes_downloaded: after.bytes_downloaded - before.bytes_downloaded,
    };
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

async fn run(
    repo: &Arc<Repository>,
    claim: Option<&blockvault_repo::PruneClaim>,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<()> {
    let grace_ms = opts.grace.as_millis() as u64;
    repo.refresh_plans().await?;
    let previous = match repo.maintenance_epoch() {
        0 => None,
        e => repo.read_plan(e).await?,
    };
    let now_ms = match claim {
        Some(c) => {
            report.epoch = c.epoch;
            repo.claim_now(c).await?
        }
        None => repo.clock().await?,
    };
    let leases: Vec<LeaseFact> = repo
        .leases(now_ms)
        .await?
        .into_iter()
        // A prune's short clock lease guards nothing.
        .filter(|l| l.record.kind != LeaseKind::Prune)
        .map(|l| LeaseFact {
            started_ms: l.started_ms,
            live: l.live,
        })
        .collect();

    // Sweep rules on what the previous plan left condemned.
    let pending: Vec<Condemned> = previous
        .as_ref()
        .map(|p| p.condemned.clone())
        .unwrap_or_default();
    let mut graces = BTreeMap::new();
    for e in pending.iter().map(|c| c.epoch).collect::<HashSet<_>>() {
        if let Some(p) = repo.read_plan(e).await? {
            graces.insert(e, p.grace_ms);
        }
    }
    let times = repo.plan_times();
    let choice = gc::sweepable(&pending, &times, &graces, grace_ms, now_ms, &leases);

    // Packs first, then points: a pack written after this listing is not a candidate, and a
    // point committed after the points listing is caught by the next run's re-mark.
    let packs = repo.list_objects(ObjectKind::Pack).await?;
    for l in &packs {
        report.packs_listed.add(l.size);
    }
    let (packs, leftover) = split_leftovers(repo, packs);
    let listed: HashSet<PackId> = packs
        .iter()
        .filter_map(|l| match l.name {
            ObjectName::Pack(id) => Some(id),
            _ => None,
        })
        .collect();
    let (points, unreadable) = repo.list_points().await?;
    let unreadable = really_unreadable(unreadable);
    if let Some((id, e)) = unreadable.first() {
        return Err(Error::Invalid(format!(
            "prune stopped before deleting anything: restore point {id} cannot be read ({e}); \
             run 'blockvault verify', then restore its manifest or remove it with \
             'blockvault forget {id}'"
        )));
    }
    report.points = points.len() as u64;
    let live = mark(repo, &points).await?;
    report.live_chunks = live.len() as u64;
    let (contents, by_segment) = pack_contents(repo, &listed).await?;
    // The live chunks each pack holds (a chunk stored twice is live in both packs).
    let live_in: HashMap<PackId, Vec<ChunkId>> = contents
        .iter()
        .filter_map(|(p, entries)| {
            let mut ids: Vec<ChunkId> = entries
                .iter()
                .map(|e| e.id)
                .filter(|id| live.contains(id))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            (!ids.is_empty()).then_some((*p, ids))
        })
        .collect();
    let live_packs: HashSet<PackId> = live_in.keys().copied().collect();
    let already: HashSet<PackId> = pending.iter().map(|c| c.pack).collect();
    let holders = good_copies(repo, &contents, &live);
    // Live chunks with a good copy in a listed pack no plan condemns: a condemned pack holding
    // only such live chunks (a repacked pack) may go.
    let covered: HashSet<ChunkId> = holders
        .iter()
        .filter(|(p, _)| !already.contains(p))
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    let (to_delete, recovered) = gc::split_by_remark(&choice.eligible, &live_in, &covered);
    drop(covered);
    let facts: Vec<PackFact> = packs
        .iter()
        .filter_map(|l| match l.name {
            ObjectName::Pack(id) => Some(PackFact {
                id,
                size: l.size,
                modified_ms: l.modified_ms,
                live: live_packs.contains(&id),
            }),
            _ => None,
        })
        .collect();
    let condemn = gc::choose_condemned(&facts, &already, now_ms, grace_ms, &leases);
    let usage: Vec<PackUsage> = packs
        .iter()
        .filter_map(|l| match l.name {
            ObjectName::Pack(id) if live_packs.contains(&id) && !already.contains(&id) => {
                let entries = contents.get(&id)?;
                let (mut live_bytes, mut dead_bytes) = (0, 0);
                for e in entries {
                    if live.contains(&e.id) {
                        live_bytes += e.len as u64;
                    } else {
                        dead_bytes += e.len as u64;
                    }
                }
                Some(PackUsage {
                    id,
                    size: l.size,
                    modified_ms: l.modified_ms,
                    live_bytes,
                    dead_bytes,
                })
            }
            _ => None,
        })
        .collect();
    let repack = gc::choose_repack(
        &usage,
        now_ms,
        grace_ms,
        &leases,
        RepackLimits {
            max_unused: opts.max_unused,
            max_repack: opts.max_repack,
        },
    );
    report.unused_before = repack.unused_before;
    report.unused_after = repack.unused_after;

    for c in &to_delete {
        report.deleted.add(c.size);
    }
    for (_, size) in &leftover {
        report.deleted.add(*size);
    }
    for c in &recovered {
        report.recovered.add(c.size);
    }
    for p in &condemn {
        report.condemned.add(p.size);
    }
    let mut earliest: Option<i64> = None;
    for (c, w) in &choice.waiting {
        report.pending.add(c.size);
        match w {
            Wait::Grace { deletable_at_ms } => {
                earliest = Some(earliest.map_or(*deletable_at_ms, |e| e.min(*deletable_at_ms)))
            }
            Wait::Lease => report.held_by_leases.add(c.size),
        }
    }
    for p in &condemn {
        report.pending.add(p.size);
    }

    let gone: HashSet<PackId> = to_delete.iter().map(|c| c.pack).collect();
    let segs = segment_decisions(
        repo,
        &by_segment,
        &contents,
        &listed,
        &gone,
        previous.as_ref(),
        now_ms,
        grace_ms,
        &leases,
    );
    report.segments_merged = segs.merge.iter().map(|g| g.len() as u64).sum();

    let Some(claim) = claim else {
        for p in &repack.packs {
            report.repacked.add(p.size);
            report.pending.add(p.size);
        }
        if !condemn.is_empty() || !repack.packs.is_empty() {
            let at = now_ms.saturating_add(grace_ms as i64);
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        report.pending_deletable_at = earliest.map(rfc3339_ms);
        return Ok(());
    };

    let keepers = keepers(&to_delete, &listed, &live_in, &holders, &already);
    let deleted_ids: Vec<PackId> = to_delete.iter().map(|c| c.pack).collect();
    let mut doomed = deleted_ids.clone();
    doomed.extend(leftover.iter().map(|(p, _)| *p));

    // Repack: the chunks to copy are the live ones of the chosen packs with no copy in a pack
    // that stays (not condemned, not deleted now, not condemned by this run).
    let repacking: HashSet<PackId> = repack.packs.iter().map(|p| p.id).collect();
    let mut to_copy: HashSet<ChunkId> = repack
        .packs
        .iter()
        .flat_map(|p| live_in[&p.id].iter().copied())
        .collect();
    for (p, ids) in &holders {
        if !already.contains(p) && !gone.contains(p) && !repacking.contains(p) {
            for id in ids {
                to_copy.remove(id);
            }
        }
    }
    let repacked = copy_live(repo, &repack.packs, &live_in, to_copy, opts, report).await?;

    let sizes: HashMap<PackId, u64> = packs
        .iter()
        .filter_map(|l| match l.name {
            ObjectName::Pack(id) => Some((id, l.size)),
            _ => None,
        })
        .collect();
    let record = |p: &PackId| {
        (listed.contains(p) && !gone.contains(p) && contents.contains_key(p)).then(|| PackRecord {
            id: *p,
            size: sizes[p],
            entries: contents[p].clone(),
        })
    };
    let merged_into = merge_segments(repo, &segs.merge, &by_segment.named, &record).await?;
    let kept_copies_in = keepers_segments(repo, keepers, &by_segment, &record).await?;
    report.segments_written = merged_into.len() as u64;
    let mut retired = segs.retired;
    retired.extend(segs.merge.iter().flatten().copied());
    let recovered_ids: HashSet<PackId> = recovered.iter().map(|c| c.pack).collect();
    let mut still: Vec<Condemned> = choice.waiting.iter().map(|(c, _)| c.clone()).collect();
    still.extend(condemn.iter().map(|p| Condemned {
        pack: p.id,
        size: p.size,
        epoch: claim.epoch,
    }));
    still.extend(repacked.packs.iter().map(|p| Condemned {
        pack: p.id,
        size: p.size,
        epoch: claim.epoch,
    }));
    debug_assert!(still
        .iter()
        .all(|c| !gone.contains(&c.pack) && !recovered_ids.contains(&c.pack)));
    let mut live_points: Vec<PointId> = points.iter().map(|p| p.id).collect();
    live_points.sort();
    let plan = Plan {
        version: 1,
        epoch: claim.epoch,
        host: claim.record().host.clone(),
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        grace_ms,
        condemned: still,
        deleted: deleted_ids,
        recovered: recovered_ids.into_iter().collect(),
        retired_segments: retired.clone(),
        live_points,
        repacked_into: repacked.segment.into_iter().collect(),
        consolidated_into: merged_into,
        kept_copies_in,
    };
    let published = repo.publish_plan(claim, plan).await?;
    // Every host that misses a pack from here on applies the plan first, re-reads the segments
    // it names and so finds the other copies before it forgets the deleted ones.
    blockvault_repo::test_hold("prune-after-plan").await;
    repo.delete_packs(claim, &doomed).await?;
    for p in &repacked.packs {
        report.repacked.add(p.size);
        report.pending.add(p.size);
    }
    if !condemn.is_empty() || !repacked.packs.is_empty() {
        let at = published.published_ms.saturating_add(grace_ms as i64);
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    report.pending_deletable_at = earliest.map(rfc3339_ms);
    repo.delete_segments(claim, &retired).await?;
    report.segments_retired = retired.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_gone_since_the_listing_does_not_stop_a_prune() {
        let (gone, bad) = (PointId::random(), PointId::random());
        let left = really_unreadable(vec![
            (gone, blockvault_repo::Error::PointNotFound(gone.to_hex())),
            (
                bad,
                blockvault_repo::Error::Invalid("authentication failed".into()),
            ),
        ]);
        let ids: Vec<PointId> = left.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![bad], "only the unreadable manifest stops the run");
    }
}
