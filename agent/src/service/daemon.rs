//! `blockvault agent run`: the scheduler, the control socket, metrics, webhooks and signals.
//!
//! Each job's next run time is kept in the state database. At start, a run left `running` by a
//! killed agent is recorded as `interrupted`, and a job whose stored next run has passed while the
//! agent was down runs once (however many runs were missed). A job never overlaps itself: an
//! occurrence that comes while the job is still queued or running is skipped and logged. Runs wait
//! for one of `limits.max_concurrent_runs` slots. SIGTERM, SIGINT or SIGHUP cancels running work,
//! records it as cancelled, and exits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{AgentConfig, Loaded};
use super::hyperv::PowerShell;
use super::metrics::Gauges;
use super::schedule::Schedule;
use super::state::{ts, State};
use super::webhook::{Endpoint, Webhooks};
use crate::error::{Error, Result};

/// A job run the agent knows is queued or running.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActiveRun {
    pub run: i64,
    pub job: String,
    pub trigger: String,
    pub queued: String,
    pub status: String,
    #[serde(skip)]
    pub cancel: CancellationToken,
}

pub struct Agent {
    loaded: Loaded,
    pub state: Arc<State>,
    pub webhooks: Arc<Webhooks>,
    pub gauges: Arc<Gauges>,
    pub host: String,
    slots: Arc<tokio::sync::Semaphore>,
    active: Mutex<HashMap<String, ActiveRun>>,
    stop: CancellationToken,
    wake: tokio::sync::Notify,
    started: DateTime<Utc>,
    powershell: Option<Arc<dyn PowerShell>>,
}

/// Reads the repository password file (trailing newline removed). Read again for every run, so
/// a password changed together with its file is used from the next run on, without a restart.
pub(crate) fn read_password(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let mut s = std::fs::read(path)
        .map_err(|e| Error::Config(format!("repository.password_file {}: {e}", path.display())))?;
    while matches!(s.last(), Some(b'\n' | b'\r')) {
        s.pop();
    }
    if s.is_empty() {
        return Err(Error::Config(format!(
            "repository.password_file {} is empty",
            path.display()
        )));
    }
    Ok(zeroize::Zeroizing::new(s))
}

impl Agent {
    pub fn config(&self) -> &AgentConfig {
        &self.loaded.config
    }

    pub fn powershell_override(&self) -> Option<Arc<dyn PowerShell>> {
        self.powershell.clone()
    }

    fn schedule(&self, i: usize) -> &Schedule {
        &self.loaded.schedules[i]
    }

    /// Queues a run of job `i`, unless one is already queued or running.
    fn trigger(self: &Arc<Self>, i: usize, trigger: &str) -> Result<i64> {
        let job = self.config().jobs[i].name.get_ref().clone();
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = active.get(&job) {
            return Err(Error::Input(format!(
                "job '{job}' is already {} (run {}): a job never overlaps itself",
                a.status, a.run
            )));
        }
        let now = Utc::now();
        let run = self.state.start_run(&job, trigger, now)?;
        let cancel = self.stop.child_token();
        active.insert(
            job.clone(),
            ActiveRun {
                run,
                job: job.clone(),
                trigger: trigger.into(),
                queued: ts(now),
                status: "queued".into(),
                cancel: cancel.clone(),
            },
        );
        drop(active);
        let span = tracing::info_span!("run", job = %job, run);
        tokio::spawn(
            self.clone()
                .queue_then_run(i, job, run, cancel)
                .instrument(span),
        );
        Ok(run)
    }

