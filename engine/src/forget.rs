//! `forget`: removes restore points, by name or by a retention policy. Removing a point is
//! deleting its manifest, nothing else: its data stays until a prune finds it unneeded, so a
//! forget killed half way leaves only fewer points, never a damaged one.
//!
//! A policy never removes a protected point, nor the newest point of each VM's disk set (the
//! parent the next RCT incremental builds on); naming a point removes it unless it is protected.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use blockvault_repo::{PointId, PointManifest, Repository, StorageStats};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::retention::{self, PointFacts, Policy};
use crate::{Error, Result};

/// What to forget.
#[derive(Clone, Debug)]
pub enum ForgetTarget {
    /// These points, named by the user.
    Points(Vec<PointId>),
    /// What `policy` does not keep, among the points of `vm` (every VM, each on its own, when
    /// `None`).
    Policy { vm: Option<String>, policy: Policy },
}

#[derive(Clone, Debug)]
pub struct ForgetOptions {
    pub target: ForgetTarget,
    pub dry_run: bool,
    /// Time zone whose calendar defines the policy's hours, days, weeks, months and years.
    pub tz: UtcOffset,
}

/// The verdict on one point.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetDecision {
    pub id: PointId,
    pub vm: String,
    pub created: String,
    pub keep: bool,
    /// Why it is kept (the rules that keep it), or why it is removed.
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// Newest first per VM, VMs by name.
    pub decisions: Vec<ForgetDecision>,
    pub kept: u64,
    pub removed: u64,
    /// Points whose manifest could not be read: never removed by a policy, listed here.
    pub unreadable: Vec<PointId>,
    pub storage: StorageStats,
}

/// The key of a VM's disk set: its name and the sorted names of its disks.
fn disk_set(p: &PointManifest) -> (String, Vec<String>) {
    let mut disks: Vec<String> = p.disks.iter().map(|d| d.name.clone()).collect();
    disks.sort();
    (p.vm.clone(), disks)
}

/// When a point was created, as an instant: RFC 3339 texts do not sort as their times do
/// (`05.5Z` sorts after `05.55Z`, offsets differ). An unreadable time sorts before every other.
fn created_at(p: &PointManifest) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&p.created, &Rfc3339).ok()
}

/// The newest point of each VM's disk set.
pub fn newest_per_disk_set(points: &[PointManifest]) -> HashSet<PointId> {
    let mut newest: BTreeMap<(String, Vec<String>), (Option<OffsetDateTime>, PointId)> =
        BTreeMap::new();
    for p in points {
        let mine = (created_at(p), p.id);
        newest
            .entry(disk_set(p))
            .and_modify(|q| *q = (*q).max(mine))
            .or_insert(mine);
    }
    newest.values().map(|(_, id)| *id).collect()
}

/// The verdict on a named point whose manifest is listed but cannot be read: it is removed as
/// it is, the only way to clear it (every prune refuses to run while it is there).
fn unreadable_named(id: PointId, why: &str) -> ForgetDecision {
    ForgetDecision {
        id,
        vm: "(unreadable)".into(),
        created: String::new(),
        keep: false,
        reasons: vec![format!(
            "named; its manifest could not be read ({why}) and is deleted as it is"
        )],
    }
}

/// Decides without touching the repository: the pure part of `forget`. `unreadable` holds the
/// listed points whose manifest could not be read, with the reason: a policy leaves them alone,
/// naming one removes it.
pub fn decide(
    points: &[PointManifest],
    unreadable: &[(PointId, String)],
    protected: &HashSet<PointId>,
    target: &ForgetTarget,
    now: OffsetDateTime,
    tz: UtcOffset,
) -> Result<Vec<ForgetDecision>> {
    let created = |p: &PointManifest| p.created.clone();
    match target {
        ForgetTarget::Points(ids) => {
            let want: HashSet<PointId> = ids.iter().copied().collect();
            let broken: BTreeMap<PointId, &str> =
                unreadable.iter().map(|(id, e)| (*id, e.as_str())).collect();
            for id in &want {
                if !points.iter().any(|p| p.id == *id) && !broken.contains_key(id) {
                    return Err(Error::Repo(blockvault_repo::Error::PointNotFound(
                        id.to_hex(),
                    )));
                }
                if protected.contains(id) {
                    return Err(Error::Invalid(format!(
                        "restore point {id} is protected; run 'blockvault points unprotect \
                         {id}' first"
                    )));
                }
            }
            let mut decisions: Vec<ForgetDecision> = points
                .iter()
                .filter(|p| want.contains(&p.id))
                .map(|p| ForgetDecision {
                    id: p.id,
                    vm: p.vm.clone(),
                    created: created(p),
                    keep: false,
                    reasons: vec!["named".into()],
                })
                .collect();
            decisions.extend(
                broken
                    .iter()
                    .filter(|(id, _)| want.contains(id))
                    .map(|(id, why)| unreadable_named(*id, why)),
            );
            Ok(decisions)
        }
        ForgetTarget::Policy { vm, policy } => {
            let chosen: Vec<&PointManifest> = points
                .iter()
                .filter(|p| vm.as_ref().is_none_or(|v| &p.vm == v))
                .collect();
            let mut facts = Vec::with_capacity(chosen.len());
            for p in &chosen {
                let at = OffsetDateTime::parse(&p.created, &Rfc3339).map_err(|e| {
                    Error::Invalid(format!(
                        "restore point {}: creation time '{}' is not RFC 3339 ({e})",
                        p.id, p.created
                    ))
                })?;
                facts.push(PointFacts {
                    id: p.id,
                    vm: p.vm.clone(),
                    created: at,
                    tags: p.tags.clone(),
                    protected: protected.contains(&p.id),
                });
            }
            let owned: Vec<PointManifest> = chosen.iter().map(|p| (*p).clone()).collect();
            let newest = newest_per_disk_set(&owned);
            let by_id: BTreeMap<PointId, &PointManifest> =
                chosen.iter().map(|p| (p.id, *p)).collect();
            let decisions = retention::apply(policy, &facts, now, tz)?;
            Ok(decisions
                .into_iter()
                .map(|d| {
                    let mut reasons = d.reasons;
                    let mut keep = d.keep;
                    if newest.contains(&d.id) {
                        keep = true;
                        reasons
                            .push("newest of its disk set (the next incremental's parent)".into());
                    }
                    ForgetDecision {
                        id: d.id,
                        vm: d.vm,
                        created: by_id.get(&d.id).map(|p| created(p)).unwrap_or_default(),
                        keep,
                        reasons,
                    }
                })
                .collect())
        }
    }
}

