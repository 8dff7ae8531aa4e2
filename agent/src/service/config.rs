//! `agent.toml`: the agent's configuration (every key is documented in docs/AGENT.md). Unknown keys
//! are refused, and every error names the file, the line and the key, so a bad configuration never
//! starts an agent that would then do something other than what the operator wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::schedule::Schedule;
use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The state database (one SQLite file): schedules, run history, pending webhook deliveries.
    pub state: PathBuf,
    /// The control socket `agent status|run-now|cancel` talk to (created owner-only).
    pub socket: PathBuf,
    /// `ADDR:PORT` serving Prometheus `/metrics`; loopback unless `metrics_allow_remote`.
    #[serde(default)]
    pub metrics_listen: Option<Spanned<String>>,
    #[serde(default)]
    pub metrics_allow_remote: bool,
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub alerts: Alerts,
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    #[serde(default)]
    pub jobs: Vec<JobConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A directory path or `s3://BUCKET/PREFIX` (credentials from the AWS_* environment).
    pub location: String,
    /// File holding the repository password (never the password itself).
    pub password_file: PathBuf,
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_allow_http: bool,
    #[serde(default = "default_level")]
    pub compression_level: i32,
}

fn default_level() -> i32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Job runs at once across all jobs.
    #[serde(default = "one")]
    pub max_concurrent_runs: usize,
    /// Object-store requests in flight at once.
    #[serde(default)]
    pub s3_concurrency: Option<usize>,
    /// Bytes per second, e.g. 52428800.
    #[serde(default)]
    pub upload_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub download_bytes_per_sec: Option<u64>,
    /// Hashing/compression threads per VM backup.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Days of run history kept (finished runs older than this are deleted once a day).
    #[serde(default = "history_days")]
    pub history_days: u32,
}

fn history_days() -> u32 {
    400
}

/// The most days of history `limits.history_days` keeps: a hundred years, far beyond any need and
/// far inside the dates the agent can compute (a cut-off before year -262143 cannot be).
pub const MAX_HISTORY_DAYS: u32 = 36_500;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 1,
            s3_concurrency: None,
            upload_bytes_per_sec: None,
            download_bytes_per_sec: None,
            workers: None,
            history_days: history_days(),
        }
    }
}

fn one() -> usize {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    /// Send `vm.no_good_backup` when a VM of a job has had no successful backup for this long.
    #[serde(default)]
    pub no_good_backup_hours: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: Spanned<String>,
    /// File holding the HMAC-SHA256 key (the whole file, trailing newline removed).
    pub secret_file: PathBuf,
    /// Events to send; all when empty.
    #[serde(default)]
    pub events: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Files,
    Hyperv,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub name: Spanned<String>,
    /// A cron expression (5 or 6 fields) or a systemd calendar event.
    pub schedule: Spanned<String>,
    /// IANA time zone the schedule is read in.
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    pub source: SourceKind,
    /// VMs of this job backed up at once.
    #[serde(default = "one")]
    pub concurrency: usize,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub retries: Retries,
    /// The `forget` rules (the engine's retention policy, the same keys as `forget --keep-*`).
    #[serde(default)]
    pub retention: Option<Spanned<blockvault_engine::retention::Policy>>,
    /// Prune (delete data no point references) after forgetting.
    #[serde(default)]
    pub prune: bool,
    /// The prune's grace period between condemning a pack and deleting it, in hours.
    #[serde(default = "twenty_four")]
    pub prune_grace_hours: f64,
    /// The prune repacks partly dead packs until at most this percentage of the kept packs'
    /// bytes is unused (`prune --max-unused`); 100 never repacks.
    #[serde(default = "five")]
    pub prune_max_unused_percent: f64,
    #[serde(default)]
    pub verify: Option<VerifyPolicy>,
    #[serde(default)]
    pub hooks: JobHooks,
    #[serde(default)]
    pub hyperv: Option<HypervConfig>,
    pub vms: Vec<VmConfig>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Attempts per VM, the first included.
    #[serde(default = "three")]
    pub attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    #[serde(default = "thirty")]
    pub backoff_secs: f64,
    #[serde(default = "six_hundred")]
    pub max_backoff_secs: f64,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff_secs: 30.0,
            max_backoff_secs: 600.0,
        }
    }
}

