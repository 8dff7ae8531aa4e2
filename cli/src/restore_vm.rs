//! `restore vm`: every disk and configuration file of a restore point into one directory, written
//! under temporary names and renamed only when all are complete, with the command that brings the
//! VM up. Also the qcow2 export used by it and by `restore export --format qcow2`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use blockvault_agent::export_vhdx::{export_vhdx, VhdxExportOptions};
use blockvault_engine::{export_raw, DiskReader, ExportTarget, Progress, ReaderOptions};
use blockvault_repo::{PointManifest, Repository};
use blockvault_restore::qcow2::Qcow2Writer;
use futures::StreamExt;
use serde_json::json;

use crate::exit::InputError;
use crate::progress::Bar;
use crate::size::{human, parse_size};
use crate::{Global, VmArgs};

fn input(msg: String) -> anyhow::Error {
    anyhow!(InputError(msg))
}

/// Writes the disk `reader` reads as a qcow2 image at `path` (created or truncated). Chunks
/// arrive in disk order and go to one writer thread; the chunk size is a power of two of at least
/// 64 KiB, so every chunk is whole qcow2 clusters.
pub async fn export_qcow2(
    reader: Arc<DiskReader>,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<()> {
    let layout = *reader.layout();
    progress
        .bytes_total
        .store(layout.disk_size(), std::sync::atomic::Ordering::Relaxed);
    if !(layout.chunk_size() as u64).is_multiple_of(Qcow2Writer::cluster_size()) {
        bail!(
            "chunk size {} is not a multiple of the qcow2 cluster size",
            layout.chunk_size()
        );
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = Qcow2Writer::new(file, layout.disk_size())
        .with_context(|| format!("writing {}", path.display()))?;
    let parallel = reader.options().parallel.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, bytes::Bytes)>(parallel * 2);
    let shown = path.to_path_buf();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        while let Some((offset, data)) = rx.blocking_recv() {
            w.write_at(offset, &data)?;
        }
        w.finish().map(|_| ())
    });
    let mut chunks = std::pin::pin!(reader.chunks_in_order());
    let mut fetched = Ok(());
    while let Some((slot, data)) = chunks.next().await {
        let len = layout.chunk_len(slot) as u64;
        match data {
            Ok(Some(d)) => {
                if tx
                    .send((slot * layout.chunk_size() as u64, d))
                    .await
                    .is_err()
                {
                    break; // the writer stopped; its error is reported below
                }
            }
            Ok(None) => {}
            Err(e) => {
                fetched = Err(e);
                break;
            }
        }
        progress
            .bytes_done
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
    }
    drop(tx);
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow!("the qcow2 writer panicked"))?;
    fetched?;
    written.with_context(|| format!("writing {}", shown.display()))?;
    Ok(())
}

/// `restore export --format qcow2`.
pub async fn export_qcow2_file(
    g: &Global,
    repo: Arc<Repository>,
    m: &PointManifest,
    disk: &str,
    out: &str,
    parallel: usize,
) -> Result<()> {
    if out == "-" {
        bail!(input(
            "--format qcow2 needs a file: a qcow2 image cannot be written to standard output"
                .into()
        ));
    }
    let reader = Arc::new(DiskReader::open(
        repo,
        m,
        disk,
        ReaderOptions {
            parallel: parallel.max(1),
        },
    )?);
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "export", !g.quiet && !g.json);
    let r = export_qcow2(reader.clone(), Path::new(out), progress).await;
    bar.finish();
    r?;
    if g.json {
        crate::commands::print_json(
            &json!({"point": m.id, "disk": disk, "size": reader.size(), "out": out, "format": "qcow2"}),
        );
    } else {
        println!(
            "exported disk {disk} of point {} ({}) to {out} as qcow2",
            m.id,
            human(reader.size())
        );
    }
    Ok(())
}