/// Runs `forget`: decides, then (unless a dry run) deletes the manifests of removed points one by
/// one.
pub async fn forget(repo: Arc<Repository>, opts: ForgetOptions) -> Result<ForgetReport> {
    let before = repo.storage().stats();
    let (points, unreadable) = repo.list_points().await?;
    let unreadable: Vec<(PointId, String)> = unreadable
        .into_iter()
        .map(|(id, e)| (id, e.to_string()))
        .collect();
    let protected = repo.protected_points().await?;
    let decisions = decide(
        &points,
        &unreadable,
        &protected,
        &opts.target,
        OffsetDateTime::now_utc(),
        opts.tz,
    )?;
    let mut report = ForgetReport {
        dry_run: opts.dry_run,
        // Those named are removed below, and reported as decisions.
        unreadable: unreadable
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !decisions.iter().any(|d| d.id == *id))
            .collect(),
        ..Default::default()
    };
    // Boot traces are found through listed points only: a forgotten point's trace is dead
    // weight. One listing, and a delete for each removed point that has one.
    let traced = if opts.dry_run || decisions.iter().all(|d| d.keep) {
        Default::default()
    } else {
        repo.boot_trace_points().await?
    };
    for d in &decisions {
        if d.keep {
            report.kept += 1;
        } else {
            report.removed += 1;
            if !opts.dry_run {
                repo.delete_point(&d.id).await?;
                if traced.contains(&d.id) {
                    repo.delete_boot_trace(&d.id).await?;
                }
            }
        }
    }
    report.decisions = decisions;
    let after = repo.storage().stats();
    report.storage = StorageStats {
        requests: after.requests - before.requests,
        bytes_uploaded: after.bytes_uploaded - before.bytes_uploaded,
        bytes_downloaded: after.bytes_downloaded - before.bytes_downloaded,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(vm: &str, created: &str) -> PointManifest {
        PointManifest {
            version: 1,
            id: PointId::random(),
            vm: vm.into(),
            host: "h".into(),
            created: created.into(),
            tags: vec![],
            chunk_size: 65536,
            slots_per_page: 4096,
            disks: vec![],
            configs: vec![],
            duration_ms: 0,
        }
    }

    #[test]
    fn the_newest_point_is_the_latest_instant_not_the_greatest_text() {
        // As text, "05.5Z" sorts after "05.55Z", and "+02:00" hides an earlier instant.
        let half = point("vm", "2026-03-01T10:00:05.5Z");
        let later = point("vm", "2026-03-01T10:00:05.55Z");
        let east = point("vm", "2026-03-01T11:00:06+02:00");
        let newest = newest_per_disk_set(&[half.clone(), later.clone(), east]);
        assert_eq!(newest, HashSet::from([later.id]));
        let newest = newest_per_disk_set(&[later.clone(), half.clone()]);
        assert_eq!(newest, HashSet::from([later.id]));
        // Each VM's disk set on its own.
        let other = point("other", "2020-01-01T00:00:00Z");
        let newest = newest_per_disk_set(&[half, later.clone(), other.clone()]);
        assert_eq!(newest, HashSet::from([later.id, other.id]));
    }

    #[test]
    fn naming_an_unreadable_point_removes_it_and_a_policy_leaves_it_alone() {
        let ok = point("vm", "2026-03-01T10:00:00Z");
        let (broken, unknown) = (PointId::random(), PointId::random());
        let unreadable = vec![(broken, "authentication failed".to_string())];
        let now = OffsetDateTime::now_utc();
        let none = HashSet::new();
        let named = ForgetTarget::Points(vec![broken]);
        let d = decide(
            std::slice::from_ref(&ok),
            &unreadable,
            &none,
            &named,
            now,
            UtcOffset::UTC,
        )
        .unwrap();
        assert_eq!(d.len(), 1);
        assert!(!d[0].keep && d[0].id == broken);
        assert!(d[0].reasons[0].contains("could not be read (authentication failed)"));
        // Protected, it is refused like any protected point.
        let protected = HashSet::from([broken]);
        assert!(decide(
            std::slice::from_ref(&ok),
            &unreadable,
            &protected,
            &named,
            now,
            UtcOffset::UTC
        )
        .is_err());
        // A point neither readable nor listed is still not found.
        let missing = ForgetTarget::Points(vec![unknown]);
        assert!(decide(
            std::slice::from_ref(&ok),
            &unreadable,
            &none,
            &missing,
            now,
            UtcOffset::UTC
        )
        .is_err());
        // A policy decides about readable points only.
        let policy = ForgetTarget::Policy {
            vm: None,
            policy: Policy {
                keep_last: Some(1),
                ..Policy::default()
            },
        };
        let d = decide(
            std::slice::from_ref(&ok),
            &unreadable,
            &none,
            &policy,
            now,
            UtcOffset::UTC,
        )
        .unwrap();
        assert!(d.iter().all(|d| d.id == ok.id && d.keep));
    }
}
