//! The agent's state in one SQLite file: each job's last and next run, the run history (one row
//! per job run, one per VM of it), and pending webhook deliveries. Every change is one committed
//! transaction in WAL mode with `synchronous = FULL`, so a `kill -9` at any moment leaves the file
//! as of the last commit; a run found still `running` at start is marked `interrupted`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::error::{Error, Result};

pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// A job's last and next run times, as the schedules table keeps them.
pub type LastAndNext = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// One job run.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    /// `schedule`, `missed` (caught up at start), or `manual` (run-now).
    pub trigger: String,
    pub started: String,
    pub ended: Option<String>,
    /// running, success, partial (some VMs failed), failed, cancelled, interrupted.
    pub status: String,
    pub error: Option<String>,
    pub vms: Vec<VmRunRecord>,
}

/// One VM of a job run.
#[derive(Clone, Debug, Serialize)]
pub struct VmRunRecord {
    pub run: i64,
    pub job: String,
    pub vm: String,
    pub started: String,
    pub ended: Option<String>,
    /// running, success, failed, cancelled, interrupted.
    pub status: String,
    pub attempts: u32,
    pub point: Option<String>,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub full_reason: Option<String>,
    pub consistency: Option<String>,
    pub error: Option<String>,
    pub log_tail: String,
}

/// A run found `running` at start (its agent was killed), as it was marked `interrupted`.
#[derive(Clone, Debug)]
pub struct InterruptedRun {
    pub id: i64,
    pub job: String,
    pub started: String,
    pub error: String,
}

/// A webhook delivery waiting to be sent.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: i64,
    pub url: String,
    pub event: String,
    pub body: String,
    pub attempts: u32,
}

pub struct State {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS schedules (
    job TEXT PRIMARY KEY,
    last_run TEXT,
    next_run TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    trigger TEXT NOT NULL,
    started TEXT NOT NULL,
    ended TEXT,
    status TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS vm_runs (
    run INTEGER NOT NULL REFERENCES runs(id),
    vm TEXT NOT NULL,
    started TEXT NOT NULL,
    ended TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    point TEXT,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_new INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    full_reason TEXT,
    consistency TEXT,
    error TEXT,
    log_tail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run, vm)
);
CREATE INDEX IF NOT EXISTS vm_runs_vm ON vm_runs(vm, ended);
CREATE TABLE IF NOT EXISTS webhook_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt TEXT NOT NULL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    vm TEXT PRIMARY KEY,
    sent TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_totals (
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, status)
);
CREATE TABLE IF NOT EXISTS byte_totals (
    job TEXT NOT NULL,
    vm TEXT NOT NULL,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_new INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, vm)
);
";

/// The schema version in `PRAGMA user_version`: 1 has the totals tables, filled from the history
/// a version-0 database already holds.
const SCHEMA_VERSION: i64 = 1;

/// Fills the totals of a database from before they existed with what its history holds (once).
const SEED_TOTALS: &str = "
INSERT OR IGNORE INTO run_totals(job, status, runs)
    SELECT job, status, COUNT(*) FROM runs WHERE status NOT IN ('running', 'queued') GROUP BY job, status;
INSERT OR IGNORE INTO byte_totals(job, vm, bytes_read, bytes_new, bytes_stored)
    SELECT r.job, v.vm, SUM(v.bytes_read), SUM(v.bytes_new), SUM(v.bytes_stored)
    FROM vm_runs v JOIN runs r ON r.id = v.run WHERE v.status = 'success' GROUP BY r.job, v.vm;
";

/// Adds one ended run to the totals the metrics count (history pruning leaves them alone).
const COUNT_RUN: &str = "INSERT INTO run_totals(job, status, runs) VALUES (?1, ?2, 1) ON CONFLICT(job, status) DO UPDATE SET runs = runs + 1";

/// Brings a database written by an older agent to [`SCHEMA_VERSION`].
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        tx.execute_batch(SEED_TOTALS)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()
}

