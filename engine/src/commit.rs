//! The backup's side of the maintenance contract (docs/OPERATIONS.md, "Backups and prune").
//!
//! At start, an incremental whose parent's chunks or pages sit in packs the current plan
//! condemns, or were found damaged, reads those ranges from the source again instead of reusing
//! them.
//!
//! At commit, the backup knows the maintenance epoch it started from and the packs it relies on
//! (its own new packs, the packs of its dedup hits, the packs of the parent chunks it reused).
//! A pack condemned by a newer plan is safe to rely on only if the manifest becomes visible
//! before any sweep could re-mark: before T + grace of that plan. The manifest is written, its
//! store time W read back, and if W is too late (the backup was paused, or ran longer than the
//! grace period) the manifest is deleted again and the backup fails clearly. A pack a newer plan
//! already deleted fails the backup before anything is written.

use std::collections::HashSet;
use std::sync::Arc;

use blockvault_chunker::RangeSet;
use blockvault_repo::{
    ChunkId, Epoch, ObjectName, PackId, PointManifest, Repository, SLOTS_PER_PAGE,
};

use crate::backup::{DiskJob, ReadPlan};
use crate::{Error, Result};

/// For an incremental: when the current plan condemns anything or verification found anything
/// damaged, every parent page or chunk that is not usable for dedup (its pack condemned, deleted
/// or unknown, or its copy damaged) is read from the source again: its range joins the changed
/// ranges, and a page not usable is rebuilt from scratch. So an incremental heals a damaged
/// chunk in a range the guest has not written since, as a full backup would.
pub(crate) async fn revalidate_parent(repo: &Arc<Repository>, job: &mut DiskJob) -> Result<()> {
    let ReadPlan::Incremental {
        parent_pages,
        changed,
        ..
    } = &mut job.plan
    else {
        return Ok(());
    };
    if repo.condemned_packs().is_empty() && !repo.knows_damage() {
        return Ok(());
    }
    let chunk = repo.chunk_size() as u64;
    let size = job.source.size();
    let page_span = chunk * SLOTS_PER_PAGE as u64;
    let mut extra = Vec::new();
    for (n, page) in parent_pages.iter_mut().enumerate() {
        let Some(id) = *page else { continue };
        let page_start = n as u64 * page_span;
        let page_end = (page_start + page_span).min(size);
        if !usable(repo, id).await? {
            *page = None;
            extra.push(page_start..page_end);
            continue;
        }
        let slots = (page_end - page_start).div_ceil(chunk) as usize;
        let loaded = repo.load_page(&id, slots).await?;
        for (i, slot) in loaded.slots.iter().enumerate() {
            let Some(c) = slot else { continue };
            if !usable(repo, *c).await? {
                let at = page_start + i as u64 * chunk;
                extra.push(at..(at + chunk).min(size));
            }
        }
    }
    if !extra.is_empty() {
        tracing::info!(
            disk = %job.name,
            ranges = extra.len(),
            "parent data sits in condemned packs or was found damaged; reading those ranges again"
        );
        let mut all: Vec<std::ops::Range<u64>> = changed.ranges().to_vec();
        all.extend(extra);
        *changed = RangeSet::from_ranges(all);
    }
    Ok(())
}

async fn usable(repo: &Arc<Repository>, id: ChunkId) -> Result<bool> {
    let r = repo.clone();
    Ok(tokio::task::spawn_blocking(move || r.lookup_for_dedup(&id))
        .await
        .map_err(Error::task)??
        .is_some())
}

/// Packs holding every page and chunk `point` references, per the local index: a superset of
/// what the backup relied on (its dedup hits, its own packs, and the parent's pages and chunks
/// an incremental reused without reading them).
/// `Ok(Err(what))` names something the point references that is no longer stored; `Err` is a
/// failure to find out (a store error, damage).
async fn point_packs(
    repo: &Arc<Repository>,
    point: &PointManifest,
) -> Result<Result<HashSet<PackId>, Gone>> {
    let mut ids = Vec::new();
    for c in &point.configs {
        ids.extend(c.blobs.iter().map(|b| b.0));
    }
    for d in &point.disks {
        for (n, page) in d.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            let slots = d.page_slots(point.chunk_size, n);
            let loaded = match repo.load_page(&page.0, slots).await {
                Ok(l) => l,
                // Gone: what a newer plan's deletion explains. Anything else (a store error,
                // damage) is reported as itself, not as a prune's doing.
                Err(
                    blockvault_repo::Error::ChunkMissing { .. }
                    | blockvault_repo::Error::PackMissing { .. },
                ) => return Ok(Err(Gone(format!("chunk-map page {}", page.0.short())))),
                Err(e) => return Err(e.into()),
            };
            ids.push(page.0);
            ids.extend(loaded.slots.into_iter().flatten());
        }
    }
    let r = repo.clone();
    let packs = tokio::task::spawn_blocking(move || {
        let mut out = HashSet::new();
        for id in ids {
            match r.lookup(&id)? {
                Some(l) => {
                    out.insert(l.pack);
                }
                None => return Ok(Err(id)),
            }
        }
        Ok::<_, blockvault_repo::Error>(Ok(out))
    })
    .await
    .map_err(Error::task)??;
    Ok(packs.map_err(|id| Gone(format!("chunk {}", id.short()))))
}

