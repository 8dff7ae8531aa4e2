//! Counters a caller can read while the server runs (a "sessions" view for the CLI/daemon).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

/// Milliseconds since the first call, for cheap atomic timestamps.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

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
    /// When the connection was opened (`now_ms`).
    opened_ms: u64,
    /// Set once negotiation is over.
    transmitting: AtomicBool,
    /// Requests being processed or waiting for their reply.
    in_flight: AtomicU64,
    /// When the last request arrived or the last reply was queued (`now_ms`).
    active_ms: AtomicU64,
    /// Cancelling it closes the connection (gracefully, like a server shutdown).
    close: CancellationToken,
    evicted: AtomicBool,
}

impl Session {
    /// How long the connection has been idle, if it may be closed to make room: a connection
    /// still negotiating after `handshake_grace`, or one in transmission with nothing in flight
    /// for `idle_after`.
    fn idle_for(&self, now: u64, handshake_grace: Duration, idle_after: Duration) -> Option<u64> {
        if self.evicted.load(Ordering::Relaxed) {
            return None;
        }
        if !self.transmitting.load(Ordering::Acquire) {
            let age = now.saturating_sub(self.opened_ms);
            return (age >= handshake_grace.as_millis() as u64).then_some(age);
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle = now.saturating_sub(self.active_ms.load(Ordering::Acquire));
        (idle >= idle_after.as_millis() as u64).then_some(idle)
    }
}

#[derive(Default)]
struct Inner {
    totals: Counters,
    active: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    denied: AtomicU64,
    evicted: AtomicU64,
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
    /// Connections closed at once because the cap was reached and no idle one could make room.
    pub rejected_connections: u64,
    /// Connections refused because the client address is not allowed (`allow_from`).
    pub denied_connections: u64,
    /// Idle connections closed to make room for a new client.
    pub evicted_connections: u64,
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
            denied_connections: i.denied.load(Ordering::Relaxed),
            evicted_connections: i.evicted.load(Ordering::Relaxed),
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

    pub(crate) fn denied(&self) {
        self.inner.denied.fetch_add(1, Ordering::Relaxed);
    }

    /// Closes the connection that has been idle longest among those that may be closed to
    /// make room (see `Session::idle_for`); returns whether one was found.
    pub(crate) fn evict_idle(&self, handshake_grace: Duration, idle_after: Duration) -> bool {
        let now = now_ms();
        let sessions = lock(&self.inner.sessions);
        // A client still negotiating goes before any in transmission, however long that one has
        // been quiet: a newcomer, which has shown no credentials yet, must not be able to cut
        // off a guest while an unauthenticated connection could make the room instead.
        let victim = sessions
            .iter()
            .filter_map(|(&id, s)| {
                s.idle_for(now, handshake_grace, idle_after).map(|t| {
                    let negotiating = !s.transmitting.load(Ordering::Acquire);
                    (negotiating, t, id, s)
                })
            })
            .max_by_key(|&(negotiating, t, id, _)| (negotiating, t, std::cmp::Reverse(id)))
            .map(|(_, t, id, s)| (t, id, s));
        let Some((idle_ms, id, s)) = victim else {
            return false;
        };
        s.evicted.store(true, Ordering::Relaxed);
        s.close.cancel();
        self.inner.evicted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            id,
            peer = %s.peer,
            idle_ms,
            "closing an idle connection to make room for a new client"
        );
        true
    }

    /// Registers a connection; it is removed when the returned guard drops. Cancelling
    /// `close` must end the connection.
    pub(crate) fn open_session(&self, peer: String, close: CancellationToken) -> SessionGuard {
        let i = &self.inner;
        let id = i.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        i.accepted.fetch_add(1, Ordering::Relaxed);
        i.active.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            peer,
            export: Mutex::new(None),
            started: SystemTime::now(),
            counters: Counters::default(),
            opened_ms: now_ms(),
            transmitting: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            active_ms: AtomicU64::new(now_ms()),
            close,
            evicted: AtomicBool::new(false),
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
        self.session.active_ms.store(now_ms(), Ordering::Release);
        self.session.transmitting.store(true, Ordering::Release);
    }

    /// A request was received and dispatched.
    pub(crate) fn request_started(&self) {
        self.session.in_flight.fetch_add(1, Ordering::AcqRel);
        self.session.active_ms.store(now_ms(), Ordering::Release);
    }

    /// A dispatched request's reply was queued.
    pub(crate) fn request_finished(&self) {
        self.session.active_ms.store(now_ms(), Ordering::Release);
        self.session.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// How long the connection has had no request in flight; `None` while one is.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.session.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.session.active_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(since)))
    }

    /// Whether the connection was closed to make room for another.
    pub(crate) fn was_evicted(&self) -> bool {
        self.session.evicted.load(Ordering::Relaxed)
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