    /// Waits for a slot, then runs. A run cancelled while it waits never started: it is recorded
    /// as cancelled and none of its hooks run (an `after` or `on_error` hook must not undo or
    /// report work that no `before` hook prepared).
    async fn queue_then_run(
        self: Arc<Self>,
        i: usize,
        job: String,
        run: i64,
        cancel: CancellationToken,
    ) {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            p = self.slots.clone().acquire_owned() => p.ok(),
        };
        match permit {
            None => self.cancelled_in_queue(&job, run),
            Some(permit) => {
                if let Some(a) = self
                    .active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&job)
                {
                    a.status = "running".into();
                }
                self.gauges.running_runs.fetch_add(1, Ordering::Relaxed);
                super::run::run_job(self.clone(), i, run, cancel).await;
                self.gauges.running_runs.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            }
        }
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job);
        self.wake.notify_one();
    }

    fn cancelled_in_queue(&self, job: &str, run: i64) {
        const WHY: &str = "cancelled while queued";
        tracing::info!("{WHY}");
        if let Err(e) = self
            .state
            .finish_run(run, "cancelled", Some(WHY), Utc::now())
        {
            tracing::error!("recording the end of run {run}: {e}");
        }
        self.webhooks.emit(
            "run.cancelled",
            serde_json::json!({"job": job, "run": run, "status": "cancelled", "error": WHY,
                "duration_seconds": 0.0, "log_tail": ""}),
        );
    }

    fn cancel_run(&self, run: i64) -> Result<String> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        match active.values().find(|a| a.run == run) {
            Some(a) => {
                a.cancel.cancel();
                Ok(a.job.clone())
            }
            None => Err(Error::Input(format!("run {run} is not queued or running"))),
        }
    }

    fn status(&self) -> serde_json::Value {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let jobs: Vec<serde_json::Value> = self
            .config()
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let name = j.name.get_ref();
                let (last, next) = self.state.schedule(name).unwrap_or((None, None));
                serde_json::json!({
                    "job": name,
                    "schedule": self.schedule(i).text,
                    "timezone": self.schedule(i).tz.name(),
                    "last_run": last.map(ts),
                    "next_run": next.map(ts),
                    "active": active.get(name),
                })
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "started": ts(self.started),
            "running_runs": self.gauges.running_runs.load(Ordering::Relaxed),
            "webhook_pending": self.state.pending_deliveries().unwrap_or(0),
            "jobs": jobs,
        })
    }

    /// Sends `vm.no_good_backup` for each VM of a job with no successful backup for the
    /// configured hours (counted from the agent's start for a VM never backed up); again after
    /// as many hours without one.
    fn check_alerts(&self) {
        let Some(hours) = self.config().alerts.no_good_backup_hours else {
            return;
        };
        let limit = chrono::Duration::milliseconds((hours * 3_600_000.0) as i64);
        let now = Utc::now();
        let last: HashMap<String, DateTime<Utc>> = self
            .state
            .last_success_per_vm()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(vm, t)| super::state::parse_ts(&t).map(|t| (vm, t)))
            .collect();
        for j in &self.config().jobs {
            for vm in &j.vms {
                let name = vm.name.get_ref();
                let since = last.get(name).copied();
                let base = since.unwrap_or(self.started);
                if now - base < limit {
                    continue;
                }
                let sent = self.state.alert_sent(name).ok().flatten();
                if sent.is_some_and(|s| s > base && now - s < limit) {
                    continue;
                }
                tracing::warn!(vm = %name, "no good backup for {hours} hours");
                self.webhooks.emit(
                    "vm.no_good_backup",
                    serde_json::json!({"job": j.name.get_ref(), "vm": name, "hours": hours,
                        "last_success": since.map(ts)}),
                );
                let _ = self.state.set_alert_sent(name, now);
            }
        }
    }
}

/// How often overdue backups are looked for: a twentieth of the alert's hours, at least every
/// second and at most every minute (the query scans the run history).
fn alert_interval(hours: Option<f64>) -> Duration {
    let limit = hours.unwrap_or(1.0) * 3600.0;
    Duration::from_secs_f64((limit / 20.0).clamp(1.0, 60.0))
}

/// Ends, for webhook receivers, the runs a killed agent left running: each was announced by
/// `run.started` and would otherwise never end. Their `after` and release hooks are not run now:
/// what they would undo may have changed since (docs/AGENT.md).
fn report_interrupted(
    webhooks: &Webhooks,
    runs: &[super::state::InterruptedRun],
    now: DateTime<Utc>,
) {
    for r in runs {
        tracing::warn!(job = %r.job, run = r.id, "interrupted by an earlier stop of the agent");
        let secs = super::state::parse_ts(&r.started)
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        webhooks.emit(
            "run.failed",
            serde_json::json!({"job": r.job, "run": r.id, "status": "interrupted",
                "error": r.error, "duration_seconds": secs, "log_tail": ""}),
        );
    }
}

/// Options of `agent run` that tests use.
#[derive(Default)]
pub struct RunOptions {
    /// Replaces PowerShell for `hyperv` jobs (tests).
    pub powershell: Option<Arc<dyn PowerShell>>,
}

