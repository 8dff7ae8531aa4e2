//! Backup of one VM as a library operation: open its disks (VHDX or raw, by content), read its
//! changed-ranges and configuration files, plan each disk (incremental or full, with the reason),
//! run the engine's backup and return a typed report. The CLI's `backup` and the agent's jobs both
//! call [`prepare`] then [`run`], and render the same [`BackupReport`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use blockvault_engine::{backup, BackupOptions, DiskJob, DiskSource, Progress};
use blockvault_repo::{BackupKind, DiskStats, PointId, Repository, SourceInfo, StorageStats};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::plan_disk;
use crate::source::open_disk;
use crate::VhdxOpenOptions;

/// Everything one VM's backup needs from its caller.
#[derive(Clone, Debug, Default)]
pub struct BackupRequest {
    pub vm: String,
    /// (disk name, image path), in the order the point lists them.
    pub disks: Vec<(String, PathBuf)>,
    /// (disk name, changed-ranges file): makes that disk an incremental when the file allows it.
    pub changes: Vec<(String, PathBuf)>,
    /// VM configuration files kept in the point (by file name).
    pub configs: Vec<PathBuf>,
    pub tags: Vec<String>,
    /// `application` or `crash`: how the disks were captured.
    pub consistency: Option<String>,
    /// Differencing-disk parents recorded under FROM are looked for at TO.
    pub parent_path_maps: Vec<(String, String)>,
    pub host: String,
    pub workers: Option<usize>,
    pub pack_size: Option<usize>,
    pub packs_per_segment: Option<usize>,
    /// Cancelling stops the backup before its restore point is written; `run` returns once
    /// nothing of the backup reads the disks any more.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// A disk name the repository accepts: letters, digits, `.`, `_`, `-`.
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A request whose disks are open and whose files are read: every input problem is found here,
/// before the repository is opened (and so before a password is needed).
pub struct PreparedBackup {
    req: BackupRequest,
    disks: Vec<OpenedDisk>,
    configs: Vec<(String, Vec<u8>)>,
}

struct OpenedDisk {
    name: String,
    source: Arc<dyn DiskSource>,
    changes: Option<Vec<u8>>,
}

/// Opens every disk and reads every changed-ranges and configuration file of `req`. Any disk that
/// cannot be opened fails the whole point, naming the disk.
pub fn prepare(req: BackupRequest) -> Result<PreparedBackup> {
    let input = Error::Input;
    let mut opts = VhdxOpenOptions::default();
    for (from, to) in &req.parent_path_maps {
        opts = opts.map_parent_path(from, to);
    }
    let mut changes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (name, path) in &req.changes {
        if changes.insert(name.clone(), path.clone()).is_some() {
            return Err(input(format!(
                "--changes: disk '{name}' is given more than once"
            )));
        }
    }
    let mut disks: Vec<OpenedDisk> = Vec::new();
    for (name, path) in &req.disks {
        if !valid_disk_name(name) {
            return Err(input(format!(
                "disk '{name}': a disk name uses letters, digits, '.', '_' and '-'"
            )));
        }
        if disks.iter().any(|o| &o.name == name) {
            return Err(input(format!(
                "--disk: disk '{name}' is given more than once"
            )));
        }
        let source = open_disk(path, &opts).map_err(|e| {
            input(format!(
                "disk '{name}': cannot open {}: {e}",
                path.display()
            ))
        })?;
        if source.size() == 0 {
            return Err(input(format!("disk '{name}': {} is empty", path.display())));
        }
        let changes = match changes.remove(name) {
            Some(p) => Some(std::fs::read(&p).map_err(|e| {
                input(format!(
                    "disk '{name}': cannot read the changed-ranges file {}: {e}",
                    p.display()
                ))
            })?),
            None => None,
        };
        disks.push(OpenedDisk {
            name: name.clone(),
            source,
            changes,
        });
    }
    if disks.is_empty() {
        return Err(input(format!("VM '{}': no disk to back up", req.vm)));
    }
    if let Some(name) = changes.keys().next() {
        return Err(input(format!(
            "--changes names disk '{name}', which no --disk gives"
        )));
    }
    let configs = read_configs(&req.configs)?;
    Ok(PreparedBackup {
        req,
        disks,
        configs,
    })
}

/// Reads configuration files: (file name, contents).
pub fn read_configs(files: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::Input(format!("--config {}: not a file name", f.display())))?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::Input(format!(
                "--config: two configuration files are named '{name}'"
            )));
        }
        let data = std::fs::read(f)
            .map_err(|e| Error::Input(format!("--config {}: cannot read: {e}", f.display())))?;
        out.push((name, data));
    }
    Ok(out)
}

