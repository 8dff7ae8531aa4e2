//! Instant restore: a restore point served by `blockvault restore mount`, read by real NBD
//! clients, beside qemu-nbd serving the same disk as VHDX and nbdkit serving the raw image.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::disk::{run, Reference};
use crate::measure::{best_of, timed, Sample};

/// Random 4 KiB reads through libnbd's Python binding; prints p50 and p99 in microseconds (the
/// table shows them in the "wall s" column as microseconds).
const RANDOM_READS: &str = r#"
import nbd, random, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
size = h.get_size(); n = int(sys.argv[2]); rng = random.Random(7); lat = []
for _ in range(n):
    off = rng.randrange(size // 4096) * 4096
    t = time.perf_counter(); h.pread(4096, off); lat.append(time.perf_counter() - t)
lat.sort(); print(lat[n // 2] * 1e6, lat[n * 99 // 100] * 1e6)
"#;

const FIRST_BYTE: &str = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(4096, 0)
"#;

/// A server process, killed when dropped.
pub struct Served(Child);

impl Served {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the process to exit by itself (after a signal), at most `limit`.
    pub fn wait_exit(mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.0.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("process {} did not exit within {limit:?}", self.0.id())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_ready(uri: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let ok = Command::new("nbdinfo")
            .arg("--size")
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{uri} did not come up")
}

pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn nbdcopy(uri: &str) -> Command {
    let mut c = Command::new("nbdcopy");
    c.arg(uri).arg("null:");
    c
}

fn random_reads(uri: &str, n: usize, tool: &str) -> Result<Vec<Sample>> {
    let o = Command::new("/usr/bin/python3")
        .args(["-c", RANDOM_READS, uri, &n.to_string()])
        .output()?;
    if !o.status.success() {
        bail!(
            "random reads against {tool}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() != 2 {
        bail!("random reads printed {text:?}");
    }
    Ok(["p50", "p99"]
        .iter()
        .zip(v)
        .map(|(p, us)| Sample {
            work: format!("NBD 4k random read {p} (us)"),
            tool: tool.into(),
            wall_s: us,
            peak_rss_mib: 0.0,
            repo_bytes: None,
        })
        .collect())
}

pub fn run_all(r: &Reference, mount_cmd: impl Fn() -> Command, point: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let reads = 20_000;
    let cache = "256MiB";

    // blockvault: time to first byte, then whole-disk copy on a warm local repository.
    let t = Instant::now();
    let (uri, served) = mount(
        mount_cmd()
            .args(["restore", "mount", point, "--disk", "d"])
            .args(["--listen", "127.0.0.1:0", "--memory-cache", cache]),
    )?;
    let st = Command::new("/usr/bin/python3")
        .args(["-c", FIRST_BYTE, &uri])
        .status()?;
    if !st.success() {
        bail!("first read from {uri} failed");
    }
    out.push(Sample {
        work: "NBD mount to first byte".into(),
        tool: "blockvault".into(),
        wall_s: t.elapsed().as_secs_f64(),
        peak_rss_mib: 0.0,
        repo_bytes: None,
    });
    run(&mut nbdcopy(&uri))?; // warms the page cache under the repository
    let mut s = best_of(|_| {
        timed(
            "NBD nbdcopy whole disk",
            "blockvault",
            nbdcopy(&uri),
            None,
            None,
        )
    })?;
    out.extend(random_reads(&uri, reads, "blockvault")?);
    s.peak_rss_mib = peak_rss_mib(served.id());
    out.push(s);
    drop(served);

    // Memory against the cache bound: the same copy plus random reads under other bounds. The
    // peak minus the bound should stay flat (the fixed overhead).
    for bound in ["64MiB", "1GiB"] {
        let (uri, served) = mount(
            mount_cmd()
                .args(["restore", "mount", point, "--disk", "d"])
                .args(["--listen", "127.0.0.1:0", "--memory-cache", bound]),
        )?;
        let mut s = timed(
            &format!("NBD nbdcopy, memory cache {bound}"),
            "blockvault",
            nbdcopy(&uri),
            None,
            None,
        )?;
        random_reads(&uri, reads / 4, "blockvault")?;
        s.peak_rss_mib = peak_rss_mib(served.id());
        out.push(s);
    }

    // qemu-nbd serving the same disk as a dynamic VHDX.
    let vhdx = crate::vhdx::reference_vhdx(r)?;
    let port = free_port()?;
    let q = Served(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-t",
                "-f",
                "vhdx",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .arg(&vhdx)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    let quri = format!("nbd://127.0.0.1:{port}/");
    wait_ready(&quri)?;
    run(&mut nbdcopy(&quri))?;
    out.push(best_of(|_| {
        timed(
            "NBD nbdcopy whole disk",
            "qemu-nbd",
            nbdcopy(&quri),
            None,
            None,
        )
    })?);
    out.extend(random_reads(&quri, reads, "qemu-nbd")?);
    drop(q);

    // nbdkit serving the raw image: the transport's ceiling.
    let port = free_port()?;
    let k = Served(
        Command::new("nbdkit")
            .args([
                "-f",
                "-r",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "file",
            ])
            .arg(&r.raw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdkit")?,
    );
    let kuri = format!("nbd://127.0.0.1:{port}/");
    wait_ready(&kuri)?;
    run(&mut nbdcopy(&kuri))?;
    out.push(best_of(|_| {
        timed(
            "NBD nbdcopy whole disk",
            "nbdkit-file",
            nbdcopy(&kuri),
            None,
            None,
        )
    })?);
    drop(k);

    out.extend(over_unix_sockets(r, &vhdx, mount_cmd, point)?);
    Ok(out)
}

/// The same whole-disk copy over unix sockets, as a VM on the same host connects: the TCP
/// loopback stack costs both ends CPU that the two cores would otherwise spend decoding.
fn over_unix_sockets(
    r: &Reference,
    vhdx: &std::path::Path,
    mount_cmd: impl Fn() -> Command,
    point: &str,
) -> Result<Vec<Sample>> {
    const WORK: &str = "NBD nbdcopy, unix socket";
    let dir = tempfile::tempdir()?;
    let mut out = Vec::new();
    let copy = |uri: &str, tool: &str| -> Result<Sample> {
        run(&mut nbdcopy(uri))?; // warms the page cache under the data
        best_of(|_| timed(WORK, tool, nbdcopy(uri), None, None))
    };

    let sock = dir.path().join("blockvault.sock");
    let (uri, served) = mount(
        mount_cmd()
            .args([
                "restore",
                "mount",
                point,
                "--disk",
                "d",
                "--memory-cache",
                "256MiB",
            ])
            .arg("--socket")
            .arg(&sock),
    )?;
    let mut s = copy(&uri, "blockvault")?;
    s.peak_rss_mib = peak_rss_mib(served.id()); // the server's, as on TCP
    out.push(s);
    drop(served);

    let sock = dir.path().join("qemu-nbd.sock");
    let q = Served(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "vhdx", "-k"])
            .arg(&sock)
            .arg(vhdx)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    wait_ready(&uri)?;
    out.push(copy(&uri, "qemu-nbd")?);
    drop(q);

    let sock = dir.path().join("nbdkit.sock");
    let k = Served(
        Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(&r.raw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdkit")?,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    wait_ready(&uri)?;
    out.push(copy(&uri, "nbdkit-file")?);
    drop(k);
    Ok(out)
}

/// Starts `restore mount` (a command with its arguments) and waits for the URI it prints.
pub fn mount(cmd: &mut Command) -> Result<(String, Served)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting restore mount")?;
    let stdout = child.stdout.take().context("mount stdout")?;
    let served = Served(child);
    let mut uri = String::new();
    BufReader::new(stdout).read_line(&mut uri)?;
    let uri = uri.trim().to_owned();
    if uri.is_empty() {
        bail!("restore mount printed no URI");
    }
    Ok((uri, served))
}
