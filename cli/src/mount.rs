//! `restore mount`, `restore sessions`, `restore unmount`: serve restore-point disks over NBD.
//!
//! A running mount writes a small JSON status file `<cache-dir>/sessions/<pid>.json` every
//! second and removes it when it stops; `sessions` reads those files (ignoring and removing
//! those of dead processes), `unmount` sends SIGTERM to the pid and waits for the file to go.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blockvault_agent::mount::MountDevice;
use blockvault_engine::PrefetchReport;
use blockvault_engine::{
    start_hydration, DiskReader, Hydration, MountedDisk, Overlay, RandomReadOptions, RandomReader,
    ReaderOptions,
};
use blockvault_nbd::{Cidr, Export, Listener, Security, Server, ServerConfig, TlsConfig};
use blockvault_repo::{BootTrace, DiskTrace};
use serde_json::json;

use crate::commands::{cache_dir, open_repo, print_json};
use crate::exit::InputError;
use crate::size::{human, parse_size};
use crate::{Global, MountArgs, UnmountArgs};

fn input(msg: String) -> anyhow::Error {
    anyhow!(InputError(msg))
}

fn sessions_dir(g: &Global) -> PathBuf {
    blockvault_agent::sessions::sessions_dir(&cache_dir(g))
}

struct Mounted {
    name: String,
    export: String,
    uri: String,
    disk: Arc<MountedDisk>,
    hydration: Option<Arc<Hydration>>,
    prefetch: Arc<std::sync::Mutex<Option<PrefetchReport>>>,
}

/// How long after its first read a mount records the boot trace.
const BOOT_TRACE_WINDOW: Duration = Duration::from_secs(60);

/// The boot trace to replay for `point`: its own, else that of the newest earlier point of the
/// same VM that has one (a successor boots much like its predecessor did).
async fn boot_trace_for(
    repo: &Arc<blockvault_repo::Repository>,
    point: &blockvault_repo::PointManifest,
    traced: &std::collections::HashSet<blockvault_repo::PointId>,
) -> Result<Option<BootTrace>> {
    if traced.contains(&point.id) {
        return Ok(repo.load_boot_trace(&point.id).await?);
    }
    let (points, _) = repo.list_points().await?;
    let mut earlier: Vec<_> = points
        .iter()
        .filter(|p| p.vm == point.vm && p.created < point.created && traced.contains(&p.id))
        .collect();
    earlier.sort_by(|a, b| b.created.cmp(&a.created));
    for p in earlier {
        match repo.load_boot_trace(&p.id).await {
            Ok(Some(t)) => return Ok(Some(t)),
            Ok(None) => {}
            Err(e) => tracing::warn!(point = %p.id, error = %e, "unreadable boot trace skipped"),
        }
    }
    Ok(None)
}

