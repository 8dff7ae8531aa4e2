//! Restores of what a point holds beside its disks' bytes: its configuration files
//! (`restore export --config`, `--configs-to`), and the whole VM (`restore vm`): every disk and
//! configuration file into one directory, written under temporary names and renamed only when all
//! are complete, with the command that brings the VM up. The CLI renders the reports.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockvault_engine::{export_raw, DiskReader, ExportTarget, Progress, ReaderOptions};
use blockvault_repo::{ConfigFile, DiskManifest, PointId, PointManifest, Repository};
use serde::Serialize;

use crate::export_qcow2::export_qcow2;
use crate::export_vhdx::{export_vhdx, VhdxExportOptions};
use crate::{Error, Result};

/// The contents of a stored configuration file, checked against its recorded size.
pub async fn read_config(repo: &Repository, m: &PointManifest, c: &ConfigFile) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(c.size as usize);
    for b in &c.blobs {
        data.extend_from_slice(&repo.read_blob(&b.0, None).await?);
    }
    if data.len() as u64 != c.size {
        return Err(blockvault_repo::Error::Tampered {
            object: format!("config file '{}' of restore point {}", c.name, m.id),
            detail: format!("{} bytes stored, {} recorded", data.len(), c.size),
        }
        .into());
    }
    Ok(data)
}

/// Refuses to replace an existing file unless `overwrite` (block and character devices, the
/// usual targets of a raw export to a disk, are written in place).
pub fn check_overwrite(path: &Path, overwrite: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => Ok(()),
        Ok(_) if !overwrite => Err(Error::Input(format!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Where exported configuration files go.
#[derive(Debug, Clone)]
pub enum ConfigTarget {
    /// One file (with a single named configuration file).
    File(PathBuf),
    /// A directory, each file under its own name.
    Dir(PathBuf),
}

/// One exported configuration file.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedConfig {
    pub name: String,
    pub size: u64,
    pub out: PathBuf,
}

/// What `restore export --config` / `--configs-to` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigExportReport {
    pub point: PointId,
    pub configs: Vec<ExportedConfig>,
}

/// Writes the configuration file `name` of the point (or all of them) to `target`.
pub async fn export_configs(
    repo: &Repository,
    m: &PointManifest,
    name: Option<&str>,
    target: &ConfigTarget,
    overwrite: bool,
) -> Result<ConfigExportReport> {
    let chosen: Vec<&ConfigFile> = match name {
        Some(name) => {
            let c = m.configs.iter().find(|c| c.name == name).ok_or_else(|| {
                blockvault_engine::Error::NoSuchDisk {
                    point: m.id.to_hex(),
                    disk: format!("config:{name}"),
                    available: m
                        .configs
                        .iter()
                        .map(|c| format!("config:{}", c.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            vec![c]
        }
        None => m.configs.iter().collect(),
    };
    if chosen.len() > 1 && matches!(target, ConfigTarget::File(_)) {
        return Err(Error::Input(
            "several configuration files go to a directory (--configs-to), not one file".into(),
        ));
    }
    let mut configs = Vec::new();
    for c in chosen {
        let data = read_config(repo, m, c).await?;
        let out = match target {
            ConfigTarget::Dir(dir) => {
                // Names come from the authenticated manifest, but never let one leave the directory.
                if c.name.contains('/') || c.name == ".." || c.name == "." {
                    return Err(Error::Input(format!(
                        "config file name '{}' is not a plain file name",
                        c.name
                    )));
                }
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                dir.join(&c.name)
            }
            ConfigTarget::File(file) => file.clone(),
        };
        check_overwrite(&out, overwrite)?;
        // Without --overwrite, a file that appeared since the check is not replaced either.
        let mut open = std::fs::OpenOptions::new();
        open.write(true);
        if overwrite {
            open.create(true).truncate(true);
        } else {
            open.create_new(true);
        }
        open.open(&out)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &data))
            .map_err(|e| Error::io(format!("writing {}", out.display()), e))?;
        configs.push(ExportedConfig {
            name: c.name.clone(),
            size: c.size,
            out,
        });
    }
    Ok(ConfigExportReport {
        point: m.id,
        configs,
    })
}

/// The image format of restored disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Vhdx,
    Qcow2,
}

impl ImageFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Self::Raw),
            "vhdx" => Ok(Self::Vhdx),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(Error::Input(format!(
                "unknown image format '{other}' (raw, vhdx or qcow2)"
            ))),
        }
    }

    /// The file name extension, which is also the format's name.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Vhdx => "vhdx",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// What `restore vm` restores, and where.
