//! The garbage-collection decisions of `prune`, as pure functions of what was listed and marked:
//! which condemned packs may be deleted now, which must be taken back, and which packs to condemn.
//! Nothing here reads or writes the repository; `prune.rs` gathers the facts and carries out the
//! decisions.
//!
//! The rules (docs/OPERATIONS.md, "Prune"):
//! - a condemned pack may be swept only when the store's now is at least T + grace (T: the store
//!   time of the plan that condemned it) and no live lease started at or before T;
//! - a sweepable pack holding a chunk a listed restore point needs (the re-mark, made after
//!   T + grace) is deleted only when every such chunk has a copy in a listed pack no plan
//!   condemns (a repack's new pack); otherwise it is taken back, never deleted;
//! - a pack is condemned only when no listed restore point needs any chunk in it, its contents
//!   are known, and it was written more than the grace period ago and before the start of the
//!   oldest live lease (a running backup's own packs are not referenced until it commits);
//! - a pack partly dead is repacked (its live chunks copied into new packs, then it is condemned
//!   like a dead one) under the same age and lease conditions, mostly-dead packs first, until
//!   the unused share of the repository is within `--max-unused` or the bytes to copy would
//!   pass `--max-repack`;
//! - small index segments are merged into larger ones when there are enough of them, under the
//!   same age and lease conditions, and only when every pack they name is known (listed, or
//!   recorded deleted): never a segment of a backup still running.

use std::collections::{BTreeMap, HashMap, HashSet};

use blockvault_repo::{ChunkId, Condemned, Epoch, PackId, SegmentId};
use serde::Serialize;

/// Store timestamps may be truncated to whole seconds (S3's `Last-Modified`), so every comparison
/// that allows a deletion or a commit is made this much on the safe side.
pub const CLOCK_SLACK_MS: i64 = 1000;

/// A lease as the sweep rule needs it.
#[derive(Clone, Copy, Debug)]
pub struct LeaseFact {
    pub started_ms: i64,
    pub live: bool,
}

/// Why a condemned pack is not deletable yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "until")]
pub enum Wait {
    /// The grace period has not passed: deletable from this store time on.
    Grace { deletable_at_ms: i64 },
    /// A lease that started before the condemnation is still live.
    Lease,
}

/// Which pending condemnations a sweep may consider now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepChoice {
    pub eligible: Vec<Condemned>,
    pub waiting: Vec<(Condemned, Wait)>,
}

/// Splits the pending condemnations by the time and lease rules. `published_ms` maps each epoch
/// to its plan's store time, `grace_ms` the grace each epoch promised (the larger of it and
/// `min_grace_ms` applies). A condemnation whose epoch has no known store time waits.
pub fn sweepable(
    pending: &[Condemned],
    published_ms: &BTreeMap<Epoch, i64>,
    grace_ms: &BTreeMap<Epoch, u64>,
    min_grace_ms: u64,
    now_ms: i64,
    leases: &[LeaseFact],
) -> SweepChoice {
    let mut out = SweepChoice::default();
    for c in pending {
        let grace = grace_ms
            .get(&c.epoch)
            .copied()
            .unwrap_or(0)
            .max(min_grace_ms) as i64;
        let Some(&t) = published_ms.get(&c.epoch) else {
            out.waiting.push((
                c.clone(),
                Wait::Grace {
                    deletable_at_ms: i64::MAX,
                },
            ));
            continue;
        };
        let deletable_at_ms = t.saturating_add(grace).saturating_add(CLOCK_SLACK_MS);
        if now_ms < deletable_at_ms {
            out.waiting
                .push((c.clone(), Wait::Grace { deletable_at_ms }));
        } else if leases
            .iter()
            .any(|l| l.live && l.started_ms <= t.saturating_add(CLOCK_SLACK_MS))
        {
            out.waiting.push((c.clone(), Wait::Lease));
        } else {
            out.eligible.push(c.clone());
        }
    }
    out
}

