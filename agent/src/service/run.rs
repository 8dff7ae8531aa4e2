//! One run of a job: hooks, each VM captured, backed up and released (retried with backoff while
//! the job's other VMs go on), then retention (forget, prune) and verify; every step recorded in
//! the state database and reported by webhook.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockvault_engine::{
    forget, prune, verify, ForgetOptions, ForgetTarget, Progress, PruneOptions, Selection, Verdict,
    VerifyOptions,
};
use blockvault_repo::{OpenOptions, Repository, Storage, StoreOptions};
use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{JobConfig, RepositoryConfig, SourceKind, VerifyPolicy, VmConfig};
use super::daemon::Agent;
use super::hooks::{run_hook, LogTail};
use super::hyperv::{HypervSource, RealPowerShell};
use super::sources::{FilesSource, VmContext, VmSource};
use super::state::{ts, VmRunRecord};
use crate::error::{Error, Result};
use crate::vm_backup::{self, BackupReport, BackupRequest};

/// The repository's cache directory: the configured one, else the user's cache.
pub fn cache_dir(c: &RepositoryConfig) -> PathBuf {
    if let Some(d) = &c.cache_dir {
        return d.clone();
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("blockvault");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(".cache").join("blockvault");
    }
    PathBuf::from("/var/tmp/blockvault")
}

/// Opens the configured repository (once per job run: the local index is not held between runs,
/// so the CLI can use the same cache meanwhile).
pub async fn open_repository(agent: &Agent) -> Result<Arc<Repository>> {
    let c = &agent.config().repository;
    let l = &agent.config().limits;
    let mut so = StoreOptions {
        s3_endpoint: c.s3_endpoint.clone(),
        s3_allow_http: c.s3_allow_http,
        limit_upload: l.upload_bytes_per_sec,
        limit_download: l.download_bytes_per_sec,
        ..StoreOptions::default()
    };
    if let Some(n) = l.s3_concurrency {
        so.concurrency = n.max(1);
    }
    // The same operator knobs as the CLI's (a shorter outage budget).
    if let Some(v) = std::env::var("BLOCKVAULT_S3_RETRY_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        so.retry_timeout = Duration::from_secs(v);
    }
    if let Some(v) = std::env::var("BLOCKVAULT_S3_REQUEST_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        so.request_timeout = Duration::from_secs(v.max(1));
    }
    let storage = Storage::open_with(&c.location, false, &so)?;
    let opts = OpenOptions {
        cache_dir: cache_dir(c),
        zstd_level: c.compression_level,
    };
    let password = super::daemon::read_password(&c.password_file)?;
    Ok(Repository::open(storage, &password, &opts).await?)
}

/// How a VM ended.
struct VmOutcome {
    ok: bool,
    cancelled: bool,
}