#[derive(Debug, Clone)]
pub struct VmRestoreRequest {
    pub to: PathBuf,
    pub format: ImageFormat,
    /// The disks to restore by name; empty means all.
    pub disks: Vec<String>,
    pub overwrite: bool,
    /// The VHDX block size of `--format vhdx`.
    pub vhdx_block_size: u32,
    /// Chunk fetches in flight per disk.
    pub parallel: usize,
}

/// One file `restore vm` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredFile {
    /// What it is: `disk sys` or `config file vm.vmcx`.
    pub what: String,
    pub path: PathBuf,
}

/// What `restore vm` wrote, and how to bring the VM up.
#[derive(Debug, Clone, Serialize)]
pub struct VmRestoreReport {
    pub point: PointId,
    pub vm: String,
    pub to: PathBuf,
    pub format: ImageFormat,
    pub files: Vec<RestoredFile>,
    /// The `Import-VM` command (a Hyper-V configuration) or a `virt-install --import` line.
    pub bring_up: String,
}

/// Called as each disk of a VM restore starts, with the disk's progress counters; the value it
/// returns is dropped when that disk is written (a progress bar, say).
pub type DiskStarted<'a> = dyn FnMut(&str, Arc<Progress>) -> Box<dyn std::any::Any> + 'a;

struct Planned {
    what: String,
    tmp: PathBuf,
    dest: PathBuf,
}

/// Restores every chosen disk and every configuration file of point `m` into `req.to`. Every
/// output is planned first, so a name clash or an existing file stops the run before any data is
/// written; on failure the temporary files are removed and nothing at a final name was touched.
pub async fn restore_vm(
    repo: &Arc<Repository>,
    m: &PointManifest,
    req: &VmRestoreRequest,
    started: &mut DiskStarted<'_>,
) -> Result<VmRestoreReport> {
    let disks = chosen_disks(m, &req.disks)?;
    std::fs::create_dir_all(&req.to)
        .map_err(|e| Error::io(format!("creating {}", req.to.display()), e))?;
    let _lock = lock_target(&req.to)?;
    let plan = plan(m, &disks, req)?;
    let remove_parts = |from: usize| {
        for p in &plan[from..] {
            let _ = std::fs::remove_file(&p.tmp);
        }
    };
    if let Err(e) = write_all(repo, m, &disks, &plan, req, started).await {
        remove_parts(0);
        return Err(e);
    }
    for (i, p) in plan.iter().enumerate() {
        if let Err(e) = put_in_place(&p.tmp, &p.dest, req.overwrite) {
            remove_parts(i);
            let placed: Vec<String> = plan[..i]
                .iter()
                .map(|p| p.dest.display().to_string())
                .collect();
            let placed = if placed.is_empty() {
                String::new()
            } else {
                format!(" (already in place: {})", placed.join(", "))
            };
            return Err(Error::io(
                format!("moving {} to {}{placed}", p.tmp.display(), p.dest.display()),
                e,
            ));
        }
    }
    std::fs::File::open(&req.to)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", req.to.display()), e))?;
    Ok(VmRestoreReport {
        point: m.id,
        vm: m.vm.clone(),
        to: req.to.clone(),
        format: req.format,
        bring_up: bring_up(m, &plan, req),
        files: plan
            .into_iter()
            .map(|p| RestoredFile {
                what: p.what,
                path: p.dest,
            })
            .collect(),
    })
}

