//! Maintenance state of an open repository: the plans it has applied (which packs are condemned
//! or deleted), prune claims, and plan publication.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::{blocking, Repository};
use crate::format::PLAN_VERSION;
use crate::lease::{hostname, is_live, now_rfc3339, refresh_interval, Keeper, LeaseKind};
use crate::objects::{Epoch, ObjectKind, ObjectName};
use crate::plan::{ClaimRecord, MaintState, Plan, PublishedPlan};
use crate::storage::Write;
use crate::{Error, PackId, Result};

/// A held claim on a prune epoch, refreshed in the background until released.
pub struct PruneClaim {
    pub epoch: Epoch,
    record: ClaimRecord,
    sealed: Bytes,
    keeper: Option<Keeper>,
    /// Store time of the claim's first write.
    pub started_ms: i64,
}

impl std::fmt::Debug for PruneClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PruneClaim({})", self.epoch)
    }
}

impl PruneClaim {
    /// Stops refreshing the claim. The claim object stays (it is the epoch's record); a
    /// published plan of the same epoch marks it finished.
    pub async fn release(mut self) {
        if let Some(k) = self.keeper.take() {
            k.stop().await;
        }
    }

    /// Ends a prune that failed: stops refreshing the claim and marks it ended, so that the
    /// next prune need not wait for it to go stale. Not marked (a store error), it goes stale.
    pub async fn end_failed(mut self, repo: &Repository) {
        if let Some(k) = self.keeper.take() {
            k.stop().await;
        }
        let name = ObjectName::Claim(self.epoch);
        let record = ClaimRecord {
            ended: true,
            ..self.record.clone()
        };
        let sealed = Bytes::from(name.seal_json(&repo.keys, &record));
        if let Err(e) = repo
            .storage
            .put(&name.path(), sealed, Write::Overwrite)
            .await
        {
            tracing::warn!(claim = %name, error = %e, "could not mark the failed prune's claim ended");
        }
    }

    pub fn record(&self) -> &ClaimRecord {
        &self.record
    }
}

fn state_path(root: &std::path::Path) -> PathBuf {
    root.join("maintenance.json")
}