impl State {
    /// Opens (creating) the database. The file is created owner-only: history names VMs and paths.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |e: rusqlite::Error| Error::State {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// Opens an existing database read-only (for `runs list/show` beside a running agent).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::State {
                path: path.to_path_buf(),
                detail: "no such file (has the agent run yet?)".into(),
            });
        }
        Self::open(path)
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        Error::State {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&c).map_err(|e| self.err(e))
    }

    /// Marks runs a killed agent left `running` as `interrupted`; returns them as marked.
    pub fn mark_interrupted(&self, now: DateTime<Utc>) -> Result<Vec<InterruptedRun>> {
        let now = ts(now);
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "UPDATE vm_runs SET status='interrupted', ended=?1, error=COALESCE(error, 'the agent stopped during this backup') WHERE status='running'",
                params![now],
            )?;
            let runs = {
                let mut st = tx.prepare(
                    "UPDATE runs SET status='interrupted', ended=?1, error=COALESCE(error, 'the agent stopped during this run') WHERE status='running' RETURNING id, job, started, error",
                )?;
                let rows = st.query_map(params![now], |r| {
                    Ok(InterruptedRun {
                        id: r.get(0)?,
                        job: r.get(1)?,
                        started: r.get(2)?,
                        error: r.get(3)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            for r in &runs {
                tx.execute(COUNT_RUN, params![r.job, "interrupted"])?;
            }
            tx.commit()?;
            Ok(runs)
        })
    }

    /// A job's last and next run times.
    pub fn schedule(&self, job: &str) -> Result<LastAndNext> {
        self.with(|c| {
            let r: Option<(Option<String>, Option<String>)> = c
                .query_row(
                    "SELECT last_run, next_run FROM schedules WHERE job=?1",
                    params![job],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(match r {
                Some((l, n)) => (
                    l.as_deref().and_then(parse_ts),
                    n.as_deref().and_then(parse_ts),
                ),
                None => (None, None),
            })
        })
    }

    pub fn set_next(&self, job: &str, next: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO schedules(job, next_run) VALUES (?1, ?2) ON CONFLICT(job) DO UPDATE SET next_run=?2",
                params![job, ts(next)],
            )
            .map(|_| ())
        })
    }

    /// Records that the job started a run at `when` whose next run is `next`.
    pub fn set_ran(&self, job: &str, when: DateTime<Utc>, next: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO schedules(job, last_run, next_run) VALUES (?1, ?2, ?3) ON CONFLICT(job) DO UPDATE SET last_run=?2, next_run=?3",
                params![job, ts(when), ts(next)],
            )
            .map(|_| ())
        })
    }

    pub fn start_run(&self, job: &str, trigger: &str, now: DateTime<Utc>) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs(job, trigger, started, status) VALUES (?1, ?2, ?3, 'running')",
                params![job, trigger, ts(now)],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn finish_run(
        &self,
        run: i64,
        status: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            // Counted once, when it ends: a run recorded twice is not two runs.
            let job: Option<String> = tx
                .query_row(
                    "SELECT job FROM runs WHERE id=?1 AND status='running'",
                    params![run],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "UPDATE runs SET status=?2, error=?3, ended=?4 WHERE id=?1",
                params![run, status, error, ts(now)],
            )?;
            if let Some(job) = job {
                tx.execute(COUNT_RUN, params![job, status])?;
            }
            tx.commit()
        })
    }

    pub fn start_vm(&self, run: i64, vm: &str, now: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO vm_runs(run, vm, started, status) VALUES (?1, ?2, ?3, 'running')",
                params![run, vm, ts(now)],
            )
            .map(|_| ())
        })
    }

    pub fn update_vm(&self, r: &VmRunRecord) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let was: Option<String> = tx
                .query_row(
                    "SELECT status FROM vm_runs WHERE run=?1 AND vm=?2",
                    params![r.run, r.vm],
                    |row| row.get(0),
                )
                .optional()?;
            tx.execute(
                "UPDATE vm_runs SET ended=?3, status=?4, attempts=?5, point=?6, bytes_read=?7, bytes_new=?8, bytes_stored=?9, full_reason=?10, consistency=?11, error=?12, log_tail=?13 WHERE run=?1 AND vm=?2",
                params![
                    r.run,
                    r.vm,
                    r.ended,
                    r.status,
                    r.attempts,
                    r.point,
                    r.bytes_read as i64,
                    r.bytes_new as i64,
                    r.bytes_stored as i64,
                    r.full_reason,
                    r.consistency,
                    r.error,
                    r.log_tail
                ],
            )?;
            // A backup's bytes are added once, when its VM row becomes a success.
            if r.status == "success" && was.is_some_and(|w| w != "success") {
                tx.execute(
                    "INSERT INTO byte_totals(job, vm, bytes_read, bytes_new, bytes_stored) SELECT job, ?2, ?3, ?4, ?5 FROM runs WHERE id=?1 ON CONFLICT(job, vm) DO UPDATE SET bytes_read = bytes_read + excluded.bytes_read, bytes_new = bytes_new + excluded.bytes_new, bytes_stored = bytes_stored + excluded.bytes_stored",
                    params![
                        r.run,
                        r.vm,
                        r.bytes_read as i64,
                        r.bytes_new as i64,
                        r.bytes_stored as i64
                    ],
                )?;
            }
            tx.commit()
        })
    }

    fn vm_rows(
        c: &Connection,
        sql: &str,
        p: &[&dyn rusqlite::ToSql],
    ) -> rusqlite::Result<Vec<VmRunRecord>> {
        let mut st = c.prepare(sql)?;
        let rows = st.query_map(p, |r| {
            Ok(VmRunRecord {
                run: r.get("run")?,
                job: r.get("job")?,
                vm: r.get("vm")?,
                started: r.get("started")?,
                ended: r.get("ended")?,
                status: r.get("status")?,
                attempts: r.get("attempts")?,
                point: r.get("point")?,
                bytes_read: r.get::<_, i64>("bytes_read")? as u64,
                bytes_new: r.get::<_, i64>("bytes_new")? as u64,
                bytes_stored: r.get::<_, i64>("bytes_stored")? as u64,
                full_reason: r.get("full_reason")?,
                consistency: r.get("consistency")?,
                error: r.get("error")?,
                log_tail: r.get("log_tail")?,
            })
        })?;
        rows.collect()
    }

    const VM_SELECT: &'static str = "SELECT v.run, r.job, v.vm, v.started, v.ended, v.status, v.attempts, v.point, v.bytes_read, v.bytes_new, v.bytes_stored, v.full_reason, v.consistency, v.error, v.log_tail FROM vm_runs v JOIN runs r ON r.id = v.run";

    /// VM runs, newest first, optionally of one job and/or one VM.
    pub fn list_vm_runs(
        &self,
        job: Option<&str>,
        vm: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VmRunRecord>> {
        self.with(|c| {
            let sql = format!(
                "{} WHERE (?1 IS NULL OR r.job = ?1) AND (?2 IS NULL OR v.vm = ?2) ORDER BY v.run DESC, v.vm LIMIT ?3",
                Self::VM_SELECT
            );
            Self::vm_rows(c, &sql, params![job, vm, limit as i64])
        })
    }

    /// Job runs, newest first, with their VMs.
    pub fn list_runs(&self, job: Option<&str>, limit: usize) -> Result<Vec<RunRecord>> {
        let ids: Vec<i64> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id FROM runs WHERE (?1 IS NULL OR job = ?1) ORDER BY id DESC LIMIT ?2",
            )?;
            let v = st
                .query_map(params![job, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            Ok(v)
        })?;
        ids.into_iter()
            .filter_map(|id| self.run(id).transpose())
            .collect()
    }

    pub fn run(&self, id: i64) -> Result<Option<RunRecord>> {
        self.with(|c| {
            let r = c
                .query_row(
                    "SELECT id, job, trigger, started, ended, status, error FROM runs WHERE id=?1",
                    params![id],
                    |r| {
                        Ok(RunRecord {
                            id: r.get(0)?,
                            job: r.get(1)?,
                            trigger: r.get(2)?,
                            started: r.get(3)?,
                            ended: r.get(4)?,
                            status: r.get(5)?,
                            error: r.get(6)?,
                            vms: vec![],
                        })
                    },
                )
                .optional()?;
            let Some(mut r) = r else { return Ok(None) };
            let sql = format!("{} WHERE v.run = ?1 ORDER BY v.vm", Self::VM_SELECT);
            r.vms = Self::vm_rows(c, &sql, params![id])?;
            Ok(Some(r))
        })
    }

    /// When each VM last had a successful backup: (vm, time).
    pub fn last_success_per_vm(&self) -> Result<Vec<(String, String)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT vm, MAX(ended) FROM vm_runs WHERE status='success' GROUP BY vm ORDER BY vm",
            )?;
            let v = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
            Ok(v)
        })
    }

    /// Ended runs per (job, status) since the state database was made, for the metrics: kept
    /// apart from the history, so pruning it never makes a counter go down.
    pub fn run_counts(&self) -> Result<Vec<(String, String, u64)>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT job, status, runs FROM run_totals ORDER BY job, status")?;
            let v = st
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })
    }

    /// Bytes read/new/stored by successful VM backups, per (job, vm), since the state database
    /// was made (kept apart from the history, like [`State::run_counts`]).
    pub fn byte_sums(&self) -> Result<Vec<(String, String, [u64; 3])>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT job, vm, bytes_read, bytes_new, bytes_stored FROM byte_totals ORDER BY job, vm",
            )?;
            let v = st
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        [
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, i64>(3)? as u64,
                            r.get::<_, i64>(4)? as u64,
                        ],
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })
    }

    // --- webhook queue ---

    pub fn enqueue(&self, url: &str, event: &str, body: &str, now: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO webhook_queue(url, event, body, next_attempt) VALUES (?1, ?2, ?3, ?4)",
                params![url, event, body, ts(now)],
            )
            .map(|_| ())
        })
    }

    /// The due deliveries, oldest first, at most `per_url` of each endpoint: a dead endpoint's
    /// backlog must not fill the batch and hold back the others.
    pub fn due_deliveries(&self, now: DateTime<Utc>, per_url: usize) -> Result<Vec<Delivery>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, url, event, body, attempts FROM (
                    SELECT id, url, event, body, attempts,
                        ROW_NUMBER() OVER (PARTITION BY url ORDER BY id) AS nth
                    FROM webhook_queue WHERE next_attempt <= ?1
                ) WHERE nth <= ?2 ORDER BY id",
            )?;
            let v = st
                .query_map(params![ts(now), per_url as i64], |r| {
                    Ok(Delivery {
                        id: r.get(0)?,
                        url: r.get(1)?,
                        event: r.get(2)?,
                        body: r.get(3)?,
                        attempts: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })
    }

    pub fn delivered(&self, id: i64) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM webhook_queue WHERE id=?1", params![id])
                .map(|_| ())
        })
    }

    pub fn delivery_failed(&self, id: i64, next: DateTime<Utc>, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE webhook_queue SET attempts=attempts+1, next_attempt=?2, last_error=?3 WHERE id=?1",
                params![id, ts(next), error],
            )
            .map(|_| ())
        })
    }

    /// The last error recorded for delivery `id`.
    #[cfg(test)]
    pub(crate) fn delivery_error(&self, id: i64) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT last_error FROM webhook_queue WHERE id=?1",
                params![id],
                |r| r.get(0),
            )
        })
    }

    pub fn pending_deliveries(&self) -> Result<u64> {
        self.with(|c| {
            c.query_row("SELECT COUNT(*) FROM webhook_queue", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
        })
    }

    /// When the no-good-backup alert for `vm` was last sent.
    pub fn alert_sent(&self, vm: &str) -> Result<Option<DateTime<Utc>>> {
        self.with(|c| {
            c.query_row("SELECT sent FROM alerts WHERE vm=?1", params![vm], |r| {
                r.get::<_, String>(0)
            })
            .optional()
        })
        .map(|s| s.as_deref().and_then(parse_ts))
    }

    pub fn set_alert_sent(&self, vm: &str, now: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO alerts(vm, sent) VALUES (?1, ?2) ON CONFLICT(vm) DO UPDATE SET sent=?2",
                params![vm, ts(now)],
            )
            .map(|_| ())
        })
    }
}