fn chosen_disks<'a>(m: &'a PointManifest, names: &[String]) -> Result<Vec<&'a DiskManifest>> {
    if names.is_empty() {
        return Ok(m.disks.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            m.disk(n).ok_or_else(|| {
                blockvault_engine::Error::NoSuchDisk {
                    point: m.id.to_hex(),
                    disk: n.clone(),
                    available: m
                        .disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
                .into()
            })
        })
        .collect()
}

/// A plain file name: no separators, not `.`/`..`, not hidden (temporary names start with `.`).
fn plain_name(n: &str) -> bool {
    !n.is_empty() && !n.starts_with('.') && !n.contains(['/', '\\', '\0']) && n.len() <= 200
}

/// The file name for a disk: the original image's name (Hyper-V's configuration refers to its
/// disks by file name) when the point recorded one, else the disk's name.
fn disk_file_stem(d: &DiskManifest) -> String {
    let base = d.source.path.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = base.rsplit_once('.').map(|(s, _)| s).unwrap_or(base);
    if plain_name(stem) {
        stem.to_string()
    } else {
        d.name.clone()
    }
}

fn plan(
    m: &PointManifest,
    disks: &[&DiskManifest],
    req: &VmRestoreRequest,
) -> Result<Vec<Planned>> {
    let ext = req.format.extension();
    let mut plan: Vec<Planned> = Vec::new();
    let mut names = HashSet::new();
    for d in disks {
        let mut stem = disk_file_stem(d);
        if names.contains(&format!("{stem}.{ext}")) {
            stem = d.name.clone();
        }
        let file = format!("{stem}.{ext}");
        if !names.insert(file.clone()) {
            return Err(Error::Input(format!(
                "two disks would both be written as {file}"
            )));
        }
        plan.push(Planned {
            what: format!("disk {}", d.name),
            tmp: req.to.join(format!(".{file}.bv-part")),
            dest: req.to.join(&file),
        });
    }
    for c in &m.configs {
        if !plain_name(&c.name) || !names.insert(c.name.clone()) {
            return Err(Error::Input(format!(
                "config file name '{}' is not a plain file name or clashes with a disk",
                c.name
            )));
        }
        plan.push(Planned {
            what: format!("config file {}", c.name),
            tmp: req.to.join(format!(".{}.bv-part", c.name)),
            dest: req.to.join(&c.name),
        });
    }
    for p in &plan {
        if std::fs::symlink_metadata(&p.dest).is_ok() && !req.overwrite {
            return Err(Error::Input(format!(
                "{} already exists; pass --overwrite to replace it",
                p.dest.display()
            )));
        }
    }
    Ok(plan)
}

/// An exclusive lock on `DIR/.blockvault-restore.lock` for the run: two restores into one
/// directory would share part-file names and rename each other's half-written files. The file
/// goes when the run ends.
struct TargetLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock_target(dir: &Path) -> Result<TargetLock> {
    let path = dir.join(".blockvault-restore.lock");
    let busy = || {
        Error::Input(format!(
            "another restore is writing into {} (it holds {}); wait for it or restore elsewhere",
            dir.display(),
            path.display()
        ))
    };
    for _ in 0..3 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| busy())?;
        // The lock file goes when its run ends: one opened just before that removal is locked
        // here on a file no longer in the directory, while another run creates and locks a new
        // one. Only the file that still has the name counts; otherwise open it again.
        let held = rustix::fs::fstat(&f).ok();
        let named = rustix::fs::stat(&path).ok();
        if let (Some(h), Some(n)) = (held, named) {
            if (h.st_dev, h.st_ino) == (n.st_dev, n.st_ino) {
                return Ok(TargetLock { path, _file: f });
            }
        }
    }
    Err(busy())
}

/// Renames a finished part file to its final name. Without `overwrite` a file that appeared at
/// that name while the restore ran (the check before writing was hours ago) is not replaced.
fn put_in_place(tmp: &Path, dest: &Path, overwrite: bool) -> std::io::Result<()> {
    if overwrite {
        return std::fs::rename(tmp, dest);
    }
    blockvault_engine::rename_no_replace(tmp, dest).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(
                e.kind(),
                "that name appeared while the restore ran; not replaced (pass --overwrite)",
            )
        } else {
            e
        }
    })
}

