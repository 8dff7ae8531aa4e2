//! Maintenance plans and prune claims: the objects through which a prune tells every reader and
//! writer which packs it condemned and which it deleted.
//!
//! Prune run n first claims epoch n (`claims/<n>`, create-only; refreshed like a lease while the
//! run lasts), then publishes plan n (`plans/<n>`, create-only). A plan lists every pack still
//! condemned (with the epoch that condemned it), the packs its sweep deleted or took back, the
//! index segments it retired, and the restore points it treated as live. The store timestamp of
//! `plans/<e>` is the time T of every condemnation made in epoch e.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::objects::Epoch;
use crate::{PackId, PointId, SegmentId};

/// The sealed body of `claims/<epoch>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRecord {
    pub version: u32,
    pub epoch: Epoch,
    pub host: String,
    pub pid: u32,
    pub refresh_ms: u64,
    /// The claimer's local clock, RFC 3339: for people only.
    pub created: String,
    /// Set when the prune stopped without publishing its plan (it failed): the next prune
    /// claims the following epoch at once instead of waiting for the claim to go stale.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
}

/// One condemned pack: no restore point needed it when epoch `epoch` marked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condemned {
    pub pack: PackId,
    pub size: u64,
    pub epoch: Epoch,
}

/// The sealed body of `plans/<epoch>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    pub epoch: Epoch,
    pub host: String,
    /// The publisher's local clock, RFC 3339: for people only.
    pub created: String,
    /// The grace period this run promised for its condemnations, in milliseconds.
    pub grace_ms: u64,
    /// Every pack condemned and not yet deleted after this run (older condemnations carried
    /// forward with their own epoch).
    pub condemned: Vec<Condemned>,
    /// Packs this run's sweep deleted.
    pub deleted: Vec<PackId>,
    /// Condemned packs this run's sweep found needed again and took back.
    pub recovered: Vec<PackId>,
    /// Index segments this run deleted because every pack they list is deleted.
    pub retired_segments: Vec<SegmentId>,
    /// The restore points this run's mark treated as live.
    pub live_points: Vec<PointId>,
    /// Index segments listing the packs this run's repack wrote: the new homes of the live
    /// chunks of the packs it condemned while they were still partly live. A reader applying the
    /// plan re-reads them so that its index points at the new copies before the old packs go.
    #[serde(default)]
    pub repacked_into: Vec<SegmentId>,
    /// Index segments this run wrote by merging small ones (those are in `retired_segments`).
    /// Re-read like `repacked_into` by a reader applying the plan: a merged segment may carry a
    /// repack's records whose own segment is gone.
    #[serde(default)]
    pub consolidated_into: Vec<SegmentId>,
    /// Index segments listing the packs that keep the other copy of a live chunk of a pack this
    /// run deleted (a chunk two backups stored at once, or stored again after verification found
    /// a copy damaged). A reader applying the plan re-reads them: its index may point at the
    /// deleted copy, and forgetting that would leave the chunk with no location.
    #[serde(default)]
    pub kept_copies_in: Vec<SegmentId>,
}

impl Plan {
    /// The segments a reader applying this plan reads again.
    pub fn segments_to_reread(&self) -> impl Iterator<Item = &SegmentId> {
        self.kept_copies_in
            .iter()
            .chain(&self.repacked_into)
            .chain(&self.consolidated_into)
    }

    /// Packs condemned by this very epoch (not carried forward from earlier ones).
    pub fn newly_condemned(&self) -> impl Iterator<Item = &Condemned> {
        self.condemned.iter().filter(move |c| c.epoch == self.epoch)
    }
}

/// A plan with the store timestamp of its object (the time T of its condemnations).
#[derive(Clone, Debug)]
pub struct PublishedPlan {
    pub plan: Plan,
    pub published_ms: i64,
}

/// What this process knows from the plans it applied; persisted beside the local index.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct MaintState {
    /// Newest plan applied (0: none).
    pub epoch: Epoch,
    /// Packs condemned by the newest plan: never used for deduplication.
    pub condemned: HashSet<PackId>,
    /// Packs any plan deleted: never trusted, whatever an index segment says.
    pub deleted: HashSet<PackId>,
    /// Store time of each applied plan.
    pub published_ms: BTreeMap<Epoch, i64>,
}

impl MaintState {
    /// Applies plans in epoch order. Plans at or below the applied epoch are skipped.
    pub(crate) fn apply(&mut self, plan: &Plan, published_ms: i64) {
        if plan.epoch <= self.epoch {
            return;
        }
        self.epoch = plan.epoch;
        self.condemned = plan.condemned.iter().map(|c| c.pack).collect();
        self.deleted.extend(plan.deleted.iter().copied());
        self.published_ms.insert(plan.epoch, published_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(epoch: Epoch, condemned: &[(PackId, Epoch)], deleted: &[PackId]) -> Plan {
        Plan {
            version: 1,
            epoch,
            host: "h".into(),
            created: String::new(),
            grace_ms: 1000,
            condemned: condemned
                .iter()
                .map(|(p, e)| Condemned {
                    pack: *p,
                    size: 1,
                    epoch: *e,
                })
                .collect(),
            deleted: deleted.to_vec(),
            recovered: vec![],
            retired_segments: vec![],
            live_points: vec![],
            repacked_into: vec![],
            kept_copies_in: vec![],
            consolidated_into: vec![],
        }
    }

    #[test]
    fn state_follows_plans_and_ignores_old_ones() {
        let (a, b, c) = (PackId::random(), PackId::random(), PackId::random());
        let mut s = MaintState::default();
        s.apply(&plan(1, &[(a, 1), (b, 1)], &[]), 10);
        assert!(s.condemned.contains(&a) && s.condemned.contains(&b));
        s.apply(&plan(2, &[(c, 2)], &[a]), 20);
        assert_eq!(s.epoch, 2);
        assert!(s.deleted.contains(&a));
        assert!(!s.condemned.contains(&b), "b was taken back by plan 2");
        assert!(s.condemned.contains(&c));
        // A replayed old plan changes nothing.
        s.apply(&plan(1, &[(a, 1), (b, 1)], &[]), 10);
        assert_eq!(s.epoch, 2);
        assert!(!s.condemned.contains(&b));
        assert_eq!(plan(2, &[(c, 2), (b, 1)], &[]).newly_condemned().count(), 1);
    }
}
