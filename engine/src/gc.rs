//! The garbage-collection decisions of `prune`, as pure functions of what was listed and marked:
//! which condemned packs may be deleted now, which must be taken back, and which packs to condemn.
//! Nothing here reads or writes the repository; `prune.rs` gathers the facts and carries out the
//! decisions.
//!
//! The rules (docs/OPERATIONS.md, "Prune"):
//! - a condemned pack may be swept only when the store's now is at least T + grace (T: the store
//!   time of the plan that condemned it) and no live lease started at or before T;
//! - a sweepable pack holding any chunk a listed restore point needs (the re-mark, made after
//!   T + grace) is taken back, never deleted;
//! - a pack is condemned only when no listed restore point needs any chunk in it, its contents
//!   are known, and it was written more than the grace period ago and before the start of the
//!   oldest live lease (a running backup's own packs are not referenced until it commits).

use std::collections::{BTreeMap, HashSet};

use blockvault_repo::{Condemned, Epoch, PackId};
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

/// The re-mark's verdict on the eligible packs: those holding a live chunk are taken back, the
/// rest deleted.
pub fn split_by_remark(
    eligible: &[Condemned],
    live_packs: &HashSet<PackId>,
) -> (Vec<Condemned>, Vec<Condemned>) {
    eligible
        .iter()
        .cloned()
        .partition(|c| !live_packs.contains(&c.pack))
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

/// Packs to condemn now: dead, older than the grace period, older than every live lease, and not
/// already condemned.
pub fn choose_condemned(
    packs: &[PackFact],
    already: &HashSet<PackId>,
    now_ms: i64,
    grace_ms: u64,
    leases: &[LeaseFact],
) -> Vec<PackFact> {
    let old_enough = now_ms
        .saturating_sub(grace_ms as i64)
        .saturating_sub(CLOCK_SLACK_MS);
    let lease_floor = leases
        .iter()
        .filter(|l| l.live)
        .map(|l| l.started_ms)
        .min()
        .unwrap_or(i64::MAX);
    packs
        .iter()
        .filter(|p| {
            !p.live
                && !already.contains(&p.id)
                && p.modified_ms < old_enough
                && p.modified_ms.saturating_add(CLOCK_SLACK_MS) < lease_floor
        })
        .cloned()
        .collect()
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
    fn remark_takes_back_needed_packs() {
        let (a, b) = (PackId::random(), PackId::random());
        let live: HashSet<PackId> = [b].into();
        let (delete, recover) = split_by_remark(&[cond(a, 1), cond(b, 1)], &live);
        assert_eq!(delete, vec![cond(a, 1)]);
        assert_eq!(recover, vec![cond(b, 1)]);
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
}