/// Runs job `job` as run `run`. Never returns an error: everything is recorded.
pub async fn run_job(agent: Arc<Agent>, job_idx: usize, run: i64, cancel: CancellationToken) {
    let job = &agent.config().jobs[job_idx];
    let name = job.name.get_ref().clone();
    let started = Instant::now();
    tracing::info!("run started");
    agent
        .webhooks
        .emit("run.started", json!({"job": name, "run": run}));
    let log = LogTail::default();
    let env = vec![
        ("BLOCKVAULT_JOB", name.clone()),
        ("BLOCKVAULT_RUN", run.to_string()),
    ];
    let hook_timeout = Duration::from_secs(job.hooks.timeout_secs);
    let mut error: Option<String> = None;
    let mut outcomes: Vec<VmOutcome> = Vec::new();
    let mut maintenance_error: Option<String> = None;
    if let Some(cmd) = &job.hooks.before {
        if let Err(e) = run_hook("before", cmd, &env, hook_timeout, &log, &cancel).await {
            error = Some(e.to_string());
        }
    }
    let repo = if error.is_none() && !cancel.is_cancelled() {
        match tokio::select! {
            r = open_repository(&agent) => r,
            _ = cancel.cancelled() => Err(Error::Cancelled),
        } {
            Ok(r) => Some(r),
            Err(e) => {
                error = Some(format!("opening the repository: {e}"));
                None
            }
        }
    } else {
        None
    };
    if let Some(repo) = &repo {
        let per_job = Arc::new(tokio::sync::Semaphore::new(job.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for vm in &job.vms {
            let (agent, repo, per_job, cancel) =
                (agent.clone(), repo.clone(), per_job.clone(), cancel.clone());
            let vm = vm.clone();
            let span = tracing::info_span!("vm", vm = %vm.name.get_ref());
            tasks.spawn(
                async move {
                    let _permit = per_job.acquire_owned().await;
                    let outcome = back_up_vm(&agent, job_idx, run, &vm, repo, cancel).await;
                    (vm.name.get_ref().clone(), outcome)
                }
                .instrument(span),
            );
        }
        let mut backed_up = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok((vm, o)) => {
                    if o.ok {
                        backed_up.push(vm);
                    }
                    outcomes.push(o);
                }
                Err(_) => outcomes.push(VmOutcome {
                    ok: false,
                    cancelled: false,
                }),
            }
        }
        if !cancel.is_cancelled() {
            if let Err(e) = run_maintenance(job, &backed_up, repo.clone(), &cancel).await {
                tracing::error!("{e}");
                maintenance_error = Some(e);
            }
        }
        if let Some(v) = &job.verify {
            if v.after_backup && !cancel.is_cancelled() && outcomes.iter().any(|o| o.ok) {
                if let Some(e) = run_verify(&agent, &name, run, repo.clone(), v, &cancel).await {
                    maintenance_error = Some(match maintenance_error {
                        Some(m) => format!("{m}; {e}"),
                        None => e,
                    });
                }
            }
        }
        if let Ok(packs) = repo.list_packs().await {
            agent
                .gauges
                .repository_bytes
                .store(packs.iter().map(|(_, s)| s).sum(), Ordering::Relaxed);
        }
    }
    drop(repo);
    let cancelled = cancel.is_cancelled() || outcomes.iter().any(|o| o.cancelled);
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    let status = if cancelled {
        "cancelled"
    } else if error.is_some() || (failed > 0 && failed == outcomes.len()) {
        "failed"
    } else if failed > 0 {
        "partial"
    } else {
        "success"
    };
    // Backups that worked are not undone by a failed forget or prune, but the run is not a
    // success either: the operator must see that retention did not happen.
    let status = match (&maintenance_error, status) {
        (Some(_), "success") => "partial",
        (_, s) => s,
    };
    if error.is_none() && failed > 0 && !cancelled {
        error = Some(format!("{failed} of {} VMs failed", outcomes.len()));
    }
    if let Some(m) = maintenance_error {
        error = Some(match error {
            Some(e) => format!("{e}; {m}"),
            None => m,
        });
    }
    if status != "success" {
        if let Some(cmd) = &job.hooks.on_error {
            let mut env = env.clone();
            env.push(("BLOCKVAULT_STATUS", status.into()));
            let never = CancellationToken::new();
            let _ = run_hook("on_error", cmd, &env, hook_timeout, &log, &never).await;
        }
    }
    if let Some(cmd) = &job.hooks.after {
        let mut env = env.clone();
        env.push(("BLOCKVAULT_STATUS", status.into()));
        let never = CancellationToken::new();
        let _ = run_hook("after", cmd, &env, hook_timeout, &log, &never).await;
    }
    let secs = started.elapsed().as_secs_f64();
    agent
        .gauges
        .durations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone(), secs);
    if let Err(e) = agent
        .state
        .finish_run(run, status, error.as_deref(), Utc::now())
    {
        tracing::error!("recording the end of run {run}: {e}");
    }
    tracing::info!(status, "run ended after {secs:.1}s");
    let event = match status {
        "success" => "run.finished",
        "cancelled" => "run.cancelled",
        // A partial run finished, with failures: both facts are events of their own (vm.failed).
        "partial" => "run.finished",
        _ => "run.failed",
    };
    agent.webhooks.emit(
        event,
        json!({"job": name, "run": run, "status": status, "error": error, "duration_seconds": secs, "log_tail": log.text()}),
    );
}