/// The lock beside a state database that only one agent holds: the file name with `.lock`
/// appended (`agent.db.lock`).
pub fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    state.with_file_name(name)
}

/// Takes the exclusive lock of the state database `state` for as long as the returned file is
/// open. Two agents on one state file would both run every job, and the second one's start would
/// mark the first one's running runs as interrupted: the lock is taken before anything is read.
/// The lock is released by the kernel when the process ends, however it ends; the file is closed
/// in hooks and other children (opened close-on-exec).
pub fn lock_state(state: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(state);
    let err = |detail: String| Error::State {
        path: path.clone(),
        detail,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(format!("opening the lock: {e}")))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(err(format!(
            "another agent is using the state database {} (it holds this lock); one state \
             file serves one agent",
            state.display()
        ))),
        Err(e) => Err(err(format!("locking: {e}"))),
    }
}

impl State {
    /// Deletes the finished runs (and their VM rows) that ended before `before`; returns how
    /// many runs went. Running and queued runs stay whatever their age.
    pub fn prune_history(&self, before: DateTime<Utc>) -> Result<usize> {
        let before = ts(before);
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "DELETE FROM vm_runs WHERE run IN (SELECT id FROM runs WHERE ended IS NOT NULL AND ended < ?1 AND status NOT IN ('running', 'queued'))",
                params![before],
            )?;
            let n = tx.execute(
                "DELETE FROM runs WHERE ended IS NOT NULL AND ended < ?1 AND status NOT IN ('running', 'queued')",
                params![before],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_older_than_the_limit_goes_and_running_runs_stay() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(&d.path().join("s.db")).unwrap();
        let now = Utc::now();
        let old = now - chrono::Duration::days(500);
        let gone = s.start_run("nightly", "schedule", old).unwrap();
        s.start_vm(gone, "web", old).unwrap();
        s.finish_run(gone, "success", None, old).unwrap();
        let stuck = s.start_run("nightly", "schedule", old).unwrap();
        let kept = s.start_run("nightly", "schedule", now).unwrap();
        s.finish_run(kept, "success", None, now).unwrap();
        assert_eq!(
            s.prune_history(now - chrono::Duration::days(400)).unwrap(),
            1
        );
        let ids: Vec<i64> = s
            .list_runs(None, 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert!(
            ids.contains(&stuck) && ids.contains(&kept) && !ids.contains(&gone),
            "{ids:?}"
        );
        let rows: i64 = s
            .with(|c| c.query_row("SELECT COUNT(*) FROM vm_runs", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(rows, 0, "the old run's VM row went with it");
    }

    fn vm_success(run: i64, job: &str, bytes: u64, at: DateTime<Utc>) -> VmRunRecord {
        VmRunRecord {
            run,
            job: job.into(),
            vm: "web".into(),
            started: ts(at),
            ended: Some(ts(at)),
            status: "success".into(),
            attempts: 1,
            point: None,
            bytes_read: bytes,
            bytes_new: bytes,
            bytes_stored: bytes,
            full_reason: None,
            consistency: None,
            error: None,
            log_tail: String::new(),
        }
    }

    /// The metrics' counters count every run that ended and every byte backed up, and neither
    /// goes down when the history they came from is pruned; a running run is in none of them.
    #[test]
    fn totals_survive_history_pruning_and_leave_running_runs_out() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(&d.path().join("s.db")).unwrap();
        let now = Utc::now();
        let old = now - chrono::Duration::days(500);
        for at in [old, now] {
            let r = s.start_run("nightly", "schedule", at).unwrap();
            s.start_vm(r, "web", at).unwrap();
            let mut rec = vm_success(r, "nightly", 100, at);
            s.update_vm(&rec).unwrap();
            // Recorded again (a last log line): counted once.
            rec.log_tail = "done".into();
            s.update_vm(&rec).unwrap();
            s.finish_run(r, "success", None, at).unwrap();
            s.finish_run(r, "success", None, at).unwrap();
        }
        s.start_run("nightly", "manual", now).unwrap();
        let counts = || s.run_counts().unwrap();
        let bytes = || s.byte_sums().unwrap();
        let expected_counts = vec![("nightly".to_string(), "success".to_string(), 2)];
        let expected_bytes = vec![("nightly".to_string(), "web".to_string(), [200; 3])];
        assert_eq!(counts(), expected_counts);
        assert_eq!(bytes(), expected_bytes);
        assert_eq!(
            s.prune_history(now - chrono::Duration::days(400)).unwrap(),
            1
        );
        assert_eq!(counts(), expected_counts);
        assert_eq!(bytes(), expected_bytes);
    }

    /// A database from before the totals existed starts them from the history it holds.
    #[test]
    fn totals_of_an_older_database_start_from_its_history() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.db");
        let now = Utc::now();
        {
            let s = State::open(&p).unwrap();
            let r = s.start_run("nightly", "schedule", now).unwrap();
            s.start_vm(r, "web", now).unwrap();
            s.update_vm(&vm_success(r, "nightly", 7, now)).unwrap();
            s.finish_run(r, "partial", None, now).unwrap();
            s.with(|c| {
                c.execute_batch(
                    "DELETE FROM run_totals; DELETE FROM byte_totals; PRAGMA user_version = 0;",
                )
            })
            .unwrap();
        }
        let s = State::open(&p).unwrap();
        assert_eq!(
            s.run_counts().unwrap(),
            [("nightly".to_string(), "partial".to_string(), 1)]
        );
        assert_eq!(
            s.byte_sums().unwrap(),
            [("nightly".to_string(), "web".to_string(), [7; 3])]
        );
        // Seeded once: reopening adds nothing.
        drop(s);
        let s = State::open(&p).unwrap();
        assert_eq!(s.run_counts().unwrap()[0].2, 1);
    }

    #[test]
    fn a_dead_endpoints_backlog_leaves_room_for_the_others() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(&d.path().join("s.db")).unwrap();
        let now = Utc::now();
        for _ in 0..40 {
            s.enqueue("http://dead.invalid/hook", "run.started", "{}", now)
                .unwrap();
        }
        s.enqueue("http://live.invalid/hook", "run.failed", "{}", now)
            .unwrap();
        let due = s.due_deliveries(now, 32).unwrap();
        assert!(
            due.iter().any(|d| d.url == "http://live.invalid/hook"),
            "{due:?}"
        );
        let dead: Vec<i64> = due
            .iter()
            .filter(|d| d.url == "http://dead.invalid/hook")
            .map(|d| d.id)
            .collect();
        assert_eq!(dead.len(), 32);
        assert!(
            dead.windows(2).all(|w| w[0] < w[1]),
            "oldest first: {dead:?}"
        );
        assert_eq!(dead[0], 1);
    }

