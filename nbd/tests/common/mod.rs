//! Helpers shared by the integration tests: an in-process server on loopback, a raw protocol
//! client for byte-level checks, instrumented devices, and real-client process runners.
#![allow(dead_code)]

pub mod raw;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use blockvault_nbd::{
    async_trait, BlockDevice, BlockSizes, DeviceError, Export, Extent, MemoryDevice, ReadSegment,
    Server, ServerConfig,
};
use bytes::Bytes;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A server running in this process until `stop` is called.
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), blockvault_nbd::Error>>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig, exports: Vec<Export>) -> TestServer {
        Self::start_secure(config, blockvault_nbd::Security::default(), exports).await
    }

    pub async fn start_secure(
        config: ServerConfig,
        security: blockvault_nbd::Security,
        exports: Vec<Export>,
    ) -> TestServer {
        let server = Server::with_security(config, security).expect("valid config");
        for e in exports {
            server.add_export(e).expect("valid export");
        }
        // A deep accept queue, so floods of connects reach the server instead of being dropped
        // by the kernel (the default backlog is 1024).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind loopback");
        let listener: TcpListener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve(listener, async {
                let _ = rx.await;
            })
            .await
        });
        TestServer {
            server,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.addr.port(), export)
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), blockvault_nbd::Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("server stopped in time")
            .expect("server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves on a unix socket in a fresh temporary directory.
pub struct UnixTestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), blockvault_nbd::Error>>,
}

impl UnixTestServer {
    pub async fn start(server: Server) -> UnixTestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
        });
        UnixTestServer {
            dir,
            path,
            stop: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) -> Result<(), blockvault_nbd::Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap()
    }
}

pub fn export(name: &str, dev: Arc<dyn BlockDevice>) -> Export {
    Export::new(name, dev)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A device with data in some ranges and holes elsewhere; returns it with its data ranges.
pub fn sparse_device(size: u64, read_only: bool) -> (Arc<MemoryDevice>, Vec<(u64, u64)>) {
    let dev = MemoryDevice::new(size).with_read_only(read_only);
    let ranges = vec![
        (0, 64 * KIB),
        (MIB, 12 * KIB),
        (3 * MIB + 4 * KIB, 200 * KIB),
    ];
    for (i, &(off, len)) in ranges.iter().enumerate() {
        dev.write_at(off, &pattern(len as usize, i as u64 + 1));
    }
    (Arc::new(dev), ranges)
}

/// Fails the test with an install hint when a client tool is missing: these tests must run.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{tool}` is not installed; these tests need it: apt-get install {package}");
}

pub fn require_python_nbd() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    assert!(
        python.is_file(),
        "/usr/bin/python3 is missing; apt-get install python3 python3-libnbd"
    );
    let ok = std::process::Command::new(&python)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python module `nbd` is missing: apt-get install python3-libnbd"
    );
    python
}

/// Runs a client process with a time limit and returns its output.
pub async fn run(cmd: &mut tokio::process::Command) -> Output {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let desc = format!("{cmd:?}");
    let fut = cmd.output();
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{desc} timed out"))
        .unwrap_or_else(|e| panic!("{desc} failed to start: {e}"))
}

/// Like `run` but fails the test unless the process exits successfully; returns stdout.
pub async fn run_ok(cmd: &mut tokio::process::Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

static PANIC_HOOK: Once = Once::new();
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics in server tasks, which tokio would otherwise swallow. Only runtime worker
/// threads count: a test's own assertions run on the test thread and must not make a parallel
/// test in the same binary fail.
pub fn count_panics() {
    PANIC_HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread
                .name()
                .is_some_and(|n| n.starts_with("tokio-runtime-worker"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
}

pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Wraps a memory device to observe and steer what the server does: operations on gated
/// offsets wait until the gate opens, events are logged in order, concurrency is measured.
pub struct ProbeDevice {
    pub inner: MemoryDevice,
    gated: Mutex<HashSet<u64>>,
    gate: watch::Sender<bool>,
    pub events: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub panic_offset: Option<u64>,
    pub fast_zero: bool,
}

impl ProbeDevice {
    pub fn new(inner: MemoryDevice) -> ProbeDevice {
        ProbeDevice {
            inner,
            gated: Mutex::new(HashSet::new()),
            gate: watch::channel(false).0,
            events: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            panic_offset: None,
            fast_zero: true,
        }
    }

    pub fn gate_offset(&self, offset: u64) {
        self.gated.lock().unwrap().insert(offset);
    }

    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    fn log(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }

    async fn enter(&self, what: &str, offset: u64) {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(n, Ordering::SeqCst);
        self.log(format!("{what}-start {offset}"));
        if self.panic_offset == Some(offset) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            panic!("probe device asked to panic at {offset}");
        }
        if self.gated.lock().unwrap().contains(&offset) {
            let mut rx = self.gate.subscribe();
            let _ = rx.wait_for(|open| *open).await;
        }
    }

    fn leave(&self, what: &str, offset: u64) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.log(format!("{what}-end {offset}"));
    }
}

#[async_trait]
impl BlockDevice for ProbeDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn supports_trim(&self) -> bool {
        self.inner.supports_trim()
    }
    fn supports_fast_zero(&self) -> bool {
        self.fast_zero
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        self.enter("read", offset).await;
        let r = self.inner.read(offset, len).await;
        self.leave("read", offset);
        r
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.enter(if fua { "write-fua" } else { "write" }, offset)
            .await;
        let r = self.inner.write(offset, data, fua).await;
        self.leave(if fua { "write-fua" } else { "write" }, offset);
        r
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError> {
        self.enter("zero", offset).await;
        let r = self.inner.write_zeroes(offset, len, fua, may_trim).await;
        self.leave("zero", offset);
        r
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.log(format!("trim {offset}"));
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.log("flush".into());
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.inner.block_status(offset, len).await
    }
}

/// Polls `cond` until it holds or five seconds pass.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A memory device with 4 KiB blocks that fails (and counts) any request breaking its
/// constraints, so a test sees whether the server ever passes one through.
pub struct StrictDevice {
    pub inner: MemoryDevice,
    pub sizes: BlockSizes,
    pub violations: AtomicUsize,
}

impl StrictDevice {
    pub fn new(inner: MemoryDevice, sizes: BlockSizes) -> StrictDevice {
        StrictDevice {
            inner,
            sizes,
            violations: AtomicUsize::new(0),
        }
    }

    fn check(&self, what: &str, offset: u64, len: u64, payload: bool) -> Result<(), DeviceError> {
        let min = u64::from(self.sizes.minimum);
        let end = offset + len;
        let bad = !offset.is_multiple_of(min)
            || (!end.is_multiple_of(min) && end != self.inner.size())
            || (payload && len > u64::from(self.sizes.maximum));
        if bad {
            self.violations.fetch_add(1, Ordering::SeqCst);
            return Err(DeviceError::invalid(format!(
                "{what} {offset}+{len} breaks the device constraints"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for StrictDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }
    fn supports_trim(&self) -> bool {
        true
    }
    fn supports_fast_zero(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        self.check("read", offset, u64::from(len), true)?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.check("write", offset, data.len() as u64, true)?;
        // Widen the window in which a read-modify-write could be undone by another.
        tokio::task::yield_now().await;
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError> {
        self.check("zero", offset, u64::from(len), false)?;
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.check("trim", offset, u64::from(len), false)?;
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.check("status", offset, 0, false)?;
        self.inner.block_status(offset, len).await
    }
}