/// Stores what the disks recorded as the point's boot trace (once; later calls do nothing).
async fn save_boot_trace(
    repo: &Arc<blockvault_repo::Repository>,
    point: &blockvault_repo::PointManifest,
    disks: &[(String, Arc<MountedDisk>)],
) {
    let mut traces = Vec::new();
    for (name, d) in disks {
        if let Some(r) = d.reader().take_recording() {
            if !r.slots.is_empty() {
                traces.push(DiskTrace {
                    name: name.clone(),
                    disk_size: d.size(),
                    chunk_size: point.chunk_size,
                    slots: r.slots,
                    span_ms: r.span_ms,
                });
            }
        }
    }
    if traces.is_empty() {
        return;
    }
    let trace = BootTrace {
        version: blockvault_repo::format::BOOT_TRACE_VERSION,
        point: point.id.to_hex(),
        recorded: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        disks: traces,
    };
    match repo.save_boot_trace(&point.id, &trace).await {
        Ok(true) => tracing::info!(point = %point.id, "boot trace stored"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot store the boot trace"),
    }
}

pub async fn mount(g: &Global, a: MountArgs) -> Result<()> {
    if a.overlay.is_some() && !a.writable {
        return Err(input("--overlay needs --writable".into()));
    }
    if a.writable && a.overlay.is_none() {
        return Err(input(
            "--writable needs --overlay DIR (where the guest's writes are kept)".into(),
        ));
    }
    if a.export_name.is_some() && a.disks.len() != 1 {
        return Err(input(
            "--export-name applies to a single --disk; with several disks each export is named after its disk".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = a.disks.iter().find(|d| !seen.insert(*d)) {
        return Err(input(format!("disk '{d}' is given twice")));
    }
    let cache = parse_size(&a.memory_cache).map_err(|e| input(format!("--memory-cache: {e}")))?;
    let per_disk = (cache / a.disks.len() as u64) as usize;

    let security = security(&a)?;
    let config = ServerConfig {
        max_connections: a.max_connections,
        handshake_timeout_secs: a.handshake_timeout,
        idle_timeout_secs: a.idle_timeout,
        idle_close_secs: a.idle_disconnect,
        ..ServerConfig::default()
    };
    config.validate().map_err(|e| input(e.to_string()))?;

    let repo = open_repo(g).await?;
    let id = repo.resolve_point(&a.point).await?;
    let point = repo.load_point(&id).await?;
    let point_hex = point.id.to_hex();
    // Boot traces: this point's first mount records one; --prefetch-boot replays the newest.
    let traced = repo.boot_trace_points().await?;
    let recording = !traced.contains(&point.id);
    let replay = if a.prefetch_boot {
        let t = boot_trace_for(&repo, &point, &traced).await?;
        if let Some(t) = &t {
            eprintln!("prefetching the boot trace recorded on point {}", t.point);
        } else {
            eprintln!(
                "no boot trace for point {point_hex} or an earlier point of VM {}: nothing to prefetch (this mount records one)",
                point.vm
            );
        }
        t
    } else {
        None
    };

    let listener: Listener = match (&a.listen, &a.socket) {
        (Some(_), Some(_)) => return Err(input("give either --listen or --socket".into())),
        (_, Some(path)) => {
            if path.exists() {
                return Err(input(format!(
                    "socket {} already exists (another mount?); remove it first",
                    path.display()
                )));
            }
            if !a.allow_from.is_empty() {
                return Err(input(
                    "--allow-from applies to TCP clients; a unix socket is limited by its file permissions (owner only)".into(),
                ));
            }
            crate::socket::bind_private(path)?.into()
        }
        (listen, None) => {
            let addr = listen.as_deref().unwrap_or("127.0.0.1:10809");
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?
                .into()
        }
    };
    listener
        .check_security(&security)
        .map_err(|e| input(e.to_string()))?;
    let scheme = if security.tls.is_some() {
        "nbds"
    } else {
        "nbd"
    };
    let base_uri = |export: &str| match (&listener, &a.socket) {
        (Listener::Tcp(l), _) => l
            .local_addr()
            .map(|addr| format!("{scheme}://{addr}/{export}"))
            .unwrap_or_default(),
        (Listener::Unix(_), Some(p)) => {
            format!("{scheme}+unix:///{export}?socket={}", p.display())
        }
        (Listener::Unix(_), None) => String::new(),
    };

    let mut disks = Vec::new();
    for name in &a.disks {
        let reader = Arc::new(DiskReader::open(
            repo.clone(),
            &point,
            name,
            ReaderOptions::default(),
        )?);
        let random = Arc::new(
            RandomReader::open(
                reader,
                RandomReadOptions {
                    cache_bytes: per_disk,
                    parallel: a.parallel.max(1),
                    readahead_chunks: a.readahead,
                },
            )
            .await?,
        );
        let overlay = match &a.overlay {
            Some(dir) => Some(Overlay::open(dir, name, &point_hex, random.size())?),
            None => None,
        };
        let hydrate_file = match &a.hydrate_to {
            Some(p) if a.disks.len() == 1 => Some(absolute(p)?),
            Some(p) => {
                std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
                Some(absolute(&p.join(format!("{name}.raw")))?)
            }
            None => None,
        };
        // An overlay an earlier mount merged into its hydrated file: that file is the disk now.
        let merged = match &overlay {
            Some(o) => o.merged_into()?,
            None => None,
        };
        let (disk, hydration) = match (overlay, merged) {
            (Some(o), Some(file)) => {
                if hydrate_file.as_ref().is_some_and(|h| *h != file) {
                    return Err(input(format!(
                        "the overlay of disk '{name}' was merged into {}; mount with --hydrate-to {} (or without --hydrate-to)",
                        file.display(),
                        file.display()
                    )));
                }
                let part = PathBuf::from(format!("{}.part", file.display()));
                if !file.exists() && part.exists() {
                    // Stopped between recording the merge and the rename: finish it.
                    std::fs::rename(&part, &file).with_context(|| {
                        format!("renaming {} to {}", part.display(), file.display())
                    })?;
                    let _ = std::fs::remove_file(format!("{}.done", part.display()));
                }
                if !file.exists() {
                    return Err(input(format!(
                        "the overlay of disk '{name}' was merged into {}, which is gone; the guest's later writes are only there",
                        file.display()
                    )));
                }
                eprintln!(
                    "disk {name}: serving the hydrated file {} (the overlay was merged into it)",
                    file.display()
                );
                (Arc::new(MountedDisk::new_local(random, o, &file)?), None)
            }
            (overlay, _) => {
                let disk = Arc::new(MountedDisk::new(random, overlay)?);
                let hydration = match hydrate_file {
                    Some(file) => {
                        Some(start_hydration(disk.clone(), file, a.parallel.clamp(1, 4))?)
                    }
                    None => None,
                };
                (disk, hydration)
            }
        };
        if recording {
            disk.reader().start_recording(BOOT_TRACE_WINDOW);
        }
        let prefetch = Arc::new(std::sync::Mutex::new(None));
        if let Some(slots) = replay
            .as_ref()
            .and_then(|t| t.disk(name))
            .filter(|t| t.chunk_size == point.chunk_size)
            .map(|t| t.slots.clone())
        {
            let (reader, done) = (disk.reader().clone(), prefetch.clone());
            tokio::spawn(async move {
                let r = reader.prefetch(&slots).await;
                tracing::info!(
                    chunks = r.chunks,
                    bytes = r.bytes,
                    ms = r.millis,
                    "boot prefetch done"
                );
                *done
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
            });
        }
        let export = a.export_name.clone().unwrap_or_else(|| name.clone());
        disks.push(Mounted {
            name: name.clone(),
            uri: base_uri(&export),
            export,
            disk,
            hydration,
            prefetch,
        });
    }

    let tls_kind = security.tls.as_ref().map(|t| t.kind().clone());
    let server = Server::with_security(config, security)?;
    for d in &disks {
        server.add_export(
            Export::new(&d.export, Arc::new(MountDevice::new(d.disk.clone())))
                .with_description(format!("disk {} of restore point {}", d.name, point_hex)),
        )?;
    }

    let dir = sessions_dir(g);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let status_path = dir.join(format!("{}.json", std::process::id()));
    let started = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let status = {
        let server = server.clone();
        let (disks, point_hex, started) = (
            disks
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        d.export.clone(),
                        d.uri.clone(),
                        d.disk.clone(),
                        d.hydration.clone(),
                        d.prefetch.clone(),
                    )
                })
                .collect::<Vec<_>>(),
            point_hex.clone(),
            started,
        );
        move || {
            let s = server.stats().snapshot();
            json!({
                "session": std::process::id().to_string(),
                "pid": std::process::id(),
                "point": point_hex,
                "started": started,
                "connections": s.active_connections,
                "total_connections": s.total_connections,
                "bytes_served": s.bytes_read,
                "bytes_written": s.bytes_written,
                "boot_trace": if recording { "recording" } else { "present" },
                "disks": disks.iter().map(|(name, export, uri, disk, hyd, pre)| json!({
                    "name": name,
                    "export": export,
                    "uri": uri,
                    "size": disk.size(),
                    "writable": disk.writable(),
                    "overlay_bytes": disk.overlay().map(|o| o.changed_bytes()),
                    "local_file": disk.local_path(),
                    "cache": disk.reader().cache_stats(),
                    "connections": s.sessions.iter().filter(|x| x.export.as_deref() == Some(export.as_str())).count(),
                    "hydration": hyd.as_ref().map(|h| h.status()),
                    "boot_prefetch": *pre.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                })).collect::<Vec<_>>(),
            })
        }
    };
    write_status(&status_path, &status())?;

    let uris: Vec<&str> = disks.iter().map(|d| d.uri.as_str()).collect();
    if g.json {
        println!("{}", serde_json::to_string(&status())?);
    } else {
        for d in &disks {
            println!("{}", d.uri);
        }
        eprintln!(
            "serving {} disk(s) of restore point {} ({}, cache {}); stop with Ctrl-C or `blockvault restore unmount {}`",
            disks.len(),
            point_hex,
            if a.writable { "writable" } else { "read-only" },
            human(cache),
            std::process::id()
        );
        match &tls_kind {
            Some(blockvault_nbd::TlsKind::X509 { client_ca: Some(_) }) => eprintln!(
                "TLS required (X.509); clients need a certificate signed by the CA in {}",
                a.tls_certs.as_deref().unwrap_or(Path::new("?")).display()
            ),
            Some(blockvault_nbd::TlsKind::X509 { client_ca: None }) => {
                eprintln!("TLS required (X.509, no client certificates)")
            }
            Some(blockvault_nbd::TlsKind::Psk { identities }) => {
                eprintln!("TLS required (PSK); identities: {}", identities.join(", "))
            }
            None => {}
        }
    }
    use std::io::Write;
    std::io::stdout().flush().ok();
    tracing::info!(?uris, "mount ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let ticker = {
        let (status, path) = (status.clone(), status_path.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                if let Err(e) = write_status(&path, &status()) {
                    tracing::warn!(error = %e, "cannot update the session status file");
                }
            }
        })
    };
    let traced_disks: Vec<(String, Arc<MountedDisk>)> = disks
        .iter()
        .map(|d| (d.name.clone(), d.disk.clone()))
        .collect();
    // The trace is stored when its window ends, or at the stop if that comes first.
    let (stop_recording, stopped) = tokio::sync::oneshot::channel::<()>();
    let trace_saver = recording.then(|| {
        let (repo, point, traced_disks) = (repo.clone(), point.clone(), traced_disks.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(BOOT_TRACE_WINDOW) => {}
                _ = stopped => {}
            }
            save_boot_trace(&repo, &point, &traced_disks).await;
        })
    });
    // serve() answers in-flight requests and flushes every writable export before returning.
    let served = server.serve(listener, shutdown).await;
    ticker.abort();
    let _ = stop_recording.send(());
    if let Some(t) = trace_saver {
        let _ = t.await;
    }
    let mut result = served.map_err(anyhow::Error::from);
    for d in &disks {
        if let Err(e) = d.disk.flush().await {
            result = result.and(Err(anyhow::Error::from(e)));
        }
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(&status_path);
    result
}