    #[test]
    fn a_second_lock_of_one_state_file_is_refused_naming_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state").join("agent.db");
        let first = lock_state(&p).unwrap();
        let e = lock_state(&p).unwrap_err().to_string();
        assert!(
            e.contains("agent.db.lock") && e.contains("another agent is using"),
            "{e}"
        );
        drop(first);
        lock_state(&p).unwrap();
    }

    #[test]
    fn history_survives_reopen_and_running_becomes_interrupted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.db");
        let now = Utc::now();
        {
            let s = State::open(&p).unwrap();
            let r = s.start_run("nightly", "schedule", now).unwrap();
            s.start_vm(r, "web", now).unwrap();
            s.set_ran("nightly", now, now).unwrap();
            s.enqueue("http://127.0.0.1:1/x", "run.started", "{}", now)
                .unwrap();
        }
        let s = State::open(&p).unwrap();
        let marked = s.mark_interrupted(Utc::now()).unwrap();
        assert_eq!(marked.len(), 1);
        assert_eq!(marked[0].job, "nightly");
        assert_eq!(marked[0].error, "the agent stopped during this run");
        assert!(s.mark_interrupted(Utc::now()).unwrap().is_empty());
        let runs = s.list_runs(None, 10).unwrap();
        assert_eq!(runs[0].status, "interrupted");
        assert_eq!(runs[0].vms[0].status, "interrupted");
        assert_eq!(s.pending_deliveries().unwrap(), 1);
        assert!(s.schedule("nightly").unwrap().0.is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "state file must be owner-only");
    }
}
