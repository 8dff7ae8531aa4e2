//! The reference disk backed up into an S3-protocol server on loopback, beside the same backup into
//! a local directory, then served by `restore mount` from S3 with a cold and a warm on-disk chunk
//! cache. Two servers: moto (Python, objects in memory; its access log counts requests on the
//! server side) and s3s-fs (Rust, objects as files), so a slow server shows as a difference
//! between them rather than as blockvault's cost.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::disk::Reference;
use crate::measure::{timed, Sample, PASSWORD};
use crate::nbd::nbdcopy;

pub(crate) const BUCKET: &str = "bench";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Moto,
    S3sFs,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Moto => "moto",
            ServerKind::S3sFs => "s3s-fs",
        }
    }
}

pub(crate) const ACCESS_KEY: &str = "AKIABENCHBLOCKVAULT1";
pub(crate) const SECRET_KEY: &str = "bench-secret";

pub(crate) struct Server {
    child: Child,
    kind: ServerKind,
    pub(crate) port: u16,
    /// moto's access log (requests by method); s3s-fs keeps none.
    log: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub(crate) fn start(kind: ServerKind, work: &Path) -> Result<Self> {
        let port = crate::nbd::free_port()?;
        let m = match kind {
            ServerKind::Moto => {
                let log = work.join("moto.log");
                let child = Command::new("moto_server")
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting moto_server (scripts/install-deps.sh installs it)")?;
                Server {
                    child,
                    kind,
                    port,
                    log: Some(log),
                }
            }
            ServerKind::S3sFs => {
                let root = work.join("s3s-fs");
                let _ = std::fs::remove_dir_all(&root);
                std::fs::create_dir_all(root.join(BUCKET))?;
                let bin = std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs"))
                    .filter(|p| p.is_file())
                    .unwrap_or_else(|| "s3s-fs".into());
                let child = Command::new(bin)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&root)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting s3s-fs (scripts/install-deps.sh installs it)")?;
                let s = Server {
                    child,
                    kind,
                    port,
                    log: None,
                };
                wait_listening(port)?;
                return Ok(s);
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.write_all(
                    format!(
                        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\
                         Connection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
                    return Ok(m);
                }
                bail!(
                    "creating bucket {BUCKET}: {}",
                    reply.lines().next().unwrap_or("")
                );
            }
            if Instant::now() > deadline {
                bail!("moto_server did not come up on port {port}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Requests the server has logged so far, by method (empty for a server without a log).
    fn requests(&self) -> Result<Vec<(String, u64)>> {
        let mut counts: Vec<(String, u64)> = Vec::new();
        let Some(log) = &self.log else {
            return Ok(counts);
        };
        for line in BufReader::new(std::fs::File::open(log)?).lines() {
            let line = line?;
            let Some(m) = line.split('"').nth(1).and_then(|r| r.split(' ').next()) else {
                continue;
            };
            if !["GET", "PUT", "POST", "HEAD", "DELETE"].contains(&m) {
                continue;
            }
            match counts.iter_mut().find(|(k, _)| k == m) {
                Some((_, n)) => *n += 1,
                None => counts.push((m.to_string(), 1)),
            }
        }
        Ok(counts)
    }
}

fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the S3 server did not come up on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Figures of the S3 run that are not wall times, for the report.
#[derive(Debug, Default, serde::Serialize)]
pub struct S3Figures {
    pub server: String,
    pub server_requests: Vec<(String, u64)>,
    pub client_requests: u64,
    pub bytes_uploaded: u64,
    pub stored_gib: f64,
    pub disk_gib: f64,
    /// File restore from a cold cache: bytes and requests to list the root, and to extract one
    /// file of `file_bytes` (the file of FilesFigures).
    pub files_ls_bytes: u64,
    pub files_ls_requests: u64,
    pub files_get_bytes: u64,
    pub files_get_requests: u64,
    pub file_bytes: u64,
    /// `verify --read-data-subset 5%` against the server: bytes the run read (its share of the
    /// repository) and bytes it downloaded (its egress).
    pub subset_bytes_read: u64,
    pub subset_bytes_downloaded: u64,
    pub subset_requests: u64,
}

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// A blockvault command on the repository `prefix` of the bench bucket of the server on `port`.
pub(crate) fn command(blockvault: &Path, port: u16, cache: &Path, prefix: &str) -> Command {
    let mut c = Command::new(blockvault);
    c.env("BLOCKVAULT_REPO", format!("s3://{BUCKET}/{prefix}"))
        .env("BLOCKVAULT_CACHE_DIR", cache)
        .env("BLOCKVAULT_PASSWORD", PASSWORD)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_ENDPOINT_URL")
        .args(["--quiet", "--s3-allow-http", "--s3-endpoint"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--cache-size", "4GiB"]);
    c
}

pub fn run_all(
    blockvault: &Path,
    work: &Path,
    r: &Reference,
    kind: ServerKind,
    files: Option<&crate::files::FilesFigures>,
) -> Result<(Vec<Sample>, S3Figures)> {
    let server = Server::start(kind, work)?;
    let tool = format!("blockvault, {}", kind.name());
    let cache = work.join("bv-cache-s3");
    let _ = std::fs::remove_dir_all(&cache);
    let bv = || command(blockvault, server.port, &cache, "repo");
    crate::disk::run(bv().args(["repo", "init"]))?;
    let summary = work.join("s3-backup.json");
    let mut c = bv();
    c.args(["backup", "--json", "--vm", "bench", "--disk"])
        .arg(format!("d={}", r.raw.display()));
    let mut out = vec![timed("full backup to S3", &tool, c, None, Some(&summary))?];
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary)?).context("backup --json summary")?;
    let point = b["point"]
        .as_str()
        .context("no point in summary")?
        .to_string();
    out[0].repo_bytes = Some(num(&b, &["bytes_stored"]));
    let mut figures = S3Figures {
        server: kind.name().into(),
        server_requests: server.requests()?,
        client_requests: num(&b, &["storage", "requests"]),
        bytes_uploaded: num(&b, &["storage", "bytes_uploaded"]),
        stored_gib: num(&b, &["bytes_stored"]) as f64 / (1u64 << 30) as f64,
        disk_gib: r.size as f64 / (1u64 << 30) as f64,
        ..Default::default()
    };
    if let Some(f) = files {
        // Cold cache: every chunk the file system touches comes from S3.
        let report = work.join("s3-files.json");
        remove_blob_caches(&cache)?;
        let mut c = bv();
        c.args([
            "restore", "files", &point, "--disk", "d", "--json", "ls", "/",
        ]);
        out.push(timed(
            "files: list the root from S3, cold cache",
            &tool,
            c,
            None,
            Some(&report),
        )?);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        figures.files_ls_bytes = num(&v, &["storage", "bytes_downloaded"]);
        figures.files_ls_requests = num(&v, &["storage", "requests"]);
        remove_blob_caches(&cache)?;
        let to = work.join("s3-files-out");
        let _ = std::fs::remove_dir_all(&to);
        let mut c = bv();
        c.args([
            "restore", "files", &point, "--disk", "d", "--json", "get", &f.file, "--to",
        ])
        .arg(&to);
        out.push(timed(
            "files: extract one file from S3, cold cache",
            &tool,
            c,
            None,
            Some(&report),
        )?);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        figures.files_get_bytes = num(&v, &["storage", "bytes_downloaded"]);
        figures.files_get_requests = num(&v, &["storage", "requests"]);
        figures.file_bytes = f.file_bytes;
        let name = Path::new(&f.file).file_name().context("file name")?;
        crate::measure::check_same(Path::new(&f.file), &to.join(name))?;
        std::fs::remove_dir_all(&to)?;
    }

    // One run of a nightly sampled verify: its egress should be its share of the repository.
    let report = work.join("s3-verify.json");
    let mut c = bv();
    c.args(["verify", "--json", "--read-data-subset", "5%"]);
    out.push(timed(
        "verify 5% subset from S3",
        &tool,
        c,
        None,
        Some(&report),
    )?);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    figures.subset_bytes_read = num(&v, &["bytes_read"]);
    figures.subset_bytes_downloaded = num(&v, &["storage", "bytes_downloaded"]);
    figures.subset_requests = num(&v, &["storage", "requests"]);

    for (label, clear) in [("cold cache", true), ("warm cache", false)] {
        if clear {
            remove_blob_caches(&cache)?;
        }
        let (uri, mounted) = crate::nbd::mount(
            bv().args(["restore", "mount", &point, "--disk", "d"])
                .args(["--listen", "127.0.0.1:0"]),
        )?;
        let mut s = timed(
            &format!("NBD nbdcopy from S3, {label}"),
            &tool,
            nbdcopy(&uri),
            None,
            None,
        )?;
        s.peak_rss_mib = crate::nbd::peak_rss_mib(mounted.id());
        out.push(s);
        drop(mounted);
    }
    if kind == ServerKind::S3sFs {
        std::fs::remove_dir_all(work.join("s3s-fs"))?;
    }
    Ok((out, figures))
}

/// Empties the on-disk blob caches under a cache directory (`<repo id>/blobs`), keeping the index.
fn remove_blob_caches(cache: &Path) -> Result<()> {
    for e in std::fs::read_dir(cache)?.flatten() {
        let blobs = e.path().join("blobs");
        if blobs.is_dir() {
            std::fs::remove_dir_all(&blobs)?;
        }
    }
    Ok(())
}
