//! Real S3-protocol servers (moto's standalone server, in memory; s3s-fs, on disk) and a
//! fault-injecting HTTP proxy in front of them, all on 127.0.0.1 and stopped by their own pid
//! when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::BIN;

pub const ACCESS_KEY: &str = "AKIATESTBLOCKVAULT01";
/// Recognisable so the tests can prove it never reaches any output.
pub const SECRET_KEY: &str = "sEcReT-7Hq2-zz-must-never-be-printed";
pub const BUCKET: &str = "vault";

pub struct S3Server {
    child: Child,
    pub port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl S3Server {
    /// Starts moto's S3 server and creates the test bucket.
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the S3 test server 'moto_server' ({e}); install it with \
                     scripts/install-deps.sh (pip install 'moto[server]')"
                )
            });
        let s = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((code, _)) = raw_request(port, &format!("PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")) {
                assert!(code == 200 || code == 409, "creating the test bucket: HTTP {code}");
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "S3 test server did not answer within 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port outside the kernel's ephemeral range, free now. A server that is killed and started
/// again on the same port needs one that no outgoing connection of another test can take
/// meanwhile.
fn free_fixed_port() -> u16 {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(10000..low.max(10001));
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// s3s-fs: an S3-protocol server that keeps each object as a file under its root directory
/// (written to a temporary file, then renamed), so it can be killed and started again on the
/// same data and port.
pub struct DiskS3Server {
    child: Option<Child>,
    pub port: u16,
    pub root: PathBuf,
}

/// The s3s-fs binary: on PATH, or where `cargo install` puts it.
fn s3s_fs_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|c| c.join("bin").join("s3s-fs"))
                .filter(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the S3 test server 's3s-fs' is not installed; install it with \
                 scripts/install-deps.sh (cargo install --locked s3s-fs --features binary)"
            )
        })
}

