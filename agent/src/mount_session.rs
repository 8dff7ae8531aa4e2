//! `restore mount` as a library operation: the disks of a restore point served over NBD, with
//! the optional overlay (guest writes), hydration into local files, boot-trace recording and
//! replay, and the session's status file. The CLI parses arguments and renders; this module
//! does the work and reports in [`SessionStatus`].

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use blockvault_engine::{
    start_hydration, DiskReader, Hydration, MountedDisk, Overlay, PrefetchReport,
    RandomReadOptions, RandomReader, ReaderOptions,
};
use blockvault_nbd::{Export, Listener, Security, Server, ServerConfig, TlsKind};
use blockvault_repo::{BootTrace, DiskTrace, Lease, LeaseKind, PointId, PointManifest, Repository};

use crate::mount::MountDevice;
use crate::private_socket::bind_private;
use crate::sessions::{write_status, DiskStatus, SessionStatus};
use crate::{Error, Result};

/// How long after its first read a mount records the boot trace.
pub const BOOT_TRACE_WINDOW: Duration = Duration::from_secs(60);

/// Where a mount listens.
#[derive(Debug, Clone)]
pub enum ListenOn {
    /// A TCP address such as `127.0.0.1:10809`.
    Tcp(String),
    /// A unix socket, created owner-only; it must not exist yet.
    Unix(PathBuf),
}

/// What to mount and how.
pub struct MountRequest {
    /// A point id, a unique prefix of one, or what `Repository::resolve_point` accepts.
    pub point: String,
    /// The disks to serve, by name; each becomes an export.
    pub disks: Vec<String>,
    /// The export name of a single disk (default: the disk's name).
    pub export_name: Option<String>,
    /// Where the guest's writes are kept; `Some` makes the mount writable.
    pub overlay: Option<PathBuf>,
    /// A file (one disk) or a directory (several) to copy the disks into in the background.
    pub hydrate_to: Option<PathBuf>,
    /// The chunk cache of all disks together, in bytes.
    pub cache_bytes: u64,
    /// Chunk fetches in flight per disk.
    pub parallel: usize,
    /// Chunks read ahead of a sequential reader.
    pub readahead: u64,
    /// Replay the newest boot trace of this point or an earlier one of its VM.
    pub prefetch_boot: bool,
    pub listen: ListenOn,
    pub server: ServerConfig,
    pub security: Security,
    /// The sessions directory (`sessions::sessions_dir` of the cache directory).
    pub sessions_dir: PathBuf,
}

struct Mounted {
    name: String,
    export: String,
    uri: String,
    disk: Arc<MountedDisk>,
    hydration: Option<Arc<Hydration>>,
    prefetch: Arc<Mutex<Option<PrefetchReport>>>,
}

/// A mount that is set up and listening; [`MountSession::serve`] runs it.
pub struct MountSession {
    repo: Arc<Repository>,
    point: PointManifest,
    disks: Arc<Vec<Mounted>>,
    server: Server,
    listener: Listener,
    socket: Option<PathBuf>,
    status_path: PathBuf,
    started: String,
    recording: bool,
    tls: Option<TlsKind>,
    notices: Vec<String>,
    // Held for the whole session: a prune will not delete what this mount may read.
    _lease: Lease,
}

