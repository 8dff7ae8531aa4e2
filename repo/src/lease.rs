//! Leases: how a running backup, mount or verify tells maintenance "I may still need what I
//! read". A lease is `leases/<id>`, sealed, written create-only and then overwritten every refresh
//! interval by a background task until it is released. A lease never blocks anyone: it only delays
//! the deletion of packs condemned while it was alive.
//!
//! Liveness is judged from the object store's own timestamps only: a lease is live when the
//! store's "now" (the modification time of an object the judge just wrote) is at most three of the
//! lease's own refresh intervals after the lease's last modification. A lease's start is the store
//! time of its first write, recorded in its body by the first refresh.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::format::LEASE_VERSION;
use crate::objects::{LeaseId, ObjectName};
use crate::storage::Write;
use crate::{Repository, Result};

/// Default refresh interval of leases and prune claims.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// A lease or claim not refreshed for this many of its intervals is dead.
pub const STALE_AFTER_INTERVALS: u64 = 3;

/// The refresh interval: `BLOCKVAULT_LEASE_REFRESH_SECS` (seconds, fractions allowed; for tests)
/// or [`DEFAULT_REFRESH`].
pub fn refresh_interval() -> Duration {
    std::env::var("BLOCKVAULT_LEASE_REFRESH_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_REFRESH)
}

/// What holds the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseKind {
    Backup,
    Mount,
    Verify,
    Prune,
}

/// The sealed body of `leases/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub version: u32,
    pub id: LeaseId,
    pub kind: LeaseKind,
    pub host: String,
    pub pid: u32,
    /// The holder's refresh interval, so a judge applies the holder's own rule.
    pub refresh_ms: u64,
    /// Store time (Unix ms) of the lease's first write; absent only in that first write.
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// The holder's local clock at start, RFC 3339: shown to people, never used to decide.
    pub created: String,
}

/// True while an object refreshed every `refresh_ms` and last modified at `modified_ms` is live
/// at store time `now_ms`. One second of slack covers stores that keep whole seconds.
pub fn is_live(refresh_ms: u64, modified_ms: i64, now_ms: i64) -> bool {
    let bound = refresh_ms.saturating_mul(STALE_AFTER_INTERVALS) as i64 + 1000;
    now_ms.saturating_sub(modified_ms) <= bound
}

/// A lease as seen by a judge: its record, the store time of its last refresh, and whether it is
/// live at the judge's store time.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseState {
    pub record: LeaseRecord,
    pub modified_ms: i64,
    /// Store time of the lease's start (the first write).
    pub started_ms: i64,
    pub live: bool,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A background task that overwrites one object with the same sealed bytes every interval,
/// keeping its store timestamp fresh. Dropping it stops the refreshes.
pub(crate) struct Keeper {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Keeper {
    pub(crate) fn start(
        repo: Arc<Repository>,
        name: ObjectName,
        bytes: Bytes,
        every: Duration,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(every) => {}
                }
                // Refreshes go straight to storage: they are not steps of the operation
                // (the crash-test hook counts only those).
                if let Err(e) = repo
                    .storage
                    .put(&name.path(), bytes.clone(), Write::Overwrite)
                    .await
                {
                    tracing::warn!(object = %name, error = %e, "refresh failed; will retry");
                }
            }
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops refreshing and waits until no refresh is in flight, so a delete that follows is not
    /// undone by a late overwrite.
    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A held lease. Release it with [`Lease::release`]; dropping it stops the refresher and deletes
/// the object best-effort in the background.
pub struct Lease {
    repo: Arc<Repository>,
    id: LeaseId,
    started_ms: i64,
    keeper: Option<Keeper>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.id)
    }
}

impl Lease {
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Store time (Unix ms) at which the lease was first written.
    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// Stops refreshing and deletes the lease object.
    pub async fn release(mut self) -> Result<()> {
        if let Some(k) = self.keeper.take() {
            k.stop().await;
        }
        self.repo
            .storage
            .delete(&ObjectName::Lease(self.id).path())
            .await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            let (repo, id) = (self.repo.clone(), self.id);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    k.stop().await;
                    let _ = repo.storage.delete(&ObjectName::Lease(id).path()).await;
                });
            }
        }
    }
}

impl Repository {
    /// Writes `leases/<id>` create-only and keeps it fresh from a background task until the
    /// returned [`Lease`] is released (or dropped). A lease never blocks anyone; it only delays
    /// deletions by prune.
    pub async fn take_lease(self: &Arc<Self>, kind: LeaseKind) -> Result<Lease> {
        let id = LeaseId::random();
        let name = ObjectName::Lease(id);
        let every = refresh_interval();
        let mut record = LeaseRecord {
            version: LEASE_VERSION,
            id,
            kind,
            host: hostname(),
            pid: std::process::id(),
            refresh_ms: every.as_millis().max(1) as u64,
            started_ms: None,
            created: now_rfc3339(),
        };
        self.put_sealed(name, &record, Write::CreateUnique).await?;
        let started_ms = match self.head_object(name).await? {
            Some(l) => l.modified_ms,
            None => {
                return Err(crate::Error::malformed(
                    name.to_string(),
                    "vanished right after it was written",
                ))
            }
        };
        record.started_ms = Some(started_ms);
        let sealed = Bytes::from(name.seal_json(&self.keys, &record));
        self.storage
            .put(&name.path(), sealed.clone(), Write::Overwrite)
            .await?;
        let keeper = Keeper::start(self.clone(), name, sealed, every);
        Ok(Lease {
            repo: self.clone(),
            id,
            started_ms,
            keeper: Some(keeper),
        })
    }

    /// Every lease in the repository, judged live or dead at store time `now_ms`. A lease that
    /// cannot be read is an error: a judge must not guess about it.
    pub async fn leases(&self, now_ms: i64) -> Result<Vec<LeaseState>> {
        let mut out = Vec::new();
        for l in self.list_objects(crate::objects::ObjectKind::Lease).await? {
            // Released between the listing and the read: nothing to judge.
            let Some(record) = self.get_sealed::<LeaseRecord>(l.name).await? else {
                continue;
            };
            let modified_ms = l.modified_ms;
            out.push(LeaseState {
                started_ms: record.started_ms.unwrap_or(modified_ms),
                live: is_live(record.refresh_ms, modified_ms, now_ms),
                modified_ms,
                record,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_holders_interval() {
        assert!(is_live(1000, 10_000, 14_000));
        assert!(!is_live(1000, 10_000, 14_001));
        assert!(is_live(60_000, 0, 181_000));
        // A store clock behind the lease's own stamp is not a reason to call it dead.
        assert!(is_live(1000, 10_000, 9_000));
    }
}