impl DiskS3Server {
    /// Starts s3s-fs on `root` (created if missing, with the test bucket in it).
    pub fn start(root: &Path) -> Self {
        // A bucket is a directory under the root.
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut s = Self {
            child: None,
            port: free_fixed_port(),
            root: root.to_path_buf(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the S3 test server 's3s-fs': {e}"));
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Any HTTP answer (an unsigned request gets 403) means it is serving.
        let probe =
            format!("GET /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        while raw_request(self.port, &probe).is_none() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "s3s-fs exited ({status}) before serving on port {}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not answer on port {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, by the server's own pid: no chance to finish or clean up anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the server again on the same root and port.
    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the test bucket's objects are, one file each.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }
}

impl Drop for DiskS3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends one request; returns the status code and the whole response.
fn raw_request(port: u16, req: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

/// What the proxy does with each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Some requests get 500/503, some have their connection reset, some are delayed.
    Flaky = 1,
    /// Every request is refused with 403 AccessDenied.
    Forbidden = 2,
    /// Connections are accepted and closed at once (the server is gone).
    Down = 3,
    /// The first few PUTs of packs reach the server, but their answers are lost: the client's
    /// connection is closed instead (what a reset after the server stored the object does).
    LoseAnswers = 4,
    /// Requests are read and never answered (a server or network that hangs).
    Stall = 5,
    /// The first few PUTs of packs are refused with 409 ConditionalRequestConflict without
    /// reaching the server (what S3 answers a create-only put while an earlier try of it is
    /// still being processed).
    Conflict = 6,
}

/// How many pack PUTs [`Mode::LoseAnswers`] loses the answers of.
pub const LOST_ANSWERS: u64 = 3;

pub struct FaultProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    /// Request bytes forwarded to the server (headers and bodies).
    pub forwarded: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    pub faults: Arc<AtomicU64>,
    /// Pack PUTs whose answers were lost in [`Mode::LoseAnswers`].
    pub lost: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let p = Self {
            port,
            mode: Arc::new(AtomicU8::new(Mode::Pass as u8)),
            stop: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::default(),
            requests: Arc::default(),
            faults: Arc::default(),
            lost: Arc::default(),
        };
        let (mode, stop, fwd, reqs, faults, lost) = (
            p.mode.clone(),
            p.stop.clone(),
            p.forwarded.clone(),
            p.requests.clone(),
            p.faults.clone(),
            p.lost.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let n = reqs.fetch_add(1, Ordering::SeqCst);
                        let m = mode.load(Ordering::SeqCst);
                        let (fwd, faults, lost, stop) =
                            (fwd.clone(), faults.clone(), lost.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let _ = handle(c, upstream, m, n, &fwd, &faults, &lost, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        p
    }

    pub fn set(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads up to the end of the request head.
fn read_head(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(head)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn respond(c: &mut TcpStream, status: &str, code: &str) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[allow(clippy::too_many_arguments)]
fn handle(
    mut c: TcpStream,
    upstream: u16,
    mode: u8,
    n: u64,
    fwd: &AtomicU64,
    faults: &AtomicU64,
    lost: &AtomicU64,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    if mode == Mode::Down as u8 {
        return c.shutdown(Shutdown::Both);
    }
    let head = read_head(&mut c)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let len = content_length(&text);
    if mode == Mode::Stall as u8 {
        faults.fetch_add(1, Ordering::SeqCst);
        // Hold the connection open, answering nothing, until the proxy is dropped.
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    let is_pack_put = text.starts_with("PUT ")
        && text
            .split_whitespace()
            .nth(1)
            .is_some_and(|p| p.contains("/packs/"));
    if mode == Mode::Conflict as u8
        && is_pack_put
        && lost.fetch_add(1, Ordering::SeqCst) < LOST_ANSWERS
    {
        let mut body = vec![0u8; len];
        c.read_exact(&mut body)?;
        faults.fetch_add(1, Ordering::SeqCst);
        return respond(&mut c, "409 Conflict", "ConditionalRequestConflict");
    }
    let lose_answer = mode == Mode::LoseAnswers as u8
        && is_pack_put
        && lost.fetch_add(1, Ordering::SeqCst) < LOST_ANSWERS;
    if mode == Mode::Forbidden as u8 || (mode == Mode::Flaky as u8 && matches!(n % 5, 1 | 3)) {
        let mut body = vec![0u8; len];
        c.read_exact(&mut body)?;
        faults.fetch_add(1, Ordering::SeqCst);
        return match (mode, n % 5) {
            (2, _) => respond(&mut c, "403 Forbidden", "AccessDenied"),
            (_, 1) => respond(&mut c, "503 Service Unavailable", "SlowDown"),
            _ => respond(&mut c, "500 Internal Server Error", "InternalError"),
        };
    }
    if mode == Mode::Flaky as u8 && n % 7 == 2 {
        // Reset mid-request: read a little and drop the connection.
        faults.fetch_add(1, Ordering::SeqCst);
        return c.shutdown(Shutdown::Both);
    }
    if mode == Mode::Flaky as u8 && n % 11 == 4 {
        faults.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));
    }
    // One request per connection, so that every request passes through the fault decision.
    let mut rewritten = String::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            continue;
        }
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        rewritten.push_str(line);
        rewritten.push_str("\r\n");
    }
    rewritten.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(rewritten.as_bytes())?;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    up.write_all(&body)?;
    fwd.fetch_add((head.len() + len) as u64, Ordering::SeqCst);
    if lose_answer {
        // The server has the whole request and answers; the client never hears of it.
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        faults.fetch_add(1, Ordering::SeqCst);
        return c.shutdown(Shutdown::Both);
    }
    std::io::copy(&mut up, &mut c)?;
    c.shutdown(Shutdown::Both)
}

/// A TCP relay on 127.0.0.1 that carries client-to-server bytes at most at `rate` bytes per
/// second (a slow uplink), and records when it received each piece from the client. Like a real
/// WAN link it advertises an Ethernet-sized segment (MSS 1400) and a small receive buffer, so the
/// client's kernel cannot hide a whole upload in loopback-sized socket buffers.
pub struct SlowProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// (time, bytes) of every read from a client.
    pub received: Arc<std::sync::Mutex<Vec<(Instant, usize)>>>,
}

impl SlowProxy {
    pub fn start(upstream: u16, rate: Option<u64>) -> Self {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.set_tcp_mss(1400).unwrap();
        sock.set_recv_buffer_size(16 << 10).unwrap();
        sock.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        sock.listen(64).unwrap();
        let l: TcpListener = sock.into();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Self {
            port,
            stop: Arc::new(AtomicBool::new(false)),
            received: Arc::default(),
        };
        let (stop, received) = (p.stop.clone(), p.received.clone());
        // One link for all connections: when the next byte may pass.
        let due = Arc::new(std::sync::Mutex::new(Instant::now()));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (received, due) = (received.clone(), due.clone());
                        std::thread::spawn(move || {
                            let _ = relay(c, upstream, rate, &received, &due);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        p
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bytes received from clients so far.
    pub fn total(&self) -> u64 {
        let r = self.received.lock().unwrap();
        r.iter().map(|(_, n)| *n as u64).sum()
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn relay(
    mut c: TcpStream,
    upstream: u16,
    rate: Option<u64>,
    received: &std::sync::Mutex<Vec<(Instant, usize)>>,
    due: &std::sync::Mutex<Instant>,
) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let (mut c2, mut up2) = (c.try_clone()?, up.try_clone()?);
    // Answers travel at full speed.
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let mut buf = [0u8; 4096];
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        received.lock().unwrap().push((Instant::now(), n));
        if up.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(r) = rate {
            // No credit for idle time: the link never goes faster than `rate`.
            let until = {
                let mut d = due.lock().unwrap();
                *d = (*d).max(Instant::now()) + Duration::from_secs_f64(n as f64 / r as f64);
                *d
            };
            if let Some(wait) = until.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = up.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
}

/// A client world whose repository is `s3://vault/<prefix>` at `endpoint`.
pub struct S3World {
    pub dir: tempfile::TempDir,
    pub location: String,
    pub endpoint: String,
    pub password_file: std::path::PathBuf,
}

impl S3World {
    pub fn new(endpoint: &str, prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, "correct horse battery staple\n").unwrap();
        Self {
            dir,
            location: format!("s3://{BUCKET}/{prefix}"),
            endpoint: endpoint.to_string(),
            password_file,
        }
    }

    pub fn path(&self, n: &str) -> std::path::PathBuf {
        self.dir.path().join(n)
    }

    /// The command with credentials in the environment and `cache` as the cache directory.
    pub fn cmd_in(&self, cache: &str, args: &[&str]) -> Command {
        let mut c = self.cmd_plain(cache, args);
        c.arg("--s3-allow-http");
        c
    }

    /// [`S3World::cmd_in`] without `--s3-allow-http` (nor `AWS_ALLOW_HTTP`).
    pub fn cmd_plain(&self, cache: &str, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .args(["--repo", &self.location, "--s3-endpoint", &self.endpoint])
            .arg("--cache-dir")
            .arg(self.dir.path().join(cache))
            .arg("--password-file")
            .arg(&self.password_file)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("BLOCKVAULT_S3_RETRY_TIMEOUT_SECS", "6")
            .env("BLOCKVAULT_S3_REQUEST_TIMEOUT_SECS", "10")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ALLOW_HTTP")
            .env_remove("BLOCKVAULT_PASSWORD")
            .env_remove("BLOCKVAULT_REPO")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self
            .cmd_in("cache", args)
            .output()
            .expect("running blockvault");
        assert_no_secret(&out);
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        crate::common::succeeded(args, self.run(args))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        crate::common::json_of(args, |a| self.ok(a))
    }

    pub fn init(&self) {
        self.ok(&[
            "repo",
            "init",
            "--chunk-size",
            "64KiB",
            "--kdf-memory-kib",
            "8192",
        ]);
    }

    pub fn backup_args(disk: &Path) -> Vec<String> {
        ["backup", "--vm", "vm1", "--pack-size", "1MiB", "--disk"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("d0={}", disk.display())])
            .collect()
    }
}

pub fn assert_no_secret(out: &Output) {
    for (what, s) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let s = String::from_utf8_lossy(s);
        assert!(
            !s.contains(SECRET_KEY),
            "the secret key appeared on {what}: {s}"
        );
    }
}
