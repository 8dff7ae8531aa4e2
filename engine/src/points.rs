//! What `points list`, `points show` and `repo info` report, as typed values the CLI renders (as
//! text, or as JSON from the same structs) and the agent can use.

use std::collections::HashMap;
use std::sync::Arc;

use blockvault_repo::{BackupKind, LeaseKind, PointId, PointManifest, PointStatus, Repository};
use serde::Serialize;

use crate::verify::describe_state;
use crate::{rfc3339_ms, Result};

/// Each point's verify state, from the newest verify record (points stored after it have none).
pub struct VerifyStates {
    /// The record's name, if there is one.
    pub record: Option<String>,
    states: HashMap<PointId, PointStatus>,
}

/// A point's verify state as reported: the recorded status, or `never`, with the record's name.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum VerifyView {
    Recorded {
        #[serde(flatten)]
        status: PointStatus,
        record: Option<String>,
    },
    Never {
        state: &'static str,
        record: Option<String>,
    },
}

impl VerifyStates {
    /// Unreadable records are logged, and every point then shows "never".
    pub async fn load(repo: &Repository) -> Self {
        let (record, states) = match repo.latest_verify_record().await {
            Ok(Some((name, rec))) => (
                Some(name.to_string()),
                rec.points.into_iter().map(|p| (p.point, p)).collect(),
            ),
            Ok(None) => (None, HashMap::new()),
            Err(e) => {
                tracing::warn!(error = %e, "verify records unreadable");
                (None, HashMap::new())
            }
        };
        Self { record, states }
    }

    pub fn view(&self, id: &PointId) -> VerifyView {
        match self.states.get(id) {
            Some(s) => VerifyView::Recorded {
                status: s.clone(),
                record: self.record.clone(),
            },
            None => VerifyView::Never {
                state: "never",
                record: self.record.clone(),
            },
        }
    }
}

impl VerifyView {
    /// The recorded status, unless the point was never verified.
    pub fn status(&self) -> Option<&PointStatus> {
        match self {
            Self::Recorded { status, .. } => Some(status),
            Self::Never { .. } => None,
        }
    }

    /// One line for people: `verified 2026-11-30T…`, `damaged: …`, `never verified`.
    pub fn text(&self) -> String {
        self.status()
            .map(describe_state)
            .unwrap_or_else(|| "never verified".into())
    }
}

/// A disk in a point's summary.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    pub name: String,
    pub size: u64,
    pub kind: BackupKind,
}

/// One line of `points list`.
#[derive(Debug, Clone, Serialize)]
pub struct PointSummary {
    pub id: PointId,
    pub vm: String,
    pub host: String,
    pub created: String,
    pub tags: Vec<String>,
    pub disks: Vec<DiskSummary>,
    pub verify: VerifyView,
}

impl PointSummary {
    pub fn of(m: &PointManifest, verify: &VerifyStates) -> Self {
        Self {
            id: m.id,
            vm: m.vm.clone(),
            host: m.host.clone(),
            created: m.created.clone(),
            tags: m.tags.clone(),
            disks: m
                .disks
                .iter()
                .map(|d| DiskSummary {
                    name: d.name.clone(),
                    size: d.size,
                    kind: d.kind.clone(),
                })
                .collect(),
            verify: verify.view(&m.id),
        }
    }
}

/// A disk of a point's boot trace, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct TracedDisk {
    pub name: String,
    pub chunks: usize,
    pub span_ms: u64,
}

/// Whether and when a point's boot trace was recorded.
#[derive(Debug, Clone, Serialize)]
pub struct BootTraceSummary {
    pub recorded: String,
    pub disks: Vec<TracedDisk>,
}

/// `points show`: the manifest, its boot trace and its verify state.
#[derive(Debug, Clone, Serialize)]
pub struct PointDetail {
    #[serde(flatten)]
    pub manifest: PointManifest,
    pub boot_trace: Option<BootTraceSummary>,
    pub verify: VerifyView,
}

impl PointDetail {
    pub async fn load(repo: &Repository, id: &PointId) -> Result<Self> {
        let manifest = repo.load_point(id).await?;
        let verify = VerifyStates::load(repo).await;
        let boot_trace = repo.load_boot_trace(id).await?.map(|t| BootTraceSummary {
            recorded: t.recorded,
            disks: t
                .disks
                .iter()
                .map(|d| TracedDisk {
                    name: d.name.clone(),
                    chunks: d.slots.len(),
                    span_ms: d.span_ms,
                })
                .collect(),
        });
        Ok(Self {
            verify: verify.view(id),
            manifest,
            boot_trace,
        })
    }
}

/// The last prune, from the newest published plan.
#[derive(Debug, Clone, Serialize)]
pub struct LastPrune {
    pub epoch: u64,
    pub host: String,
    /// Store time of the plan's publication.
    pub published: String,
    pub deleted_packs: u64,
}

/// A lease, as `repo info` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    pub id: String,
    pub kind: LeaseKind,
    pub host: String,
    pub pid: u32,
    pub started: String,
    pub live: bool,
}

/// Maintenance state for `repo info`.
#[derive(Debug, Clone, Serialize)]
pub struct MaintenanceState {
    /// Newest published plan: epoch, host and store time of the last prune.
    pub last_prune: Option<LastPrune>,
    /// Packs condemned and not yet deleted.
    pub pending_packs: u64,
    pub pending_bytes: u64,
    /// Live leases, and stale ones other than a prune's.
    pub leases: Vec<LeaseView>,
}

impl MaintenanceState {
    pub async fn load(repo: &Arc<Repository>) -> Result<Self> {
        repo.refresh_plans().await?;
        let epoch = repo.maintenance_epoch();
        let mut st = MaintenanceState {
            last_prune: None,
            pending_packs: 0,
            pending_bytes: 0,
            leases: Vec::new(),
        };
        if epoch > 0 {
            if let Some(plan) = repo.read_plan(epoch).await? {
                st.pending_packs = plan.condemned.len() as u64;
                st.pending_bytes = plan.condemned.iter().map(|c| c.size).sum();
                st.last_prune = Some(LastPrune {
                    epoch,
                    host: plan.host.clone(),
                    published: repo
                        .plan_times()
                        .get(&epoch)
                        .map(|ms| rfc3339_ms(*ms))
                        .unwrap_or_default(),
                    deleted_packs: plan.deleted.len() as u64,
                });
            }
        }
        let now = repo.clock().await?;
        for l in repo.leases(now).await? {
            if l.record.kind == LeaseKind::Prune && !l.live {
                continue;
            }
            st.leases.push(LeaseView {
                id: l.record.id.to_hex(),
                kind: l.record.kind,
                host: l.record.host,
                pid: l.record.pid,
                started: rfc3339_ms(l.started_ms),
                live: l.live,
            });
        }
        Ok(st)
    }
}