/// The re-mark's verdict on the eligible packs: a pack is deleted when every live chunk it
/// holds (`live_in`) is `covered` (has a copy in a listed pack no plan condemns); otherwise it is
/// taken back. Returns (delete, take back).
pub fn split_by_remark(
    eligible: &[Condemned],
    live_in: &HashMap<PackId, Vec<ChunkId>>,
    covered: &HashSet<ChunkId>,
) -> (Vec<Condemned>, Vec<Condemned>) {
    eligible.iter().cloned().partition(|c| {
        live_in
            .get(&c.pack)
            .is_none_or(|ids| ids.iter().all(|id| covered.contains(id)))
    })
}

/// A listed pack as the condemnation rule needs it.
#[derive(Clone, Debug)]
pub struct PackFact {
    pub id: PackId,
    pub size: u64,
    pub modified_ms: i64,
    /// Some chunk in it is needed by a listed restore point.
    pub live: bool,
}

/// Whether a pack written at `modified_ms` may be condemned now: written more than the grace
/// period ago and before the start of every live lease.
fn settled(modified_ms: i64, now_ms: i64, grace_ms: u64, leases: &[LeaseFact]) -> bool {
    let old_enough = now_ms
        .saturating_sub(grace_ms as i64)
        .saturating_sub(CLOCK_SLACK_MS);
    let lease_floor = leases
        .iter()
        .filter(|l| l.live)
        .map(|l| l.started_ms)
        .min()
        .unwrap_or(i64::MAX);
    modified_ms < old_enough && modified_ms.saturating_add(CLOCK_SLACK_MS) < lease_floor
}

/// Packs to condemn now: dead, older than the grace period, older than every live lease, and not
/// already condemned.
pub fn choose_condemned(
    packs: &[PackFact],
    already: &HashSet<PackId>,
    now_ms: i64,
    grace_ms: u64,
    leases: &[LeaseFact],
) -> Vec<PackFact> {
    packs
        .iter()
        .filter(|p| {
            !p.live && !already.contains(&p.id) && settled(p.modified_ms, now_ms, grace_ms, leases)
        })
        .cloned()
        .collect()
}

/// A listed pack as the repack rule needs it: the stored bytes of the blobs a listed restore
/// point needs, and of the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackUsage {
    pub id: PackId,
    pub size: u64,
    pub modified_ms: i64,
    pub live_bytes: u64,
    pub dead_bytes: u64,
}

/// How much a repack may do.
#[derive(Clone, Copy, Debug)]
pub struct RepackLimits {
    /// The share of the kept packs' bytes that may stay unused (dead blobs inside packs still
    /// needed). 0.05 keeps repacking until at most 5 % is unused; 1.0 or more never repacks.
    pub max_unused: f64,
    /// The most live bytes one run copies.
    pub max_repack: u64,
}

/// The repack choice and the unused bytes in kept packs before and after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepackChoice {
    pub packs: Vec<PackUsage>,
    pub unused_before: u64,
    pub unused_after: u64,
}

/// Packs to repack now, among `packs` (the packs that stay: not dead, not condemned), mostly
/// dead first, until the unused bytes are within `limits.max_unused` of what stays. A pack is a
/// candidate only when it holds both live and dead blobs and may be condemned now (`settled`).
pub fn choose_repack(
    packs: &[PackUsage],
    now_ms: i64,
    grace_ms: u64,
    leases: &[LeaseFact],
    limits: RepackLimits,
) -> RepackChoice {
    let live: u64 = packs.iter().map(|p| p.live_bytes).sum();
    let mut unused: u64 = packs.iter().map(|p| p.dead_bytes).sum();
    let unused_before = unused;
    let f = limits.max_unused.clamp(0.0, 1.0);
    // unused <= f * (live + unused)  <=>  unused * (1 - f) <= f * live
    let within = |unused: u64| unused as f64 * (1.0 - f) <= f * live as f64;
    let mut candidates: Vec<&PackUsage> = packs
        .iter()
        .filter(|p| {
            p.live_bytes > 0 && p.dead_bytes > 0 && settled(p.modified_ms, now_ms, grace_ms, leases)
        })
        .collect();
    // Most dead share first (the most space back per byte copied), then most dead bytes.
    candidates.sort_by(|a, b| {
        let share = |p: &PackUsage| p.dead_bytes as f64 / (p.live_bytes + p.dead_bytes) as f64;
        share(b)
            .total_cmp(&share(a))
            .then(b.dead_bytes.cmp(&a.dead_bytes))
            .then(a.id.cmp(&b.id))
    });
    let mut chosen = Vec::new();
    let mut copied = 0u64;
    for p in candidates {
        if f >= 1.0 || within(unused) {
            break;
        }
        if copied + p.live_bytes > limits.max_repack {
            continue;
        }
        copied += p.live_bytes;
        unused -= p.dead_bytes;
        chosen.push(p.clone());
    }
    RepackChoice {
        packs: chosen,
        unused_before,
        unused_after: unused,
    }
}