/// The job's retention after its backups: `forget` with the job's rules over the points of each
/// VM backed up in this run, on their own, then `prune` when the job asks for it. A VM whose
/// backup failed keeps its points: time-based rules (`keep-within`, daily ...) must not thin out
/// the last good backups of a VM that has stopped backing up. Another host's prune in progress is
/// not a failure: that prune does the work.
async fn run_maintenance(
    job: &JobConfig,
    backed_up: &[String],
    repo: Arc<Repository>,
    cancel: &CancellationToken,
) -> std::result::Result<(), String> {
    if let Some(policy) = &job.retention {
        let tz = job_offset(job);
        for vm in backed_up {
            let vm = vm.clone();
            let opts = ForgetOptions {
                target: ForgetTarget::Policy {
                    vm: Some(vm.clone()),
                    policy: policy.get_ref().clone(),
                },
                dry_run: false,
                tz,
            };
            let r = tokio::select! {
                r = forget(repo.clone(), opts) => r,
                _ = cancel.cancelled() => return Ok(()),
            };
            match r {
                Ok(rep) => tracing::info!(
                    vm = %vm,
                    "retention kept {} point(s) and removed {}",
                    rep.kept,
                    rep.removed
                ),
                Err(e) => return Err(format!("retention of VM {vm}: {e}")),
            }
        }
    }
    if !job.prune {
        return Ok(());
    }
    let opts = PruneOptions {
        grace: Duration::from_secs_f64(job.prune_grace_hours * 3600.0),
        dry_run: false,
        max_unused: job.prune_max_unused_percent / 100.0,
        ..Default::default()
    };
    let r = tokio::select! {
        r = prune(repo, opts) => r,
        _ = cancel.cancelled() => return Ok(()),
    };
    match r {
        Ok(rep) => {
            tracing::info!(
                "prune deleted {} pack(s) ({} bytes), condemned {}, {} bytes pending",
                rep.deleted.packs,
                rep.deleted.bytes,
                rep.condemned.packs,
                rep.pending.bytes
            );
            Ok(())
        }
        Err(blockvault_engine::Error::Repo(blockvault_repo::Error::PruneRunning { .. })) => {
            tracing::info!("another prune is running; this run's prune is left to it");
            Ok(())
        }
        Err(e) => Err(format!("prune: {e}")),
    }
}

/// The job's time zone as the offset it has now: the calendar retention rules count days in.
fn job_offset(job: &JobConfig) -> time::UtcOffset {
    use chrono::Offset;
    let tz = job
        .timezone
        .as_ref()
        .and_then(|t| t.get_ref().parse::<chrono_tz::Tz>().ok())
        .unwrap_or(chrono_tz::UTC);
    let secs = Utc::now()
        .with_timezone(&tz)
        .offset()
        .fix()
        .local_minus_utc();
    time::UtcOffset::from_whole_seconds(secs).unwrap_or(time::UtcOffset::UTC)
}

/// What a verify policy reads: a rotating share, what was not verified lately, every pack, or
/// references only.
fn verify_selection(v: &VerifyPolicy) -> Selection {
    if let Some(p) = v.subset_percent {
        Selection::Rotation { percent: p }
    } else if let Some(d) = v.reverify_after_days {
        Selection::ReverifyAfter {
            secs: (d * 86_400.0) as i64,
        }
    } else if v.read_data {
        Selection::All
    } else {
        Selection::None
    }
}