/// One disk of a finished backup.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub kind: BackupKind,
    pub full_reason: Option<String>,
    pub parent: Option<PointId>,
    pub rct_id: Option<String>,
    pub consistency: Option<String>,
    pub source: SourceInfo,
    pub stats: DiskStats,
}

/// One configuration file kept in the point.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigReport {
    pub name: String,
    pub size: u64,
}

/// What a VM backup produced: the CLI prints it (text or `--json`), the agent records it.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub point: PointId,
    pub vm: String,
    pub created: String,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub duration_ms: u64,
    /// Requests and bytes this process exchanged with the store so far.
    pub storage: StorageStats,
    pub disks: Vec<DiskReport>,
    pub configs: Vec<ConfigReport>,
}

impl BackupReport {
    /// The full-backup reasons of the disks that had one, as `disk: reason` lines.
    pub fn full_reasons(&self) -> Vec<String> {
        self.disks
            .iter()
            .filter_map(|d| d.full_reason.as_ref().map(|r| format!("{}: {r}", d.name)))
            .collect()
    }
}

/// Plans every disk of `prepared` against the points in `repo` and takes the restore point.
pub async fn run(
    repo: Arc<Repository>,
    prepared: PreparedBackup,
    progress: Arc<Progress>,
) -> Result<BackupReport> {
    let PreparedBackup {
        req,
        disks,
        configs,
    } = prepared;
    let mut jobs = Vec::new();
    for d in disks {
        let p = plan_disk(
            &repo,
            &req.vm,
            &d.name,
            d.source.size(),
            d.source.disk_id().as_deref(),
            d.changes.as_deref(),
        )
        .await?;
        if let Some(r) = p.full_reason() {
            tracing::warn!(vm = %req.vm, disk = %d.name, "full backup: {r}");
        }
        jobs.push(DiskJob {
            name: d.name,
            source: d.source,
            plan: p.plan,
            rct_id: p.rct_id,
            consistency: req.consistency.clone(),
        });
    }
    let mut opts = BackupOptions::new(&req.vm);
    opts.tags = req.tags.clone();
    opts.host = req.host.clone();
    if let Some(s) = req.pack_size {
        opts.pack_size = s;
    }
    if let Some(n) = req.packs_per_segment {
        opts.packs_per_segment = n;
    }
    opts.configs = configs;
    opts.cancel = req.cancel.clone();
    if let Some(w) = req.workers {
        opts.workers = w.max(1);
    }
    let storage = repo.storage().clone();
    let m = backup(repo, jobs, opts, progress).await?.manifest;
    let t = m.total_stats();
    Ok(BackupReport {
        point: m.id,
        vm: m.vm.clone(),
        created: m.created.clone(),
        bytes_read: t.bytes_read,
        bytes_new: t.bytes_new,
        bytes_stored: t.bytes_stored,
        duration_ms: m.duration_ms,
        storage: storage.stats(),
        disks: m
            .disks
            .iter()
            .map(|d| DiskReport {
                name: d.name.clone(),
                size: d.size,
                kind: d.kind.clone(),
                full_reason: d.full_reason.clone(),
                parent: d.parent,
                rct_id: d.rct_id.clone(),
                consistency: d.consistency.clone(),
                source: d.source.clone(),
                stats: d.stats.clone(),
            })
            .collect(),
        configs: m
            .configs
            .iter()
            .map(|c| ConfigReport {
                name: c.name.clone(),
                size: c.size,
            })
            .collect(),
    })
}

/// This machine's host name, recorded in each point.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