/// An index segment as the consolidation rule needs it.
#[derive(Clone, Debug)]
pub struct SegmentFact {
    pub id: SegmentId,
    pub modified_ms: i64,
    /// Packs it names that stay (listed and not deleted by this run), and their entries.
    pub packs: usize,
    pub entries: usize,
    /// Every pack it names is listed or recorded deleted.
    pub known: bool,
}

/// A segment naming fewer packs than this is small: a merge candidate.
pub const SMALL_SEGMENT_PACKS: usize = 256;
/// Small segments are merged only when at least this many are waiting.
pub const MIN_SEGMENTS_TO_MERGE: usize = 8;
/// Entries in one merged segment at most (about 12 MiB of segment).
pub const MAX_MERGED_ENTRIES: usize = 1 << 18;

/// Groups of small segments to merge, each into one new segment: oldest first, each group as
/// large as `MAX_MERGED_ENTRIES` allows. Nothing when fewer than `MIN_SEGMENTS_TO_MERGE` small
/// segments may be merged now.
pub fn choose_consolidation(
    segments: &[SegmentFact],
    now_ms: i64,
    grace_ms: u64,
    leases: &[LeaseFact],
) -> Vec<Vec<SegmentId>> {
    let mut small: Vec<&SegmentFact> = segments
        .iter()
        .filter(|s| {
            s.known
                && s.packs > 0
                && s.packs < SMALL_SEGMENT_PACKS
                && settled(s.modified_ms, now_ms, grace_ms, leases)
        })
        .collect();
    if small.len() < MIN_SEGMENTS_TO_MERGE {
        return Vec::new();
    }
    small.sort_by_key(|s| (s.modified_ms, s.id));
    let mut groups = Vec::new();
    let mut group: Vec<SegmentId> = Vec::new();
    let mut entries = 0;
    for s in small {
        if !group.is_empty() && entries + s.entries > MAX_MERGED_ENTRIES {
            groups.push(std::mem::take(&mut group));
            entries = 0;
        }
        group.push(s.id);
        entries += s.entries;
    }
    groups.push(group);
    groups.retain(|g| g.len() > 1);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(pack: PackId, epoch: Epoch) -> Condemned {
        Condemned {
            pack,
            size: 10,
            epoch,
        }
    }

    #[test]
    fn sweep_waits_for_grace_then_for_older_leases_only() {
        let (a, b) = (PackId::random(), PackId::random());
        let pending = [cond(a, 1), cond(b, 2)];
        let published: BTreeMap<Epoch, i64> = [(1, 1_000), (2, 5_000)].into();
        let grace: BTreeMap<Epoch, u64> = [(1, 2_000), (2, 2_000)].into();
        // At 4_000 (T + grace + slack) epoch 1 is exactly due, epoch 2 is not.
        let c = sweepable(&pending, &published, &grace, 0, 4_000, &[]);
        assert_eq!(c.eligible, vec![cond(a, 1)]);
        assert_eq!(
            c.waiting,
            vec![(
                cond(b, 2),
                Wait::Grace {
                    deletable_at_ms: 8_000
                }
            )]
        );
        // One ms earlier nothing is due.
        assert!(sweepable(&pending, &published, &grace, 0, 3_999, &[])
            .eligible
            .is_empty());
        // A live lease started before T (within the slack) holds that epoch back; a lease
        // started after T does not.
        let early = LeaseFact {
            started_ms: 2_000,
            live: true,
        };
        let middle = LeaseFact {
            started_ms: 4_000,
            live: true,
        };
        let late = LeaseFact {
            started_ms: 6_001,
            live: true,
        };
        let dead = LeaseFact {
            started_ms: 0,
            live: false,
        };
        let c = sweepable(&pending, &published, &grace, 0, 9_000, &[early]);
        assert!(c.eligible.is_empty());
        assert!(c.waiting.contains(&(cond(a, 1), Wait::Lease)));
        let c = sweepable(&pending, &published, &grace, 0, 9_000, &[middle]);
        assert_eq!(c.eligible, vec![cond(a, 1)]);
        assert_eq!(c.waiting, vec![(cond(b, 2), Wait::Lease)]);
        let c = sweepable(&pending, &published, &grace, 0, 9_000, &[late, dead]);
        assert_eq!(c.eligible.len(), 2);
        // A larger current grace applies to old condemnations too.
        let c = sweepable(&pending, &published, &grace, 10_000, 9_000, &[]);
        assert!(c.eligible.is_empty());
    }

    #[test]
    fn unknown_plan_time_never_sweeps() {
        let a = PackId::random();
        let c = sweepable(
            &[cond(a, 4)],
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
            i64::MAX,
            &[],
        );
        assert!(c.eligible.is_empty());
    }

    #[test]
    fn remark_takes_back_needed_packs_unless_copied() {
        let (a, b, c) = (PackId::random(), PackId::random(), PackId::random());
        let (x, y) = (ChunkId([1; 32]), ChunkId([2; 32]));
        // b holds a live chunk with no other copy; c's live chunk was copied by a repack.
        let live_in: HashMap<PackId, Vec<ChunkId>> = [(b, vec![x]), (c, vec![y])].into();
        let covered: HashSet<ChunkId> = [y].into();
        let (delete, recover) =
            split_by_remark(&[cond(a, 1), cond(b, 1), cond(c, 1)], &live_in, &covered);
        assert_eq!(delete, vec![cond(a, 1), cond(c, 1)]);
        assert_eq!(recover, vec![cond(b, 1)]);
        // A pack with one covered and one uncovered live chunk is taken back.
        let live_in: HashMap<PackId, Vec<ChunkId>> = [(c, vec![y, x])].into();
        let (delete, recover) = split_by_remark(&[cond(c, 1)], &live_in, &covered);
        assert!(delete.is_empty());
        assert_eq!(recover, vec![cond(c, 1)]);
    }

    fn usage(live_bytes: u64, dead_bytes: u64, modified_ms: i64) -> PackUsage {
        PackUsage {
            id: PackId::random(),
            size: live_bytes + dead_bytes + 100,
            modified_ms,
            live_bytes,
            dead_bytes,
        }
    }

    #[test]
    fn repack_takes_mostly_dead_packs_first_until_within_the_limit() {
        let full = usage(1000, 0, 0);
        let mostly_dead = usage(100, 900, 0);
        let half = usage(500, 500, 0);
        let little = usage(950, 50, 0);
        let packs = vec![
            full.clone(),
            little.clone(),
            half.clone(),
            mostly_dead.clone(),
        ];
        let limits = |max_unused: f64, max_repack: u64| RepackLimits {
            max_unused,
            max_repack,
        };
        // Live 2550, unused 1450. At 10 %: after the mostly dead pack, 550 unused is more than
        // 10 % of 3100; after the half-dead one, 50 is within 10 % of 2600: done.
        let c = choose_repack(&packs, 10_000, 0, &[], limits(0.1, u64::MAX));
        let ids: Vec<PackId> = c.packs.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![mostly_dead.id, half.id]);
        assert_eq!((c.unused_before, c.unused_after), (1450, 50));
        // At 0 % every pack with a dead blob goes; a fully live pack never does.
        let c = choose_repack(&packs, 10_000, 0, &[], limits(0.0, u64::MAX));
        assert_eq!(c.packs.len(), 3);
        assert_eq!(c.unused_after, 0);
        // 100 % never repacks; neither does a repository already within the limit.
        assert!(choose_repack(&packs, 10_000, 0, &[], limits(1.0, u64::MAX))
            .packs
            .is_empty());
        assert!(choose_repack(&packs, 10_000, 0, &[], limits(0.5, u64::MAX))
            .packs
            .is_empty());
        // The copy budget skips a pack that does not fit and takes a smaller one.
        let c = choose_repack(&packs, 10_000, 0, &[], limits(0.0, 600));
        let ids: Vec<PackId> = c.packs.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![mostly_dead.id, half.id]);
    }

    #[test]
    fn repack_waits_for_grace_and_leases_like_condemnation() {
        let young = usage(100, 900, 9_500);
        let under_lease = usage(100, 900, 5_000);
        let old = usage(100, 900, 1_000);
        let packs = vec![young, under_lease, old.clone()];
        let lease = LeaseFact {
            started_ms: 4_000,
            live: true,
        };
        let limits = RepackLimits {
            max_unused: 0.0,
            max_repack: u64::MAX,
        };
        let c = choose_repack(&packs, 10_000, 1_000, &[lease], limits);
        let ids: Vec<PackId> = c.packs.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![old.id]);
    }

    #[test]
    fn condemns_only_old_dead_packs_not_under_a_lease() {
        let p = |live: bool, modified_ms: i64| PackFact {
            id: PackId::random(),
            size: 1,
            modified_ms,
            live,
        };
        let old_dead = p(false, 1_000);
        let old_live = p(true, 1_000);
        let young_dead = p(false, 8_500);
        let after_lease = p(false, 3_500);
        let done = p(false, 1_000);
        let packs = vec![
            old_dead.clone(),
            old_live,
            young_dead,
            after_lease.clone(),
            done.clone(),
        ];
        let already: HashSet<PackId> = [done.id].into();
        let lease = LeaseFact {
            started_ms: 4_000,
            live: true,
        };
        let chosen = choose_condemned(&packs, &already, 10_000, 1_000, &[lease]);
        let ids: Vec<PackId> = chosen.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![old_dead.id]);
        // Without the lease the pack written after its start is condemned too.
        let chosen = choose_condemned(&packs, &already, 10_000, 1_000, &[]);
        assert_eq!(chosen.len(), 2);
        assert!(chosen.iter().any(|p| p.id == after_lease.id));
        // Grace (and slack) counts: at now = 2_999 with grace 1_000 a pack of 1_000 is not old
        // enough.
        assert!(choose_condemned(&packs, &already, 2_999, 1_000, &[]).is_empty());
    }

    fn seg(modified_ms: i64, packs: usize, entries: usize, known: bool) -> SegmentFact {
        SegmentFact {
            id: SegmentId::random(),
            modified_ms,
            packs,
            entries,
            known,
        }
    }

    #[test]
    fn small_settled_known_segments_are_merged_oldest_first() {
        let mut segs: Vec<SegmentFact> = (0..MIN_SEGMENTS_TO_MERGE as i64 - 1)
            .map(|i| seg(1_000 + i, 10, 1_000, true))
            .collect();
        let big = seg(1_000, SMALL_SEGMENT_PACKS, 60_000, true);
        let young = seg(9_500, 10, 1_000, true);
        let unknown = seg(1_000, 10, 1_000, false);
        let empty = seg(1_000, 0, 0, true);
        segs.extend([big, young.clone(), unknown, empty]);
        // One short of the minimum among those that may merge: nothing.
        assert!(choose_consolidation(&segs, 10_000, 1_000, &[]).is_empty());
        // The young one settles: all eight merge into one group, oldest first.
        let groups = choose_consolidation(&segs, 20_000, 1_000, &[]);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].len(), MIN_SEGMENTS_TO_MERGE);
        assert_eq!(groups[0].last(), Some(&young.id));
        assert_eq!(groups[0][0], segs[0].id);
        // A live lease older than a segment keeps it out.
        let lease = LeaseFact {
            started_ms: 5_000,
            live: true,
        };
        assert!(choose_consolidation(&segs, 20_000, 1_000, &[lease]).is_empty());
    }

    #[test]
    fn merged_segments_stay_within_the_entry_bound() {
        let segs: Vec<SegmentFact> = (0..10)
            .map(|i| seg(i, 100, MAX_MERGED_ENTRIES / 4, true))
            .collect();
        let groups = choose_consolidation(&segs, 100_000, 0, &[]);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        // 4 + 4 + 2: each group at most MAX_MERGED_ENTRIES; a lone leftover would not merge.
        assert_eq!(sizes, vec![4, 4, 2]);
    }
}