impl MountSession {
    /// Checks the request, takes a mount lease, opens every disk, binds the listener and writes
    /// the session's status file. Bad requests are [`Error::Input`], before anything is opened.
    pub async fn start(repo: Arc<Repository>, req: MountRequest) -> Result<Self> {
        req.check()?;
        let lease = repo.take_lease(LeaseKind::Mount).await?;
        let id = repo.resolve_point(&req.point).await?;
        let point = repo.load_point(&id).await?;
        let point_hex = point.id.to_hex();
        let mut notices = Vec::new();
        // Boot traces: this point's first mount records one; prefetch_boot replays the newest.
        let traced = repo.boot_trace_points().await?;
        let recording = !traced.contains(&point.id);
        let replay = if req.prefetch_boot {
            let t = boot_trace_for(&repo, &point, &traced).await?;
            notices.push(match &t {
                Some(t) => format!("prefetching the boot trace recorded on point {}", t.point),
                None => format!(
                    "no boot trace for point {point_hex} or an earlier point of VM {}: nothing to prefetch (this mount records one)",
                    point.vm
                ),
            });
            t
        } else {
            None
        };

        let listener = bind(&req.listen).await?;
        listener
            .check_security(&req.security)
            .map_err(|e| Error::Input(e.to_string()))?;
        let scheme = if req.security.tls.is_some() {
            "nbds"
        } else {
            "nbd"
        };
        let uri = |export: &str| match (&listener, &req.listen) {
            (Listener::Tcp(l), _) => l
                .local_addr()
                .map(|addr| format!("{scheme}://{addr}/{export}"))
                .unwrap_or_default(),
            (Listener::Unix(_), ListenOn::Unix(p)) => {
                format!("{scheme}+unix:///{export}?socket={}", p.display())
            }
            (Listener::Unix(_), ListenOn::Tcp(_)) => String::new(),
        };

        let per_disk = (req.cache_bytes / req.disks.len() as u64) as usize;
        let mut disks = Vec::new();
        for name in &req.disks {
            let (disk, hydration) =
                open_disk(&repo, &point, name, per_disk, &req, &mut notices).await?;
            if recording {
                disk.reader().start_recording(BOOT_TRACE_WINDOW);
            }
            let prefetch = Arc::new(Mutex::new(None));
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
                    *done.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                });
            }
            let export = req.export_name.clone().unwrap_or_else(|| name.clone());
            disks.push(Mounted {
                name: name.clone(),
                uri: uri(&export),
                export,
                disk,
                hydration,
                prefetch,
            });
        }

        let tls = req.security.tls.as_ref().map(|t| t.kind().clone());
        let server = Server::with_security(req.server.clone(), req.security)?;
        for d in &disks {
            server.add_export(
                Export::new(&d.export, Arc::new(MountDevice::new(d.disk.clone())))
                    .with_description(format!("disk {} of restore point {}", d.name, point_hex)),
            )?;
        }

        std::fs::create_dir_all(&req.sessions_dir)
            .map_err(|e| Error::io(format!("creating {}", req.sessions_dir.display()), e))?;
        let status_path = req
            .sessions_dir
            .join(format!("{}.json", std::process::id()));
        let session = Self {
            repo,
            point,
            disks: Arc::new(disks),
            server,
            listener,
            socket: match req.listen {
                ListenOn::Unix(p) => Some(p),
                ListenOn::Tcp(_) => None,
            },
            status_path,
            started: blockvault_engine::rfc3339_ms(now_ms()),
            recording,
            tls,
            notices,
            _lease: lease,
        };
        write_status(&session.status_path, &session.status())?;
        Ok(session)
    }

    /// The URI of each served disk, in the order asked for.
    pub fn uris(&self) -> Vec<&str> {
        self.disks.iter().map(|d| d.uri.as_str()).collect()
    }

    /// The TLS the listener requires, if any.
    pub fn tls(&self) -> Option<&TlsKind> {
        self.tls.as_ref()
    }

    /// What the set-up found worth telling the user (boot trace replay, a merged overlay).
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// The session as its status file shows it.
    pub fn status(&self) -> SessionStatus {
        status_of(
            &self.server,
            &self.disks,
            &self.point.id.to_hex(),
            &self.started,
            self.recording,
        )
    }

    /// Serves until `shutdown` completes, then answers in-flight requests, flushes every
    /// writable disk, stores the boot trace if this session recorded one, and removes the
    /// socket and the status file.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        tracing::info!(uris = ?self.uris(), "mount ready");
        let ticker = {
            let (server, disks, path) = (
                self.server.clone(),
                self.disks.clone(),
                self.status_path.clone(),
            );
            let (point, started, recording) =
                (self.point.id.to_hex(), self.started.clone(), self.recording);
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(1));
                loop {
                    t.tick().await;
                    let status = status_of(&server, &disks, &point, &started, recording);
                    if let Err(e) = write_status(&path, &status) {
                        tracing::warn!(error = %e, "cannot update the session status file");
                    }
                }
            })
        };
        // The trace is stored when its window ends, or at the stop if that comes first.
        let (stop_recording, stopped) = tokio::sync::oneshot::channel::<()>();
        let trace_saver = self.recording.then(|| {
            let (repo, point, disks) = (self.repo.clone(), self.point.clone(), self.disks.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(BOOT_TRACE_WINDOW) => {}
                    _ = stopped => {}
                }
                save_boot_trace(&repo, &point, &disks).await;
            })
        });
        // serve() answers in-flight requests and flushes every writable export before returning.
        let served = self.server.serve(self.listener, shutdown).await;
        ticker.abort();
        let _ = stop_recording.send(());
        if let Some(t) = trace_saver {
            let _ = t.await;
        }
        let mut result = served.map_err(Error::from);
        for d in self.disks.iter() {
            if let Err(e) = d.disk.flush().await {
                result = result.and(Err(e.into()));
            }
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&self.status_path);
        result
    }
}