/// Verify after a run; damage is reported by webhook and counted. Returns what makes the run
/// `partial`: damage, data that could not be checked (a store that failed mid-run is not
/// damage, and must not page anyone as such), or a verify that failed outright.
async fn run_verify(
    agent: &Agent,
    job: &str,
    run: i64,
    repo: Arc<Repository>,
    policy: &VerifyPolicy,
    cancel: &CancellationToken,
) -> Option<String> {
    let progress = Arc::new(Progress::default());
    let mut opts = VerifyOptions::new(verify_selection(policy));
    opts.max_bytes = policy.max_bytes;
    opts.host = agent.host.clone();
    let r = tokio::select! {
        r = verify(repo, opts, progress) => r,
        _ = cancel.cancelled() => return None,
    };
    let outcome = match &r {
        Ok(rep) => match rep.verdict {
            Verdict::Clean => "ok",
            Verdict::Damaged => "damaged",
            Verdict::Incomplete => "incomplete",
        },
        Err(_) => "error",
    };
    *agent
        .gauges
        .verify
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((job.to_string(), outcome.to_string()))
        .or_default() += 1;
    let problem = match r {
        Ok(rep) => match rep.verdict {
            Verdict::Clean => {
                tracing::info!("verify found no problem");
                return None;
            }
            Verdict::Damaged => {
                agent.webhooks.emit(
                    "verify.damage",
                    json!({"job": job, "run": run, "problems": rep.problems}),
                );
                format!("verify found {} problem(s)", rep.problems.len())
            }
            Verdict::Incomplete => {
                let first = rep
                    .unchecked
                    .first()
                    .map(|u| format!(" (first: {}: {})", u.object, u.detail))
                    .unwrap_or_default();
                format!(
                    "verify could not check {} object(s){first}",
                    rep.unchecked.len()
                )
            }
        },
        Err(e) => format!("verify failed: {e}"),
    };
    tracing::error!("{problem}");
    Some(problem)
}

/// The RCT id each disk of the VM's newest point recorded.
async fn parent_rct_ids(repo: &Repository, vm: &str) -> Vec<(String, String)> {
    let Ok((points, _)) = repo.list_points().await else {
        return vec![];
    };
    points
        .iter()
        .filter(|p| p.vm == vm)
        .max_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)))
        .map(|p| {
            p.disks
                .iter()
                .filter_map(|d| d.rct_id.clone().map(|r| (d.name.clone(), r)))
                .collect()
        })
        .unwrap_or_default()
}

fn source_for(agent: &Agent, job: &JobConfig, vm: &VmConfig) -> Arc<dyn VmSource> {
    match job.source {
        SourceKind::Files => Arc::new(FilesSource::new(job, vm)),
        SourceKind::Hyperv => {
            let config = job.hyperv.clone().expect("checked at load");
            let ps = agent.powershell_override().unwrap_or_else(|| {
                Arc::new(RealPowerShell {
                    exe: config.powershell.clone(),
                })
            });
            Arc::new(HypervSource { config, ps })
        }
    }
}

/// One attempt: capture, back up, release (whatever happened).
async fn attempt(
    agent: &Agent,
    job: &JobConfig,
    source: &dyn VmSource,
    cx: &VmContext,
    repo: Arc<Repository>,
) -> Result<BackupReport> {
    let cap = match source.capture(cx).await {
        Ok(c) => c,
        Err(e) => {
            // Release runs whatever happened: a capture that failed half-way (a snapshot taken,
            // then a later command failed) is undone by it.
            if let Err(r) = source.release(cx, None).await {
                cx.log
                    .push(format!("release after the failed capture: {r}"));
            }
            return Err(e);
        }
    };
    let backed_up = async {
        let req = BackupRequest {
            vm: cx.vm.clone(),
            disks: cap.disks.clone(),
            changes: cap.changes.clone(),
            configs: cap.configs.clone(),
            tags: job.tags.clone(),
            consistency: cap.consistency.clone(),
            parent_path_maps: cap.parent_path_maps.clone(),
            host: agent.host.clone(),
            workers: agent.config().limits.workers,
            cancel: cx.cancel.clone(),
            ..BackupRequest::default()
        };
        let prepared = vm_backup::prepare(req)?;
        cx.log.push("backup: disks opened");
        let progress = Arc::new(Progress::default());
        // A cancel stops the backup before its restore point is written, and the backup returns
        // only once its threads no longer read the disks: release below must not pull a
        // snapshot from under them. Packs already uploaded are unreferenced and go at the next
        // prune.
        vm_backup::run(repo, prepared, progress).await
    }
    .await;
    let released = source.release(cx, backed_up.as_ref().ok()).await;
    let report = match (backed_up, released.as_ref()) {
        (Ok(r), _) => r,
        (Err(e), Ok(())) => return Err(e),
        // Both: the operator must hear that a snapshot may have been left behind too.
        (Err(e), Err(r)) => {
            cx.log.push(format!("release failed too: {r}"));
            return Err(match e {
                Error::Cancelled => Error::Cancelled,
                e => Error::Source(format!("{e}; release failed too: {r}")),
            });
        }
    };
    if let Err(e) = released {
        // The point is stored; a failed release is worth a failed VM (a snapshot may remain).
        return Err(Error::Source(format!(
            "backup {} stored, but release failed: {e}",
            report.point
        )));
    }
    Ok(report)
}