impl Repository {
    pub(crate) fn load_maint_state(root: &std::path::Path) -> MaintState {
        std::fs::read(state_path(root))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_maint_state(&self, state: &MaintState) {
        let path = state_path(&self.cache_root);
        let json = serde_json::to_vec(state).expect("state serialises");
        if let Err(e) = crate::cache_file::write_whole(&path, &json) {
            // A cache: losing it costs a re-read of the plans, nothing else.
            tracing::warn!(path = %path.display(), error = %e, "could not save maintenance state");
        }
    }

    /// The newest maintenance plan this process has applied (0: none).
    pub fn maintenance_epoch(&self) -> Epoch {
        self.maint.read().expect("maintenance state lock").epoch
    }

    /// True when the newest applied plan condemns `pack`: its chunks are not used for dedup.
    pub fn is_condemned(&self, pack: &PackId) -> bool {
        self.maint
            .read()
            .expect("maintenance state lock")
            .condemned
            .contains(pack)
    }

    /// True when a plan recorded `pack` as deleted.
    pub fn is_deleted(&self, pack: &PackId) -> bool {
        self.maint
            .read()
            .expect("maintenance state lock")
            .deleted
            .contains(pack)
    }

    /// Packs condemned by the newest applied plan.
    pub fn condemned_packs(&self) -> std::collections::HashSet<PackId> {
        self.maint
            .read()
            .expect("maintenance state lock")
            .condemned
            .clone()
    }

    /// A plan, from the local cache of plans or the store; `None` when it does not exist.
    pub async fn read_plan(&self, epoch: Epoch) -> Result<Option<Plan>> {
        let name = ObjectName::Plan(epoch);
        let cached = self.cache_root.join("plans").join(format!("{epoch:020}"));
        let open = |bytes: Bytes| {
            let keys = self.keys.clone();
            blocking(move || name.open_json::<Plan>(&keys, &bytes))
        };
        let from_cache = match std::fs::read(&cached) {
            // A cached copy that does not open (a write torn by a crash or a full disk) is
            // only a cache: it is dropped and the plan fetched again.
            Ok(b) => match open(Bytes::from(b)).await? {
                Ok(plan) => Some(plan),
                Err(e) => {
                    tracing::warn!(plan = %name, error = %e, "cached plan unreadable; fetching it again");
                    let _ = std::fs::remove_file(&cached);
                    None
                }
            },
            Err(_) => None,
        };
        let plan = match from_cache {
            Some(plan) => plan,
            None => match self.get_object(name).await? {
                Some(b) => {
                    let plan = open(b.clone()).await??;
                    // Plans never change once written: keep the sealed bytes for next time,
                    // written whole or not at all.
                    let _ = crate::cache_file::write_whole(&cached, &b);
                    plan
                }
                None => return Ok(None),
            },
        };
        if plan.epoch != epoch || plan.version != PLAN_VERSION {
            return Err(Error::tampered(
                name.to_string(),
                format!("it says epoch {} version {}", plan.epoch, plan.version),
            ));
        }
        Ok(Some(plan))
    }

    /// Every published plan newer than `epoch`, read from a fresh listing, oldest first.
    pub async fn plans_after(&self, epoch: Epoch) -> Result<Vec<PublishedPlan>> {
        let mut out = Vec::new();
        for l in self.list_objects(ObjectKind::Plan).await? {
            let ObjectName::Plan(e) = l.name else {
                continue;
            };
            if e <= epoch {
                continue;
            }
            let plan = self.read_plan(e).await?.ok_or_else(|| {
                Error::malformed(l.name.to_string(), "listed but could not be read")
            })?;
            out.push(PublishedPlan {
                plan,
                published_ms: l.modified_ms,
            });
        }
        Ok(out)
    }

    /// Applies every plan newer than the one this process applied last: condemned packs stop
    /// serving dedup, deleted packs leave the local index. Refuses a repository whose newest plan
    /// is older than one already applied here (plans deleted or an old copy restored).
    pub async fn refresh_plans(&self) -> Result<()> {
        let _one = self.plan_lock.lock().await;
        let current = self.maintenance_epoch();
        let listed = self.list_objects(ObjectKind::Plan).await?;
        let newest = listed
            .iter()
            .filter_map(|l| match l.name {
                ObjectName::Plan(e) => Some(e),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if newest < current {
            return Err(Error::tampered(
                "maintenance plans",
                format!(
                    "this machine has applied plan {current} but the newest plan in the \
                     repository is {newest}: plans were deleted or an old copy of the repository \
                     was put back; delete {} to accept this repository as it is",
                    state_path(&self.cache_root).display()
                ),
            ));
        }
        if newest == current {
            return Ok(());
        }
        let mut state = self.maint.read().expect("maintenance state lock").clone();
        let mut gone = std::collections::HashSet::new();
        let mut reread = Vec::new();
        for l in listed {
            let ObjectName::Plan(e) = l.name else {
                continue;
            };
            if e <= current {
                continue;
            }
            let plan = self.read_plan(e).await?.ok_or_else(|| {
                Error::malformed(l.name.to_string(), "listed but could not be read")
            })?;
            gone.extend(plan.deleted.iter().copied());
            reread.extend(plan.segments_to_reread().copied());
            state.apply(&plan, l.modified_ms);
        }
        // The new homes of repacked chunks replace the condemned copies in the local index
        // before any of those copies is forgotten below, whatever order segments arrived in.
        // A segment this process already absorbed is read again all the same: it may have been
        // absorbed before its packs' old copies were.
        let (deleted, condemned) = (
            Arc::new(state.deleted.clone()),
            Arc::new(state.condemned.clone()),
        );
        for id in reread {
            // A segment a later plan retired is gone with every pack it listed.
            if let Some(packs) = self.read_segment_if_any(&id).await? {
                self.absorb_segment(id, packs, deleted.clone(), condemned.clone())
                    .await?;
            }
        }
        if !gone.is_empty() {
            let index = self.index.clone();
            blocking(move || index.remove_packs(&gone)).await??;
        }
        self.save_maint_state(&state);
        *self.maint.write().expect("maintenance state lock") = state;
        Ok(())
    }

    /// Claims the next prune epoch. Fails with [`Error::PruneRunning`] while another prune's
    /// claim is live; a claim left by a prune that died (not refreshed for three of its
    /// intervals, judged by store time) is taken over by claiming the next epoch.
    pub async fn claim_prune(self: &Arc<Self>) -> Result<PruneClaim> {
        let claims = self.list_objects(ObjectKind::Claim).await?;
        let plans = self.list_objects(ObjectKind::Plan).await?;
        let epoch_of = |n: &ObjectName| match n {
            ObjectName::Claim(e) | ObjectName::Plan(e) => *e,
            _ => 0,
        };
        let last_claim = claims.last().map(|l| (epoch_of(&l.name), l.modified_ms));
        let last_plan = plans.last().map(|l| epoch_of(&l.name)).unwrap_or(0);
        if let Some((c, modified_ms)) = last_claim {
            if c > last_plan {
                // Epoch c is claimed and not published: running, or dead.
                let record = self.get_sealed::<ClaimRecord>(ObjectName::Claim(c)).await?;
                let now = self.clock().await?;
                if let Some(r) = record {
                    if !r.ended && is_live(r.refresh_ms, modified_ms, now) {
                        return Err(Error::PruneRunning {
                            epoch: c,
                            host: r.host,
                            since: r.created,
                        });
                    }
                    if !r.ended {
                        tracing::warn!(
                            epoch = c,
                            host = %r.host,
                            "taking over from a prune that stopped refreshing its claim"
                        );
                    }
                }
            }
        }
        let epoch = last_claim.map(|(c, _)| c).unwrap_or(0).max(last_plan) + 1;
        let every = refresh_interval();
        let record = ClaimRecord {
            version: PLAN_VERSION,
            epoch,
            host: hostname(),
            pid: std::process::id(),
            refresh_ms: every.as_millis().max(1) as u64,
            created: now_rfc3339(),
            ended: false,
        };
        let name = ObjectName::Claim(epoch);
        match self.put_sealed(name, &record, Write::CreateChecked).await {
            Ok(()) => {}
            Err(e) if crate::retry::is_already_exists(&e) => {
                let other = self.get_sealed::<ClaimRecord>(name).await?;
                return Err(Error::PruneRunning {
                    epoch,
                    host: other.as_ref().map(|r| r.host.clone()).unwrap_or_default(),
                    since: other.map(|r| r.created).unwrap_or_default(),
                });
            }
            Err(e) => return Err(e),
        }
        let started_ms = self
            .head_object(name)
            .await?
            .map(|l| l.modified_ms)
            .ok_or_else(|| Error::malformed(name.to_string(), "vanished after it was written"))?;
        let sealed = Bytes::from(name.seal_json(&self.keys, &record));
        let keeper = Keeper::start(self.clone(), name, sealed.clone(), every);
        Ok(PruneClaim {
            epoch,
            record,
            sealed,
            keeper: Some(keeper),
            started_ms,
        })
    }

    /// The store's "now" for a prune: refreshes its claim and returns the claim's new store
    /// timestamp.
    pub async fn claim_now(&self, claim: &PruneClaim) -> Result<i64> {
        let name = ObjectName::Claim(claim.epoch);
        self.storage
            .put(&name.path(), claim.sealed.clone(), Write::Overwrite)
            .await?;
        self.head_object(name)
            .await?
            .map(|l| l.modified_ms)
            .ok_or_else(|| Error::malformed(name.to_string(), "vanished after it was written"))
    }

    /// Fails when a later prune has claimed an epoch (this one was judged dead and taken over):
    /// a superseded prune must not delete or publish anything.
    pub async fn check_claim_current(&self, claim: &PruneClaim) -> Result<()> {
        let claims = self.list_objects(ObjectKind::Claim).await?;
        if let Some(l) = claims.last() {
            if let ObjectName::Claim(e) = l.name {
                if e > claim.epoch {
                    return Err(Error::PruneSuperseded {
                        epoch: claim.epoch,
                        by: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Publishes plan `plan.epoch` (create-only) and applies it here. Returns it with its store
    /// timestamp, the time T of its condemnations.
    pub async fn publish_plan(&self, claim: &PruneClaim, plan: Plan) -> Result<PublishedPlan> {
        assert_eq!(
            plan.epoch, claim.epoch,
            "a plan is published by its own claim"
        );
        self.check_claim_current(claim).await?;
        let name = ObjectName::Plan(plan.epoch);
        self.put_sealed(name, &plan, Write::CreateChecked).await?;
        let published_ms = self
            .head_object(name)
            .await?
            .map(|l| l.modified_ms)
            .ok_or_else(|| Error::malformed(name.to_string(), "vanished after it was written"))?;
        self.refresh_plans().await?;
        Ok(PublishedPlan { plan, published_ms })
    }

    /// The store's current time without a claim: takes and releases a short lease.
    pub async fn clock(self: &Arc<Self>) -> Result<i64> {
        let lease = self.take_lease(LeaseKind::Prune).await?;
        let now = lease.started_ms();
        lease.release().await?;
        Ok(now)
    }
}

impl Repository {
    /// Store time of every plan applied here, by epoch.
    pub fn plan_times(&self) -> std::collections::BTreeMap<Epoch, i64> {
        self.maint
            .read()
            .expect("maintenance state lock")
            .published_ms
            .clone()
    }

    /// Deletes condemned packs for a sweep, 1,000 at a time (one multi-delete each on S3),
    /// checking before every batch that no later prune took over.
    pub async fn delete_packs(&self, claim: &PruneClaim, packs: &[PackId]) -> Result<()> {
        for batch in packs.chunks(1000) {
            self.check_claim_current(claim).await?;
            let names: Vec<ObjectName> = batch.iter().map(|p| ObjectName::Pack(*p)).collect();
            self.delete_objects(&names).await?;
        }
        Ok(())
    }

    /// Deletes index segments a published plan retired.
    pub async fn delete_segments(
        &self,
        claim: &PruneClaim,
        segments: &[crate::SegmentId],
    ) -> Result<()> {
        for batch in segments.chunks(1000) {
            self.check_claim_current(claim).await?;
            let names: Vec<ObjectName> = batch.iter().map(|s| ObjectName::Segment(*s)).collect();
            self.delete_objects(&names).await?;
        }
        Ok(())
    }
}