impl MountRequest {
    /// Refuses a request that cannot be served, before anything is opened.
    pub fn check(&self) -> Result<()> {
        let req = self;
        if req.disks.is_empty() {
            return Err(Error::Input("name at least one disk to mount".into()));
        }
        if req.export_name.is_some() && req.disks.len() != 1 {
            return Err(Error::Input(
            "--export-name applies to a single --disk; with several disks each export is named after its disk".into(),
        ));
        }
        let mut seen = HashSet::new();
        if let Some(d) = req.disks.iter().find(|d| !seen.insert(*d)) {
            return Err(Error::Input(format!("disk '{d}' is given twice")));
        }
        if let ListenOn::Unix(path) = &req.listen {
            if path.exists() {
                return Err(Error::Input(format!(
                    "socket {} already exists (another mount?); remove it first",
                    path.display()
                )));
            }
            if !req.security.allow_from.is_empty() {
                return Err(Error::Input(
                "--allow-from applies to TCP clients; a unix socket is limited by its file permissions (owner only)".into(),
            ));
            }
        }
        req.server
            .validate()
            .map_err(|e| Error::Input(e.to_string()))
    }
}

async fn bind(on: &ListenOn) -> Result<Listener> {
    Ok(match on {
        ListenOn::Unix(path) => bind_private(path)?.into(),
        ListenOn::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listening on {addr}"), e))?
            .into(),
    })
}