/// Something a point references that is no longer stored.
struct Gone(String);

impl Gone {
    /// The error a commit fails with: a conflict with the newest plan that deleted packs, else
    /// the thing that is gone.
    fn into_error(self, plans: &[blockvault_repo::PublishedPlan]) -> Error {
        match plans.iter().rev().find(|p| !p.plan.deleted.is_empty()) {
            Some(p) => conflict(p.plan.epoch),
            None => Error::Invalid(format!(
                "{} this backup reuses is no longer stored; run the backup again",
                self.0
            )),
        }
    }
}

fn conflict(epoch: Epoch) -> Error {
    Error::PruneConflict { epoch }
}

/// Writes `point`'s manifest unless a maintenance plan newer than `start_epoch` condemned or
/// deleted a pack it relies on too late for the next sweep's re-mark to see the point (see the
/// module documentation). On failure no manifest is left behind.
pub(crate) async fn commit(
    repo: &Arc<Repository>,
    point: &PointManifest,
    start_epoch: Epoch,
    relied: HashSet<PackId>,
) -> Result<()> {
    let mut relied = Relied {
        packs: relied,
        complete: false,
    };
    let plans = repo.plans_after(start_epoch).await?;
    if touches(&plans) {
        if let Err(gone) = relied.complete(repo, point).await? {
            // Something the point names is gone: a newer plan deleted it.
            return Err(gone.into_error(&plans));
        }
        for p in &plans {
            if p.plan.deleted.iter().any(|d| relied.packs.contains(d)) {
                return Err(conflict(p.plan.epoch));
            }
        }
    }
    if let Err(e) = repo.save_point(point).await {
        // The put may have landed though it failed (its answer lost, a retry refused): a
        // manifest that was never checked must not stand. Gone already is what we want.
        return Err(match repo.delete_point(&point.id).await {
            Ok(()) => e.into(),
            Err(d) if d.is_not_found() => e.into(),
            Err(d) => Error::Invalid(format!(
                "{e}; restore point {id} may have been written and could not be taken back \
                 ({d}): run 'blockvault forget {id}'",
                id = point.id
            )),
        });
    }
    // Plans published while the manifest was written are checked too; a failure to read them is
    // a failed check like any other (the point is taken back below).
    let checked = async {
        let plans = repo.plans_after(start_epoch).await?;
        if !touches(&plans) {
            return Ok(());
        }
        if let Err(gone) = relied.complete(repo, point).await? {
            return Err(gone.into_error(&plans));
        }
        let name = ObjectName::Point(point.id);
        let written_ms = repo
            .head_object(name)
            .await?
            .map(|l| l.modified_ms)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "restore point {} vanished right after it was written",
                    point.id
                ))
            })?;
        for p in &plans {
            let deleted = p.plan.deleted.iter().any(|d| relied.packs.contains(d));
            let late = p
                .plan
                .newly_condemned()
                .any(|c| relied.packs.contains(&c.pack))
                && written_ms.saturating_add(crate::gc::CLOCK_SLACK_MS)
                    >= p.published_ms.saturating_add(p.plan.grace_ms as i64);
            if deleted || late {
                return Err(conflict(p.plan.epoch));
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        // Not a point that may reference a missing chunk: take it back. If that fails too, the
        // operator must hear of both, and which point to forget.
        if let Err(d) = repo.delete_point(&point.id).await {
            return Err(Error::Invalid(format!(
                "{e}; restore point {id} could not be taken back ({d}): it may name data a prune \
                 deleted, run 'blockvault forget {id}'",
                id = point.id
            )));
        }
        return Err(e);
    }
    Ok(())
}

fn touches(plans: &[blockvault_repo::PublishedPlan]) -> bool {
    plans
        .iter()
        .any(|p| p.plan.newly_condemned().next().is_some() || !p.plan.deleted.is_empty())
}

struct Relied {
    packs: HashSet<PackId>,
    complete: bool,
}

impl Relied {
    /// Adds the packs of everything the point references (once).
    async fn complete(
        &mut self,
        repo: &Arc<Repository>,
        point: &PointManifest,
    ) -> Result<Result<(), Gone>> {
        if !self.complete {
            match point_packs(repo, point).await? {
                Ok(packs) => self.packs.extend(packs),
                Err(gone) => return Ok(Err(gone)),
            }
            self.complete = true;
        }
        Ok(Ok(()))
    }
}