async fn write_all(
    repo: &Arc<Repository>,
    m: &PointManifest,
    disks: &[&DiskManifest],
    plan: &[Planned],
    req: &VmRestoreRequest,
    started: &mut DiskStarted<'_>,
) -> Result<()> {
    for (d, p) in disks.iter().zip(plan) {
        // A part file left by an earlier, interrupted run is ours to replace.
        let _ = std::fs::remove_file(&p.tmp);
        let reader = Arc::new(DiskReader::open(
            repo.clone(),
            m,
            &d.name,
            ReaderOptions {
                parallel: req.parallel.max(1),
            },
        )?);
        let progress = Arc::new(Progress::default());
        let shown = started(&d.name, progress.clone());
        let r = match req.format {
            ImageFormat::Raw => export_raw(reader, ExportTarget::Path(p.tmp.clone()), progress)
                .await
                .map_err(Error::from),
            ImageFormat::Vhdx => {
                let lss = d.source.logical_sector_size.unwrap_or(512);
                if reader.size() % lss as u64 != 0 {
                    Err(Error::Input(format!(
                        "disk '{}' has {} bytes, not a multiple of its {lss}-byte sector: it cannot be a VHDX; use --format raw or qcow2",
                        d.name,
                        reader.size()
                    )))
                } else {
                    let opts = VhdxExportOptions {
                        block_size: req.vhdx_block_size,
                        logical_sector_size: lss,
                    };
                    export_vhdx(reader, &p.tmp, &opts, progress)
                        .await
                        .map_err(Error::from)
                }
            }
            ImageFormat::Qcow2 => export_qcow2(reader, &p.tmp, progress).await,
        };
        drop(shown);
        // Errors name the disk and point (a chunk) or the file (a write) themselves, and keep
        // their kind for the caller's exit codes.
        r?;
    }
    for (c, p) in m.configs.iter().zip(&plan[disks.len()..]) {
        let data = read_config(repo, m, c).await?;
        let _ = std::fs::remove_file(&p.tmp);
        std::fs::write(&p.tmp, &data)
            .map_err(|e| Error::io(format!("writing {}", p.tmp.display()), e))?;
        std::fs::File::open(&p.tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", p.tmp.display()), e))?;
    }
    Ok(())
}

/// The command that brings the restored VM up: Hyper-V's Import-VM when the point holds a .vmcx
/// configuration (a new VM id, so the original can keep running), else a virt-install line.
fn bring_up(m: &PointManifest, plan: &[Planned], req: &VmRestoreRequest) -> String {
    let vmcx = plan.iter().find(|p| {
        p.dest
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("vmcx"))
    });
    if let Some(cfg) = vmcx {
        let mut s = String::new();
        if req.format != ImageFormat::Vhdx {
            s.push_str(
                "Hyper-V imports VHDX disks: run again with --format vhdx, then on the Hyper-V host:\n",
            );
        } else {
            s.push_str("On the Hyper-V host (after copying the directory there if needed):\n");
        }
        s.push_str(&format!(
            "Import-VM -Path '{}' -Copy -GenerateNewId -VhdSourcePath '{}' -VhdDestinationPath '<where the VM's disks should live>'",
            cfg.dest.display(),
            req.to.display()
        ));
        return s;
    }
    let fmt = req.format.extension();
    let mut s = format!(
        "virt-install --import --name {} --memory 2048 --vcpus 2 --osinfo detect=on,require=off",
        shell_word(&format!("{}-restored", m.vm))
    );
    for d in plan.iter().filter(|p| p.what.starts_with("disk ")) {
        s.push_str(&format!(
            " --disk path={},format={fmt}",
            shell_word(&d.dest.display().to_string())
        ));
    }
    s
}

/// Quotes a word for a POSIX shell when it needs it.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}