/// Opens one disk of the point: the reader and its cache, the overlay of a writable mount, and
/// hydration into a local file. An overlay that an earlier mount merged into its hydrated file
/// is served from that file.
async fn open_disk(
    repo: &Arc<Repository>,
    point: &PointManifest,
    name: &str,
    cache_bytes: usize,
    req: &MountRequest,
    notices: &mut Vec<String>,
) -> Result<(Arc<MountedDisk>, Option<Arc<Hydration>>)> {
    let reader = Arc::new(DiskReader::open(
        repo.clone(),
        point,
        name,
        ReaderOptions::default(),
    )?);
    let random = Arc::new(
        RandomReader::open(
            reader,
            RandomReadOptions {
                cache_bytes,
                parallel: req.parallel.max(1),
                readahead_chunks: req.readahead,
            },
        )
        .await?,
    );
    let overlay = match &req.overlay {
        Some(dir) => Some(Overlay::open(dir, name, &point.id.to_hex(), random.size())?),
        None => None,
    };
    let hydrate_file = match &req.hydrate_to {
        Some(p) if req.disks.len() == 1 => Some(absolute(p)?),
        Some(p) => {
            std::fs::create_dir_all(p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
            Some(absolute(&p.join(format!("{name}.raw")))?)
        }
        None => None,
    };
    let merged = match &overlay {
        Some(o) => o.merged_into()?,
        None => None,
    };
    match (overlay, merged) {
        (Some(o), Some(file)) => {
            if hydrate_file.as_ref().is_some_and(|h| *h != file) {
                return Err(Error::Input(format!(
                    "the overlay of disk '{name}' was merged into {}; mount with --hydrate-to {} (or without --hydrate-to)",
                    file.display(),
                    file.display()
                )));
            }
            let part = PathBuf::from(format!("{}.part", file.display()));
            if same_file(&part, &file) {
                // Stopped after recording the merge, before the part name was removed.
                std::fs::remove_file(&part)
                    .map_err(|e| Error::io(format!("removing {}", part.display()), e))?;
                let _ = std::fs::remove_file(format!("{}.done", part.display()));
            }
            if !file.exists() && part.exists() {
                // Stopped between recording the merge and the rename: finish it.
                std::fs::rename(&part, &file).map_err(|e| {
                    Error::io(
                        format!("renaming {} to {}", part.display(), file.display()),
                        e,
                    )
                })?;
                let _ = std::fs::remove_file(format!("{}.done", part.display()));
            }
            if !file.exists() {
                return Err(Error::Input(format!(
                    "the overlay of disk '{name}' was merged into {}, which is gone; the guest's later writes are only there",
                    file.display()
                )));
            }
            notices.push(format!(
                "disk {name}: serving the hydrated file {} (the overlay was merged into it)",
                file.display()
            ));
            Ok((Arc::new(MountedDisk::new_local(random, o, &file)?), None))
        }
        (overlay, _) => {
            if let Some(file) = &hydrate_file {
                let part = PathBuf::from(format!("{}.part", file.display()));
                if same_file(&part, file) {
                    // Stopped after linking `file` to the part file, before the merge was
                    // recorded: the disk is still the overlay's, and nothing runs on `file`
                    // (a merge record would have named it). The name goes; the part file keeps
                    // the data, and the hydration resumes and merges again.
                    std::fs::remove_file(file)
                        .and_then(|()| sync_dir_of(file))
                        .map_err(|e| Error::io(format!("removing {}", file.display()), e))?;
                }
            }
            let disk = Arc::new(MountedDisk::new(random, overlay)?);
            let hydration = match hydrate_file {
                Some(file) => Some(start_hydration(
                    disk.clone(),
                    file,
                    req.parallel.clamp(1, 4),
                )?),
                None => None,
            };
            Ok((disk, hydration))
        }
    }
}

/// `p` made absolute (without resolving links), so that a merge record names the file wherever
/// the next mount is started from.
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(format!("resolving {}", p.display()), e))
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn status_of(
    server: &Server,
    disks: &[Mounted],
    point: &str,
    started: &str,
    recording: bool,
) -> SessionStatus {
    let s = server.stats().snapshot();
    SessionStatus {
        session: std::process::id().to_string(),
        pid: std::process::id(),
        point: point.to_string(),
        started: started.to_string(),
        connections: s.active_connections,
        total_connections: s.total_connections,
        bytes_served: s.bytes_read,
        bytes_written: s.bytes_written,
        boot_trace: if recording { "recording" } else { "present" }.into(),
        disks: disks
            .iter()
            .map(|d| DiskStatus {
                name: d.name.clone(),
                export: d.export.clone(),
                uri: d.uri.clone(),
                size: d.disk.size(),
                writable: d.disk.writable(),
                overlay_bytes: d.disk.overlay().map(|o| o.changed_bytes()),
                local_file: d.disk.local_path(),
                cache: d.disk.reader().cache_stats(),
                connections: s
                    .sessions
                    .iter()
                    .filter(|x| x.export.as_deref() == Some(d.export.as_str()))
                    .count(),
                hydration: d.hydration.as_ref().map(|h| h.status()),
                boot_prefetch: *d.prefetch.lock().unwrap_or_else(PoisonError::into_inner),
            })
            .collect(),
    }
}

/// The boot trace to replay for `point`: its own, else that of the newest earlier point of the
/// same VM that has one (a successor boots much like its predecessor did).
async fn boot_trace_for(
    repo: &Arc<Repository>,
    point: &PointManifest,
    traced: &HashSet<PointId>,
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
async fn save_boot_trace(repo: &Arc<Repository>, point: &PointManifest, disks: &[Mounted]) {
    let mut traces = Vec::new();
    for d in disks {
        if let Some(r) = d.disk.reader().take_recording() {
            if !r.slots.is_empty() {
                traces.push(DiskTrace {
                    name: d.name.clone(),
                    disk_size: d.disk.size(),
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
        recorded: blockvault_engine::rfc3339_ms(now_ms()),
        disks: traces,
    };
    match repo.save_boot_trace(&point.id, &trace).await {
        Ok(true) => tracing::info!(point = %point.id, "boot trace stored"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot store the boot trace"),
    }
}

/// True when both names exist and are one file.
/// Makes a removal from `path`'s directory durable.
fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