/// A plain file name: no separators, not `.`/`..`, not hidden (temporary names start with `.`).
fn plain_name(n: &str) -> bool {
    !n.is_empty() && !n.starts_with('.') && !n.contains(['/', '\\', '\0']) && n.len() <= 200
}

/// The file name for a disk: the original image's name (Hyper-V's configuration refers to its
/// disks by file name) when the point recorded one, else the disk's name.
fn disk_file_stem(d: &blockvault_repo::DiskManifest) -> String {
    let base = d.source.path.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = base.rsplit_once('.').map(|(s, _)| s).unwrap_or(base);
    if plain_name(stem) {
        stem.to_string()
    } else {
        d.name.clone()
    }
}

struct Planned {
    /// What it is, for messages: `disk sys` or `config file vm.vmcx`.
    what: String,
    tmp: PathBuf,
    dest: PathBuf,
}

pub async fn restore_vm(g: &Global, a: VmArgs) -> Result<()> {
    let repo = crate::commands::open_repo(g).await?;
    let id = repo.resolve_point(&a.point).await?;
    let m = repo.load_point(&id).await?;
    let ext = a.format.as_str();
    let block = parse_size(&a.vhdx_block_size).map_err(input)?;
    let disks: Vec<&blockvault_repo::DiskManifest> = if a.disks.is_empty() {
        m.disks.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in &a.disks {
            let d = m.disk(n).ok_or_else(|| {
                anyhow!(blockvault_engine::Error::NoSuchDisk {
                    point: m.id.to_hex(),
                    disk: n.clone(),
                    available: m
                        .disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            })?;
            v.push(d);
        }
        v
    };
    std::fs::create_dir_all(&a.to).with_context(|| format!("creating {}", a.to.display()))?;
    // Plan every output first, so a name clash or an existing file stops the run before any data
    // is written.
    let mut plan: Vec<Planned> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for d in &disks {
        let mut stem = disk_file_stem(d);
        if names.contains(&format!("{stem}.{ext}")) {
            stem = d.name.clone();
        }
        let file = format!("{stem}.{ext}");
        if !names.insert(file.clone()) {
            bail!(input(format!("two disks would both be written as {file}")));
        }
        plan.push(Planned {
            what: format!("disk {}", d.name),
            tmp: a.to.join(format!(".{file}.bv-part")),
            dest: a.to.join(&file),
        });
    }
    for c in &m.configs {
        if !plain_name(&c.name) || !names.insert(c.name.clone()) {
            bail!(input(format!(
                "config file name '{}' is not a plain file name or clashes with a disk",
                c.name
            )));
        }
        plan.push(Planned {
            what: format!("config file {}", c.name),
            tmp: a.to.join(format!(".{}.bv-part", c.name)),
            dest: a.to.join(&c.name),
        });
    }
    for p in &plan {
        if std::fs::symlink_metadata(&p.dest).is_ok() && !a.overwrite {
            bail!(input(format!(
                "{} already exists; pass --overwrite to replace it",
                p.dest.display()
            )));
        }
    }
    let r = write_all(g, &repo, &m, &disks, &plan, &a, block).await;
    if let Err(e) = r {
        for p in &plan {
            let _ = std::fs::remove_file(&p.tmp);
        }
        return Err(e);
    }
    for p in &plan {
        std::fs::rename(&p.tmp, &p.dest)
            .with_context(|| format!("renaming {} to {}", p.tmp.display(), p.dest.display()))?;
    }
    std::fs::File::open(&a.to)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", a.to.display()))?;
    let outputs: Vec<_> = plan
        .iter()
        .map(|p| json!({"what": p.what, "path": p.dest}))
        .collect();
    let how = bring_up(&m, &plan, &a);
    if g.json {
        crate::commands::print_json(&json!({
            "point": m.id, "vm": m.vm, "to": a.to, "format": a.format, "files": outputs,
            "bring_up": how,
        }));
    } else {
        for p in &plan {
            println!("{} -> {}", p.what, p.dest.display());
        }
        println!();
        println!("{how}");
    }
    Ok(())
}

async fn write_all(
    g: &Global,
    repo: &Arc<Repository>,
    m: &PointManifest,
    disks: &[&blockvault_repo::DiskManifest],
    plan: &[Planned],
    a: &VmArgs,
    block: u64,
) -> Result<()> {
    for (d, p) in disks.iter().zip(plan) {
        // A part file left by an earlier, interrupted run is ours to replace.
        let _ = std::fs::remove_file(&p.tmp);
        let reader = Arc::new(DiskReader::open(
            repo.clone(),
            m,
            &d.name,
            ReaderOptions {
                parallel: a.parallel.max(1),
            },
        )?);
        let progress = Arc::new(Progress::default());
        let bar = Bar::start(
            progress.clone(),
            &format!("disk {}", d.name),
            !g.quiet && !g.json,
        );
        let r: Result<()> = match a.format.as_str() {
            "raw" => export_raw(reader, ExportTarget::Path(p.tmp.clone()), progress)
                .await
                .map_err(Into::into),
            "vhdx" => {
                let lss = d.source.logical_sector_size.unwrap_or(512);
                if reader.size() % lss as u64 != 0 {
                    Err(input(format!(
                        "disk '{}' has {} bytes, not a multiple of its {lss}-byte sector: it cannot be a VHDX; use --format raw or qcow2",
                        d.name,
                        reader.size()
                    )))
                } else {
                    let opts = VhdxExportOptions {
                        block_size: u32::try_from(block).map_err(|_| {
                            input(format!("--vhdx-block-size {block} is too large"))
                        })?,
                        logical_sector_size: lss,
                    };
                    export_vhdx(reader, &p.tmp, &opts, progress)
                        .await
                        .map_err(Into::into)
                }
            }
            _ => export_qcow2(reader, &p.tmp, progress).await,
        };
        bar.finish();
        r.with_context(|| format!("writing {}", p.what))?;
    }
    for (c, p) in m.configs.iter().zip(&plan[disks.len()..]) {
        let data = crate::disk::read_config(repo, m, c).await?;
        let _ = std::fs::remove_file(&p.tmp);
        std::fs::write(&p.tmp, &data).with_context(|| format!("writing {}", p.tmp.display()))?;
        std::fs::File::open(&p.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", p.tmp.display()))?;
    }
    Ok(())
}

/// The command that brings the restored VM up: Hyper-V's Import-VM when the point holds a .vmcx
/// configuration (a new VM id, so the original can keep running), else a virt-install line.
fn bring_up(m: &PointManifest, plan: &[Planned], a: &VmArgs) -> String {
    let disks: Vec<&Planned> = plan
        .iter()
        .filter(|p| p.what.starts_with("disk "))
        .collect();
    let vmcx = plan.iter().find(|p| {
        p.dest
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("vmcx"))
    });
    if let Some(cfg) = vmcx {
        let mut s = String::new();
        if a.format != "vhdx" {
            s.push_str(
                "Hyper-V imports VHDX disks: run again with --format vhdx, then on the Hyper-V host:\n",
            );
        } else {
            s.push_str("On the Hyper-V host (after copying the directory there if needed):\n");
        }
        s.push_str(&format!(
            "Import-VM -Path '{}' -Copy -GenerateNewId -VhdSourcePath '{}' -VhdDestinationPath '<where the VM's disks should live>'",
            cfg.dest.display(),
            a.to.display()
        ));
        return s;
    }
    let fmt = match a.format.as_str() {
        "qcow2" => "qcow2",
        "vhdx" => "vhdx",
        _ => "raw",
    };
    let mut s = format!(
        "virt-install --import --name {} --memory 2048 --vcpus 2 --osinfo detect=on,require=off",
        shell_word(&format!("{}-restored", m.vm))
    );
    for d in disks {
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