fn three() -> u32 {
    3
}
fn thirty() -> f64 {
    30.0
}
fn six_hundred() -> f64 {
    600.0
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct VerifyPolicy {
    /// Verify after each run of the job.
    #[serde(default = "yes")]
    pub after_backup: bool,
    /// Download packs and check chunk contents (else structure only).
    #[serde(default)]
    pub read_data: bool,
    /// Share of packs read per verify, in percent (sampled verify).
    #[serde(default)]
    pub subset_percent: Option<f64>,
    /// Packs verified less than this many days ago are skipped.
    #[serde(default)]
    pub reverify_after_days: Option<f64>,
    /// Cap on the bytes one verify reads.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

fn twenty_four() -> f64 {
    24.0
}

fn five() -> f64 {
    5.0
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JobHooks {
    /// Runs before the job's first VM; a failure fails the run.
    #[serde(default)]
    pub before: Option<String>,
    /// Runs after the job, whatever happened.
    #[serde(default)]
    pub after: Option<String>,
    /// Runs when the run failed.
    #[serde(default)]
    pub on_error: Option<String>,
    /// Seconds a hook may take before it is killed.
    #[serde(default = "hook_timeout")]
    pub timeout_secs: u64,
}

fn hook_timeout() -> u64 {
    3600
}

impl Default for JobHooks {
    fn default() -> Self {
        Self {
            before: None,
            after: None,
            on_error: None,
            timeout_secs: hook_timeout(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HypervConfig {
    /// The PowerShell executable.
    #[serde(default = "powershell")]
    pub powershell: String,
    /// Directory on the host for changed-ranges files and exported configuration.
    pub work_dir: PathBuf,
    /// Fall back to a crash-consistent checkpoint when a production checkpoint fails.
    #[serde(default = "yes")]
    pub allow_crash_consistent: bool,
}

fn powershell() -> String {
    "powershell.exe".into()
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: Spanned<String>,
    /// `files` source: disk name to image path (VHDX or raw).
    #[serde(default)]
    pub disks: BTreeMap<String, PathBuf>,
    /// `files` source: disk name to changed-ranges file (docs/changed-ranges.md).
    #[serde(default)]
    pub changes: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub configs: Vec<PathBuf>,
    /// Command run before the backup (take a snapshot); a failure fails this VM.
    #[serde(default)]
    pub capture: Option<String>,
    /// Command run after the backup, whatever happened (drop the snapshot).
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub consistency: Option<Spanned<String>>,
    #[serde(default)]
    pub parent_path_maps: BTreeMap<String, String>,
}

/// A loaded, checked configuration with its parsed schedules.
pub struct Loaded {
    pub path: PathBuf,
    pub config: AgentConfig,
    pub schedules: Vec<Schedule>,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// The key written on the line holding `offset`, if that line reads `key = ...`.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let (k, _) = text[start..end].split_once('=')?;
    let k = k.trim();
    (!k.is_empty() && !k.starts_with('[') && !k.starts_with('#')).then(|| k.to_string())
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn at(&self, span: std::ops::Range<usize>, key: &str, msg: impl std::fmt::Display) -> Error {
        let (line, col) = line_col(self.text, span.start);
        Error::Config(format!(
            "{}:{line}:{col}: key `{key}`: {msg}",
            self.path.display()
        ))
    }

    fn plain(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::Config(format!("{}: key `{key}`: {msg}", self.path.display()))
    }
}

/// Every webhook event name.
pub const EVENTS: &[&str] = &[
    "run.started",
    "run.finished",
    "run.failed",
    "run.cancelled",
    "vm.failed",
    "verify.damage",
    "vm.no_good_backup",
];

/// Reads and checks `path`. Paths named in the file (password, secrets) must exist and be
/// readable, so a typo fails here rather than at 2 a.m.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Loaded> {
    let c = Checker { path, text };
    let config: AgentConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let (line, col) = line_col(text, span.start);
                let key = key_on_line(text, span.start)
                    .filter(|k| !msg.contains(&format!("`{k}`")))
                    .map(|k| format!("key `{k}`: "))
                    .unwrap_or_default();
                Error::Config(format!("{}:{line}:{col}: {key}{msg}", path.display()))
            }
            None => Error::Config(format!("{}: {msg}", path.display())),
        }
    })?;
    let mut schedules = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut vm_jobs = std::collections::HashMap::new();
    if config.limits.max_concurrent_runs == 0 {
        return Err(c.plain("limits.max_concurrent_runs", "must be at least 1"));
    }
    if config.limits.history_days == 0 {
        return Err(c.plain(
            "limits.history_days",
            "must be at least 1 (the running runs and the last day are always kept)",
        ));
    }
    if config.limits.history_days > MAX_HISTORY_DAYS {
        return Err(c.plain(
            "limits.history_days",
            format!(
                "{} is more than {MAX_HISTORY_DAYS} (100 years)",
                config.limits.history_days
            ),
        ));
    }
    if !(1..=19).contains(&config.repository.compression_level) {
        return Err(c.plain(
            "repository.compression_level",
            "zstd levels run from 1 to 19",
        ));
    }
    if let Some(h) = config.alerts.no_good_backup_hours {
        // Zero or less would find every VM overdue at every check: an alert storm, not "off".
        if !(h.is_finite() && h > 0.0) {
            return Err(c.plain(
                "alerts.no_good_backup_hours",
                format!(
                    "{h} is not a number of hours above 0 (leave it out to turn the alert off)"
                ),
            ));
        }
    }
    std::fs::metadata(&config.repository.password_file).map_err(|e| {
        c.plain(
            "repository.password_file",
            format!("{}: {e}", config.repository.password_file.display()),
        )
    })?;
    if let Some(m) = &config.metrics_listen {
        let addr: std::net::SocketAddr = m.get_ref().parse().map_err(|e| {
            c.at(
                m.span(),
                "metrics_listen",
                format!("'{}' is not ADDR:PORT: {e}", m.get_ref()),
            )
        })?;
        if !addr.ip().is_loopback() && !config.metrics_allow_remote {
            return Err(c.at(
                m.span(),
                "metrics_listen",
                format!(
                    "{addr} is not a loopback address (set metrics_allow_remote = true to allow it)"
                ),
            ));
        }
    }
    for w in &config.webhooks {
        let u = w.url.get_ref();
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(c.at(
                w.url.span(),
                "webhooks.url",
                // Not echoed: a URL may carry a token, and the line is named.
                "does not start with http:// or https://",
            ));
        }
        std::fs::metadata(&w.secret_file).map_err(|e| {
            c.plain(
                "webhooks.secret_file",
                format!("{}: {e}", w.secret_file.display()),
            )
        })?;
        for ev in &w.events {
            if !EVENTS.contains(&ev.get_ref().as_str()) {
                return Err(c.at(
                    ev.span(),
                    "webhooks.events",
                    format!(
                        "unknown event '{}' (known: {})",
                        ev.get_ref(),
                        EVENTS.join(", ")
                    ),
                ));
            }
        }
    }
    for j in &config.jobs {
        let name = j.name.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
        {
            return Err(c.at(
                j.name.span(),
                "jobs.name",
                format!("'{name}': a job name uses letters, digits, '.', '_' and '-'"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(c.at(
                j.name.span(),
                "jobs.name",
                format!("job '{name}' is defined twice"),
            ));
        }
        let tz = match &j.timezone {
            Some(t) => t.get_ref().parse::<chrono_tz::Tz>().map_err(|e| {
                c.at(
                    t.span(),
                    "jobs.timezone",
                    format!("'{}' is not a time zone: {e}", t.get_ref()),
                )
            })?,
            None => chrono_tz::UTC,
        };
        let sched = Schedule::parse(j.schedule.get_ref(), tz)
            .map_err(|e| c.at(j.schedule.span(), "jobs.schedule", e))?;
        schedules.push(sched);
        if !(j.prune_grace_hours >= 0.0 && j.prune_grace_hours.is_finite()) {
            return Err(c.plain(
                &format!("jobs.{name}.prune_grace_hours"),
                "must be a number of hours, zero or more",
            ));
        }
        if !(0.0..=100.0).contains(&j.prune_max_unused_percent) {
            return Err(c.plain(
                &format!("jobs.{name}.prune_max_unused_percent"),
                "must be a percentage from 0 to 100",
            ));
        }
        if let Some(v) = &j.verify {
            if v.subset_percent.is_some() && v.reverify_after_days.is_some() {
                return Err(c.plain(
                    &format!("jobs.{name}.verify"),
                    "give subset_percent (a rotating share each run) or reverify_after_days \
                     (what was not verified lately), not both",
                ));
            }
            if let Some(p) = v.subset_percent {
                if !(p > 0.0 && p <= 100.0) {
                    return Err(c.plain(
                        &format!("jobs.{name}.verify.subset_percent"),
                        "must be more than 0 and at most 100",
                    ));
                }
            }
            if let Some(d) = v.reverify_after_days {
                if !(d >= 0.0 && d.is_finite()) {
                    return Err(c.plain(
                        &format!("jobs.{name}.verify.reverify_after_days"),
                        "must be a number of days, zero or more",
                    ));
                }
            }
        }
        if j.concurrency == 0 {
            return Err(c.plain(&format!("jobs.{name}.concurrency"), "must be at least 1"));
        }
        if j.retries.attempts == 0 {
            return Err(c.plain(
                &format!("jobs.{name}.retries.attempts"),
                "must be at least 1",
            ));
        }
        if !(j.retries.backoff_secs >= 0.0 && j.retries.max_backoff_secs >= 0.0) {
            return Err(c.plain(
                &format!("jobs.{name}.retries"),
                "backoff seconds must not be negative",
            ));
        }
        if let Some(r) = &j.retention {
            if r.get_ref().is_empty() {
                return Err(c.at(
                    r.span(),
                    "jobs.retention",
                    "the policy keeps nothing by itself and would remove every restore point: give at least one keep-* rule",
                ));
            }
        }
        if j.source == SourceKind::Hyperv && j.hyperv.is_none() {
            return Err(c.at(
                j.name.span(),
                "jobs.hyperv",
                format!("job '{name}' has source = \"hyperv\" but no [jobs.hyperv] table"),
            ));
        }
        if j.vms.is_empty() {
            return Err(c.at(
                j.name.span(),
                "jobs.vms",
                format!("job '{name}' names no VM"),
            ));
        }
        let mut vms = std::collections::HashSet::new();
        for vm in &j.vms {
            let vname = vm.name.get_ref();
            if vname.is_empty() || !vms.insert(vname.clone()) {
                return Err(c.at(
                    vm.name.span(),
                    "jobs.vms.name",
                    format!("VM name '{vname}' is empty or given twice in job '{name}'"),
                ));
            }
            // A job's retention thins out all of a VM's points, and two jobs' runs of one VM
            // would share its checkpoints and change files: a VM belongs to one job.
            if let Some(other) = vm_jobs.insert(vname.clone(), name.clone()) {
                return Err(c.at(
                    vm.name.span(),
                    "jobs.vms.name",
                    format!(
                        "VM '{vname}' is in job '{other}' and job '{name}': a VM belongs to one \
                         job (one job's retention would remove the other's restore points; use \
                         one job with keep-daily, keep-monthly ... instead)"
                    ),
                ));
            }
            if let Some(cons) = &vm.consistency {
                if !["application", "crash"].contains(&cons.get_ref().as_str()) {
                    return Err(c.at(
                        cons.span(),
                        "jobs.vms.consistency",
                        format!("'{}': expected application or crash", cons.get_ref()),
                    ));
                }
            }
            match j.source {
                SourceKind::Files => {
                    if vm.disks.is_empty() {
                        return Err(c.at(
                            vm.name.span(),
                            "jobs.vms.disks",
                            format!("VM '{vname}' of a files job lists no disk"),
                        ));
                    }
                    for d in vm.disks.keys() {
                        if !crate::vm_backup::valid_disk_name(d) {
                            return Err(c.at(
                                vm.name.span(),
                                "jobs.vms.disks",
                                format!("VM '{vname}': disk name '{d}' uses other than letters, digits, '.', '_' and '-'"),
                            ));
                        }
                    }
                    if let Some(d) = vm.changes.keys().find(|d| !vm.disks.contains_key(*d)) {
                        return Err(c.at(
                            vm.name.span(),
                            "jobs.vms.changes",
                            format!(
                                "VM '{vname}': changes names disk '{d}', which disks does not list"
                            ),
                        ));
                    }
                }
                SourceKind::Hyperv => {
                    if !vm.disks.is_empty() || !vm.changes.is_empty() || !vm.configs.is_empty() {
                        return Err(c.at(
                            vm.name.span(),
                            "jobs.vms.disks",
                            format!("VM '{vname}': a hyperv job finds disks, changes and configuration itself; remove them"),
                        ));
                    }
                }
            }
        }
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        schedules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
        let pw = dir.join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        format!(
            "state = \"{0}/state.db\"\nsocket = \"{0}/sock\"\n[repository]\nlocation = \"{0}/repo\"\npassword_file = \"{1}\"\n",
            dir.display(),
            pw.display()
        )
    }

    const JOB: &str = "[[jobs]]\nname = \"nightly\"\nschedule = \"*-*-* 02:30:00\"\ntimezone = \"Europe/Berlin\"\nsource = \"files\"\n[[jobs.vms]]\nname = \"web\"\ndisks = { disk0 = \"/x\" }\n";

    #[test]
    fn a_good_config_loads_with_its_schedule() {
        let d = tempfile::tempdir().unwrap();
        let text = base(d.path()) + JOB;
        let l = parse(Path::new("agent.toml"), &text).unwrap();
        assert_eq!(l.schedules.len(), 1);
        // Defaults of tables left out are the documented ones.
        assert_eq!(l.config.jobs[0].hooks.timeout_secs, 3600);
        assert_eq!(l.config.jobs[0].retries.attempts, 3);
        assert_eq!(l.config.limits.max_concurrent_runs, 1);
        let t = text.clone() + "[jobs.retention]\nkeep-daily = 7\nkeep-within = \"2d\"\n";
        let l = parse(Path::new("agent.toml"), &t).unwrap();
        assert_eq!(
            l.config.jobs[0]
                .retention
                .as_ref()
                .unwrap()
                .get_ref()
                .keep_daily,
            Some(7)
        );
        let t = text.clone() + "[jobs.retention]\nkeep-daily = 0\n";
        let e = parse(Path::new("agent.toml"), &t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("jobs.retention") && e.contains("keeps nothing"),
            "{e}"
        );
        assert_eq!(l.config.jobs[0].vms[0].name.get_ref(), "web");
    }

    /// The complete example in docs/AGENT.md is a valid configuration.
    #[test]
    fn the_documented_example_loads() {
        let doc = include_str!("../../../docs/AGENT.md");
        let start = doc.find("```toml\n").expect("the example") + 8;
        let end = start + doc[start..].find("```").unwrap();
        let d = tempfile::tempdir().unwrap();
        let (pw, secret) = (d.path().join("pw"), d.path().join("secret"));
        std::fs::write(&pw, "x").unwrap();
        std::fs::write(&secret, "y").unwrap();
        let text = doc[start..end]
            .replace("/etc/blockvault/repo.pass", &pw.display().to_string())
            .replace(
                "/etc/blockvault/webhook.secret",
                &secret.display().to_string(),
            );
        let l = parse(Path::new("AGENT.md"), &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.config.jobs.len(), 2);
        assert!(l.config.jobs[0].retention.is_some());
        assert_eq!(l.config.jobs[1].source, SourceKind::Hyperv);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let text = base(d.path()) + JOB + "colour = \"red\"\n";
        let e = parse(Path::new("agent.toml"), &text)
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("agent.toml:"), "{e}");
        assert!(e.contains("colour"), "{e}");
        let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
        assert!(e.contains(&format!(":{line}:")), "{e}");
    }

    #[test]
    fn bad_values_name_their_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let t = base(d.path()) + &JOB.replace("02:30:00", "25:99");
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(
            e.contains("jobs.schedule") && e.contains("a.toml:8:"),
            "{e}"
        );
        let t = base(d.path()) + &JOB.replace("Europe/Berlin", "Mars/Olympus");
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(e.contains("jobs.timezone") && e.contains("Mars"), "{e}");
        let t = base(d.path()) + &JOB.replace("source = \"files\"", "source = \"tape\"");
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(e.contains("a.toml:10:") && e.contains("tape"), "{e}");
        let t = base(d.path()) + "[limits]\nmax_concurrent_runs = \"two\"\n";
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(e.contains("max_concurrent_runs"), "{e}");
        let t = base(d.path()).replace("/pw\"", "/missing\"");
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(e.contains("password_file") && e.contains("missing"), "{e}");
        let t = base(d.path()) + "metrics_listen = \"0.0.0.0:9100\"\n";
        // A top-level key after a table belongs to that table: put it first instead.
        let t2 = "metrics_listen = \"0.0.0.0:9100\"\n".to_string() + &base(d.path());
        assert!(parse(Path::new("a.toml"), &t).is_err());
        let e = parse(Path::new("a.toml"), &t2).err().unwrap().to_string();
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn history_days_beyond_a_hundred_years_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let limits = |n: &str| base(d.path()) + &format!("[limits]\nhistory_days = {n}\n") + JOB;
        let l = parse(Path::new("a.toml"), &limits("36500")).unwrap();
        assert_eq!(l.config.limits.history_days, MAX_HISTORY_DAYS);
        for bad in ["36501", "99999999"] {
            let e = parse(Path::new("a.toml"), &limits(bad))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("limits.history_days") && e.contains("100 years"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn alert_hours_and_vms_in_two_jobs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let alerts =
            |h: &str| base(d.path()) + &format!("[alerts]\nno_good_backup_hours = {h}\n") + JOB;
        let l = parse(Path::new("a.toml"), &alerts("26")).unwrap();
        assert_eq!(l.config.alerts.no_good_backup_hours, Some(26.0));
        for bad in ["0", "-3", "nan", "inf"] {
            let e = parse(Path::new("a.toml"), &alerts(bad))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("alerts.no_good_backup_hours"), "{bad}: {e}");
        }
        let twice = base(d.path()) + JOB + &JOB.replace("nightly", "hourly");
        let e = parse(Path::new("a.toml"), &twice)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("VM 'web' is in job 'nightly' and job 'hourly'"),
            "{e}"
        );
        let other_vm = base(d.path())
            + JOB
            + &JOB
                .replace("nightly", "hourly")
                .replace("\"web\"", "\"db\"");
        parse(Path::new("a.toml"), &other_vm).unwrap();
    }

    #[test]
    fn verify_and_prune_settings_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let job = |extra: &str| base(d.path()) + JOB + extra;
        let ok = job("[jobs.verify]\nsubset_percent = 5\nmax_bytes = 1048576\n");
        let l = parse(Path::new("a.toml"), &ok).unwrap();
        let v = l.config.jobs[0].verify.as_ref().unwrap();
        assert_eq!((v.subset_percent, v.max_bytes), (Some(5.0), Some(1 << 20)));
        assert_eq!(l.config.jobs[0].prune_grace_hours, 24.0);
        assert_eq!(l.config.jobs[0].prune_max_unused_percent, 5.0);
        for (extra, key, says) in [
            (
                "[jobs.verify]\nsubset_percent = 5\nreverify_after_days = 30\n",
                "jobs.nightly.verify",
                "not both",
            ),
            (
                "[jobs.verify]\nsubset_percent = 0\n",
                "subset_percent",
                "more than 0",
            ),
            (
                "[jobs.verify]\nsubset_percent = 101\n",
                "subset_percent",
                "at most 100",
            ),
            (
                "[jobs.verify]\nreverify_after_days = -1\n",
                "reverify_after_days",
                "zero or more",
            ),
        ] {
            let e = parse(Path::new("a.toml"), &job(extra))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(key) && e.contains(says), "{extra}: {e}");
        }
        // A top-level job key: before the job's sub-tables.
        let t = base(d.path())
            + &JOB.replace(
                "source = \"files\"",
                "source = \"files\"\nprune_grace_hours = -2",
            );
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(
            e.contains("prune_grace_hours") && e.contains("zero or more"),
            "{e}"
        );
        let t = base(d.path())
            + &JOB.replace(
                "source = \"files\"",
                "source = \"files\"\nprune_max_unused_percent = 120",
            );
        let e = parse(Path::new("a.toml"), &t).err().unwrap().to_string();
        assert!(
            e.contains("prune_max_unused_percent") && e.contains("0 to 100"),
            "{e}"
        );
    }
}
