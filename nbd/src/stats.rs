//! Counters a caller can read while the server runs (a "sessions" view for the CLI/daemon).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn add(&self, read: u64, written: u64, error: bool) {
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        self.bytes_written.fetch_add(written, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Session {
    peer: String,
    export: Mutex<Option<String>>,
    started: SystemTime,
    counters: Counters,
}

#[derive(Default)]
struct Inner {
    totals: Counters,
    active: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, Arc<Session>>>,
}

/// A cheap, cloneable handle on the server's counters.
#[derive(Clone, Default)]
pub struct ServerStats {
    inner: Arc<Inner>,
}

/// Totals and per-connection figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub active_connections: u64,
    /// Connections accepted since the server started (within the connection cap).
    pub total_connections: u64,
    /// Connections closed at once because the cap was reached.
    pub rejected_connections: u64,
    /// Bytes sent to clients by READ.
    pub bytes_read: u64,
    /// Bytes received from clients by WRITE.
    pub bytes_written: u64,
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    pub sessions: Vec<SessionSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionSnapshot {
    pub id: u64,
    pub peer: String,
    /// `None` while the client is still negotiating.
    pub export: Option<String>,
    pub started: SystemTime,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub requests: u64,
    pub errors: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let i = &self.inner;
        let sessions = lock(&i.sessions)
            .iter()
            .map(|(&id, s)| SessionSnapshot {
                id,
                peer: s.peer.clone(),
                export: lock(&s.export).clone(),
                started: s.started,
                bytes_read: s.counters.bytes_read.load(Ordering::Relaxed),
                bytes_written: s.counters.bytes_written.load(Ordering::Relaxed),
                requests: s.counters.requests.load(Ordering::Relaxed),
                errors: s.counters.errors.load(Ordering::Relaxed),
            })
            .collect();
        StatsSnapshot {
            active_connections: i.active.load(Ordering::Relaxed),
            total_connections: i.accepted.load(Ordering::Relaxed),
            rejected_connections: i.rejected.load(Ordering::Relaxed),
            bytes_read: i.totals.bytes_read.load(Ordering::Relaxed),
            bytes_written: i.totals.bytes_written.load(Ordering::Relaxed),
            requests: i.totals.requests.load(Ordering::Relaxed),
            errors: i.totals.errors.load(Ordering::Relaxed),
            sessions,
        }
    }

    pub(crate) fn rejected(&self) {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a connection; it is removed when the returned guard drops.
    pub(crate) fn open_session(&self, peer: String) -> SessionGuard {
        let i = &self.inner;
        let id = i.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        i.accepted.fetch_add(1, Ordering::Relaxed);
        i.active.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            peer,
            export: Mutex::new(None),
            started: SystemTime::now(),
            counters: Counters::default(),
        });
        lock(&i.sessions).insert(id, session.clone());
        SessionGuard {
            stats: self.clone(),
            id,
            session,
        }
    }
}

/// One connection's entry in [`ServerStats`].
pub(crate) struct SessionGuard {
    stats: ServerStats,
    id: u64,
    session: Arc<Session>,
}

impl SessionGuard {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn set_export(&self, name: &str) {
        *lock(&self.session.export) = Some(name.to_owned());
    }

    pub(crate) fn record(&self, read: u64, written: u64, error: bool) {
        self.session.counters.add(read, written, error);
        self.stats.inner.totals.add(read, written, error);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let i = &self.stats.inner;
        lock(&i.sessions).remove(&self.id);
        i.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