/// `p` made absolute (without resolving links), so that a merge record names the file wherever
/// the next mount is started from.
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// TLS credentials and `--allow-from` blocks, checked before anything else is opened.
fn security(a: &MountArgs) -> Result<Security> {
    let tls = match (&a.tls_certs, &a.tls_psk) {
        (Some(dir), None) => Some(TlsConfig::from_x509_dir(dir).map_err(|e| input(e.to_string()))?),
        (None, Some(file)) => {
            Some(TlsConfig::from_psk_file(file).map_err(|e| input(e.to_string()))?)
        }
        (None, None) => None,
        (Some(_), Some(_)) => return Err(input("give either --tls-certs or --tls-psk".into())),
    };
    let allow_from = a
        .allow_from
        .iter()
        .map(|s| {
            s.parse::<Cidr>()
                .map_err(|e| input(format!("--allow-from {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Security { tls, allow_from })
}

fn write_status(path: &Path, v: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn alive(pid: u32) -> bool {
    blockvault_agent::sessions::alive(pid)
}

/// Status of live mounts; files of dead processes are removed.
fn live_sessions(g: &Global) -> Vec<(PathBuf, serde_json::Value)> {
    blockvault_agent::sessions::live_sessions(&sessions_dir(g))
}

pub fn sessions(g: &Global) -> Result<()> {
    let list = live_sessions(g);
    if g.json {
        print_json(&json!(list.into_iter().map(|(_, v)| v).collect::<Vec<_>>()));
        return Ok(());
    }
    if list.is_empty() {
        println!("no active mounts");
    }
    for (_, v) in list {
        println!(
            "session {}  point {}  connections {}  served {}",
            v["session"].as_str().unwrap_or("?"),
            v["point"].as_str().unwrap_or("?"),
            v["connections"],
            human(v["bytes_served"].as_u64().unwrap_or(0))
        );
        for d in v["disks"].as_array().into_iter().flatten() {
            let hyd = match d["hydration"].as_object() {
                Some(h) => format!(
                    "  hydration {}/{}{}",
                    human(h["bytes_done"].as_u64().unwrap_or(0)),
                    human(h["bytes_total"].as_u64().unwrap_or(0)),
                    if h["complete"].as_bool() == Some(true) {
                        " (complete)"
                    } else {
                        ""
                    }
                ),
                None => String::new(),
            };
            println!(
                "  {}  {}{}{}",
                d["name"].as_str().unwrap_or("?"),
                d["uri"].as_str().unwrap_or("?"),
                if d["writable"].as_bool() == Some(true) {
                    "  writable"
                } else {
                    ""
                },
                hyd
            );
        }
    }
    Ok(())
}

pub async fn unmount(g: &Global, a: UnmountArgs) -> Result<()> {
    let list = live_sessions(g);
    let targets: Vec<_> = if a.all {
        list
    } else {
        let Some(s) = a.session.as_deref() else {
            return Err(input(
                "name a SESSION (see `restore sessions`) or pass --all".into(),
            ));
        };
        let found: Vec<_> = list
            .into_iter()
            .filter(|(_, v)| v["session"].as_str() == Some(s))
            .collect();
        if found.is_empty() {
            return Err(input(format!("no active mount session '{s}'")));
        }
        found
    };
    for (path, v) in &targets {
        let pid = v["pid"].as_u64().unwrap_or(0) as i32;
        let Some(p) = rustix::process::Pid::from_raw(pid) else {
            continue;
        };
        rustix::process::kill_process(p, rustix::process::Signal::TERM)
            .with_context(|| format!("signalling mount process {pid}"))?;
        // The mount removes its status file as the last thing it does.
        let deadline = Instant::now() + Duration::from_secs(60);
        while path.exists() && alive(pid as u32) {
            if Instant::now() > deadline {
                bail!("mount process {pid} did not stop within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !g.json {
            println!("stopped session {pid}");
        }
    }
    if g.json {
        print_json(
            &json!({"stopped": targets.iter().map(|(_, v)| v["session"].clone()).collect::<Vec<_>>()}),
        );
    }
    Ok(())
}