/// Binds the control socket owner-only (mode 0600).
fn bind_socket(path: &Path) -> Result<UnixListener> {
    let err = |detail: String| Error::Control {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating its directory: {e}")))?;
    }
    if path.exists() {
        // A socket nobody answers on is left by a killed agent; a live one means a second agent.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another agent is running on it".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("removing the stale socket: {e}")))?;
    }
    crate::private_socket::bind_private(path).map_err(|e| err(e.to_string()))
}

/// A request on the control socket: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    RunNow { job: String },
    Cancel { run: i64 },
}

async fn serve_control(agent: Arc<Agent>, listener: UnixListener) {
    loop {
        let (sock, _) = tokio::select! {
            _ = agent.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r).take(64 * 1024);
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
                Ok(Request::Status) => {
                    let mut v = agent.status();
                    v["ok"] = true.into();
                    v
                }
                Ok(Request::RunNow { job }) => {
                    match agent
                        .config()
                        .jobs
                        .iter()
                        .position(|j| *j.name.get_ref() == job)
                    {
                        None => {
                            serde_json::json!({"ok": false, "error": format!("no job named '{job}'")})
                        }
                        Some(i) => match agent.trigger(i, "manual") {
                            Ok(run) => serde_json::json!({"ok": true, "job": job, "run": run}),
                            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                        },
                    }
                }
                Ok(Request::Cancel { run }) => match agent.cancel_run(run) {
                    Ok(job) => serde_json::json!({"ok": true, "run": run, "job": job}),
                    Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                },
            };
            let mut out = reply.to_string();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

/// Sends one request to a running agent and returns its reply.
pub async fn request(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let err = |detail: String| Error::Control {
        path: socket.to_path_buf(),
        detail,
    };
    let s = UnixStream::connect(socket)
        .await
        .map_err(|e| err(format!("{e} (is the agent running?)")))?;
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| err(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut reply = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(r).read_line(&mut reply),
    )
    .await
    .map_err(|_| err("no reply within 30 s".into()))?
    .map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&reply).map_err(|e| err(format!("bad reply: {e}")))
}