async fn back_up_vm(
    agent: &Arc<Agent>,
    job_idx: usize,
    run: i64,
    vm: &VmConfig,
    repo: Arc<Repository>,
    cancel: CancellationToken,
) -> VmOutcome {
    let job = &agent.config().jobs[job_idx];
    let job_name = job.name.get_ref().clone();
    let vm_name = vm.name.get_ref().clone();
    let now = Utc::now();
    if let Err(e) = agent.state.start_vm(run, &vm_name, now) {
        tracing::error!("recording VM start: {e}");
    }
    let log = LogTail::default();
    let mut rec = VmRunRecord {
        run,
        job: job_name.clone(),
        vm: vm_name.clone(),
        started: ts(now),
        ended: None,
        status: "running".into(),
        attempts: 0,
        point: None,
        bytes_read: 0,
        bytes_new: 0,
        bytes_stored: 0,
        full_reason: None,
        consistency: None,
        error: None,
        log_tail: String::new(),
    };
    let source = source_for(agent, job, vm);
    let mut backoff = job.retries.backoff_secs;
    let outcome = loop {
        rec.attempts += 1;
        log.push(format!(
            "attempt {} of {}",
            rec.attempts, job.retries.attempts
        ));
        let cx = VmContext {
            job: job_name.clone(),
            run,
            vm: vm_name.clone(),
            parent_rct_ids: if job.source == SourceKind::Hyperv {
                parent_rct_ids(&repo, &vm_name).await
            } else {
                vec![]
            },
            log: log.clone(),
            cancel: cancel.clone(),
        };
        match attempt(agent, job, source.as_ref(), &cx, repo.clone()).await {
            Ok(r) => {
                rec.point = Some(r.point.to_string());
                rec.bytes_read = r.bytes_read;
                rec.bytes_new = r.bytes_new;
                rec.bytes_stored = r.bytes_stored;
                let reasons = r.full_reasons();
                rec.full_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
                rec.consistency = r.disks.iter().find_map(|d| d.consistency.clone());
                rec.error = None;
                log.push(format!(
                    "restore point {}: read {} B, new {} B, stored {} B",
                    r.point, r.bytes_read, r.bytes_new, r.bytes_stored
                ));
                break VmOutcome {
                    ok: true,
                    cancelled: false,
                };
            }
            Err(e) => {
                let cancelled = matches!(e, Error::Cancelled) || cancel.is_cancelled();
                let msg = if cancelled {
                    "cancelled".to_string()
                } else {
                    e.to_string()
                };
                tracing::warn!(attempt = rec.attempts, "VM backup failed: {msg}");
                log.push(format!("attempt {} failed: {msg}", rec.attempts));
                rec.error = Some(msg);
                if cancelled || rec.attempts >= job.retries.attempts {
                    break VmOutcome {
                        ok: false,
                        cancelled,
                    };
                }
                rec.log_tail = log.text();
                let _ = agent.state.update_vm(&rec);
                let wait = Duration::from_secs_f64(backoff.min(job.retries.max_backoff_secs));
                log.push(format!("retrying in {:.1}s", wait.as_secs_f64()));
                backoff *= 2.0;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => {
                        rec.error = Some("cancelled".into());
                        break VmOutcome { ok: false, cancelled: true };
                    }
                }
            }
        }
    };
    rec.status = if outcome.ok {
        "success"
    } else if outcome.cancelled {
        "cancelled"
    } else {
        "failed"
    }
    .into();
    rec.ended = Some(ts(Utc::now()));
    rec.log_tail = log.text();
    if let Err(e) = agent.state.update_vm(&rec) {
        tracing::error!("recording VM result: {e}");
    }
    if !outcome.ok && !outcome.cancelled {
        agent.webhooks.emit(
            "vm.failed",
            json!({"job": job_name, "run": run, "vm": vm_name, "attempts": rec.attempts, "error": rec.error, "log_tail": rec.log_tail}),
        );
    }
    outcome
}