/// Runs the agent in the foreground until SIGTERM, SIGINT or SIGHUP.
pub async fn run(loaded: Loaded, opts: RunOptions) -> Result<()> {
    let c = &loaded.config;
    // Read once at start too, so an unreadable file stops the agent rather than every run.
    read_password(&c.repository.password_file)?;
    let endpoints = c
        .webhooks
        .iter()
        .map(Endpoint::load)
        .collect::<Result<Vec<_>>>()?;
    // Held until the agent exits.
    let _state_lock = super::state::lock_state(&c.state)?;
    let state = Arc::new(State::open(&c.state)?);
    let now = Utc::now();
    let interrupted = state.mark_interrupted(now)?;
    let host = crate::vm_backup::hostname();
    let webhooks = Arc::new(Webhooks::new(endpoints, state.clone(), host.clone()));
    report_interrupted(&webhooks, &interrupted, now);
    let gauges = Arc::new(Gauges::default());
    *gauges
        .sessions_dir
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(crate::sessions::sessions_dir(
        &super::run::cache_dir(&c.repository),
    ));
    let listener = bind_socket(&c.socket)?;
    let metrics = match &c.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a.get_ref())
                .await
                .map_err(|e| Error::io(format!("metrics_listen {}", a.get_ref()), e))?,
        ),
        None => None,
    };
    let stop = CancellationToken::new();
    let agent = Arc::new(Agent {
        slots: Arc::new(tokio::sync::Semaphore::new(c.limits.max_concurrent_runs)),
        loaded,
        state: state.clone(),
        webhooks: webhooks.clone(),
        gauges: gauges.clone(),
        host,
        active: Mutex::new(HashMap::new()),
        stop: stop.clone(),
        wake: tokio::sync::Notify::new(),
        started: now,
        powershell: opts.powershell,
    });
    let socket_path = agent.config().socket.clone();
    let webhook_stop = CancellationToken::new();
    let deliveries = tokio::spawn(webhooks.clone().deliver_loop(webhook_stop.clone()));
    tokio::spawn(serve_control(agent.clone(), listener));
    if let Some(l) = metrics {
        tokio::spawn(super::metrics::serve(
            l,
            state.clone(),
            gauges.clone(),
            stop.clone(),
        ));
    }
    // Missed runs run once; then every job gets its next time.
    for i in 0..agent.config().jobs.len() {
        let name = agent.config().jobs[i].name.get_ref().clone();
        let (_, next) = state.schedule(&name)?;
        let upcoming = agent
            .schedule(i)
            .next_after(now)
            .unwrap_or(now + chrono::Duration::days(3650));
        match next {
            Some(n) if n <= now => {
                tracing::info!(job = %name, "missed the run due at {} while stopped: running it now", ts(n));
                state.set_ran(&name, now, upcoming)?;
                if let Err(e) = agent.trigger(i, "missed") {
                    tracing::warn!("{e}");
                }
            }
            _ => state.set_next(&name, upcoming)?,
        }
    }
    tracing::info!(
        pid = std::process::id(),
        "agent started with {} job(s)",
        agent.config().jobs.len()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    // The agent reads its configuration only at start; a SIGHUP (a closed terminal, a habit of
    // "reload") stops it as SIGTERM does rather than killing it mid-run.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| Error::io("installing the SIGHUP handler", e))?;
    let mut last_alert_check = std::time::Instant::now() - Duration::from_secs(3600);
    let alert_every = alert_interval(agent.config().alerts.no_good_backup_hours);
    let mut last_history_prune = std::time::Instant::now() - Duration::from_secs(86_400);
    loop {
        let now = Utc::now();
        let mut earliest = now + chrono::Duration::seconds(60);
        for i in 0..agent.config().jobs.len() {
            let name = agent.config().jobs[i].name.get_ref().clone();
            // A state database that fails (busy beyond its timeout, a full disk) must not stop
            // the agent with work running: the job is looked at again at the next tick.
            let next = match state.schedule(&name) {
                Ok((_, next)) => next,
                Err(e) => {
                    tracing::error!(job = %name, "reading the schedule: {e}");
                    continue;
                }
            };
            let Some(next) = next else { continue };
            if next <= now {
                let upcoming = agent
                    .schedule(i)
                    .next_after(now)
                    .unwrap_or(now + chrono::Duration::days(3650));
                if let Err(e) = state.set_ran(&name, now, upcoming) {
                    // Not recorded: running it now could run it again at every tick.
                    tracing::error!(job = %name, "recording the scheduled run: {e}; not started");
                    continue;
                }
                match agent.trigger(i, "schedule") {
                    Ok(run) => tracing::info!(job = %name, run, "scheduled run queued"),
                    Err(e) => tracing::warn!(job = %name, "scheduled run skipped: {e}"),
                }
                earliest = earliest.min(upcoming);
            } else {
                earliest = earliest.min(next);
            }
        }
        if last_alert_check.elapsed() >= alert_every {
            agent.check_alerts();
            last_alert_check = std::time::Instant::now();
        }
        if last_history_prune.elapsed() >= Duration::from_secs(86_400) {
            let keep = chrono::Duration::days(i64::from(agent.config().limits.history_days));
            // Checked at load (limits.history_days); a cut-off out of range keeps everything.
            let before = Utc::now()
                .checked_sub_signed(keep)
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            match state.prune_history(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!("deleted {n} run(s) older than the history limit"),
                Err(e) => tracing::warn!("pruning the run history: {e}"),
            }
            last_history_prune = std::time::Instant::now();
        }
        let wait = (earliest - Utc::now())
            .to_std()
            .unwrap_or_default()
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = agent.wake.notified() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => break,
        }
    }
    tracing::info!("stopping: cancelling running work");
    stop.cancel();
    // Runs record themselves as cancelled (release hooks included) before the agent exits.
    let deadline = std::time::Instant::now() + STOP_WAIT;
    let still_running =
        |agent: &Agent| agent.active.lock().unwrap_or_else(|p| p.into_inner()).len();
    while still_running(&agent) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = still_running(&agent);
    // Give queued webhook deliveries (the cancellation events) a moment to go out.
    let flush_until = std::time::Instant::now() + Duration::from_secs(2);
    while state.pending_deliveries().unwrap_or(0) > 0 && std::time::Instant::now() < flush_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    webhook_stop.cancel();
    let _ = deliveries.await;
    let _ = std::fs::remove_file(&socket_path);
    if left > 0 {
        // Exiting 0 would tell systemd all went well while a release hook was cut short.
        return Err(Error::StoppedEarly(format!(
            "stopped with {left} run(s) still finishing after {}s (a release hook may not have \
             completed; they are recorded as interrupted at the next start)",
            STOP_WAIT.as_secs()
        )));
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// How long a stopping agent waits for its cancelled runs (their release hooks) to finish:
/// inside the 90 s the systemd unit gives it (`TimeoutStopSec`).
const STOP_WAIT: Duration = Duration::from_secs(75);
