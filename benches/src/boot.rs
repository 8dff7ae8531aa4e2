//! Boot to the console marker: the test guest of `tests/vm/make-boot-disk.sh` (a Debian kernel, an
//! initramfs and an ext4 root) under qemu-system-x86_64 with TCG, from `restore mount` of a local
//! repository, from an S3 repository (moto) with a cold cache, and the same with the boot trace
//! the first S3 boot recorded, beside booting the local raw file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::disk::run;
use crate::measure::{Sample, PASSWORD};
use crate::s3::{Server, ServerKind, ACCESS_KEY, BUCKET, SECRET_KEY};
use crate::Args;

const MARKER: &str = "BV-BOOT-MARKER";

/// Boots `drive` and returns the seconds until the marker appeared on the serial console (the
/// guest then powers off; that is waited for but not timed).
fn boot_to_marker(drive: &str, console: &Path) -> Result<f64> {
    let _ = std::fs::remove_file(console);
    let t = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "256", "-nographic"])
        .args(["-no-reboot", "-monitor", "none", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=virtio"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut marked = None;
    loop {
        if marked.is_none() && std::fs::read_to_string(console).is_ok_and(|c| c.contains(MARKER)) {
            marked = Some(t.elapsed().as_secs_f64());
        }
        if let Some(st) = qemu.try_wait()? {
            if !st.success() {
                bail!("qemu failed ({st}) booting {drive}");
            }
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!("the guest did not power off within 300 s booting {drive}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    marked.with_context(|| format!("no {MARKER} on the console booting {drive}"))
}

fn sample(work: &str, tool: &str, secs: f64) -> Sample {
    Sample {
        work: work.into(),
        tool: tool.into(),
        wall_s: secs,
        peak_rss_mib: 0.0,
        repo_bytes: None,
    }
}

fn image(work: &Path) -> Result<PathBuf> {
    let img = work.join("boot.img");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vm/make-boot-disk.sh");
    run(Command::new("bash").arg(script).arg(&img))?;
    Ok(img)
}

/// Boots from a mount started by `mount` (a `restore mount` command without the listener).
fn boot_from_mount(mut mount: Command, overlay: &Path, console: &Path) -> Result<f64> {
    let _ = std::fs::remove_dir_all(overlay);
    let (uri, served) = crate::nbd::mount(
        mount
            .args(["--listen", "127.0.0.1:0", "--writable", "--overlay"])
            .arg(overlay),
    )?;
    let secs = boot_to_marker(&uri, console)?;
    // SIGTERM, so the first mount stores its boot trace.
    run(Command::new("kill")
        .arg("-TERM")
        .arg(served.id().to_string()))?;
    served.wait_exit(Duration::from_secs(60))?;
    Ok(secs)
}

pub fn run_all(args: &Args, repo: &Path, cache: &Path) -> Result<Vec<Sample>> {
    let work = args.workdir.join("boot");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let img = image(&work)?;
    let mut out = Vec::new();

    // The local raw file (a copy: the guest writes to it).
    let copy = work.join("local.raw");
    std::fs::copy(&img, &copy)?;
    out.push(sample(
        "boot to marker",
        "local raw file",
        boot_to_marker(
            copy.to_str().context("path")?,
            &work.join("console-local.log"),
        )?,
    ));

    // A local repository (the benchmark's own).
    let bv = || {
        let mut c = Command::new(&args.blockvault);
        c.env("BLOCKVAULT_REPO", repo)
            .env("BLOCKVAULT_CACHE_DIR", cache)
            .env("BLOCKVAULT_PASSWORD", PASSWORD)
            .arg("--quiet");
        c
    };
    let point = backup(bv(), &img)?;
    let mut m = bv();
    m.args(["restore", "mount", &point, "--disk", "sys"]);
    out.push(sample(
        "boot to marker, mount",
        "blockvault",
        boot_from_mount(m, &work.join("ov-local"), &work.join("console-mount.log"))?,
    ));

    // S3 (moto), each boot with a cache directory no command has used.
    let server = Server::start(ServerKind::Moto, &work)?;
    let s3 = |cache: &Path| {
        let mut c = Command::new(&args.blockvault);
        c.env("BLOCKVAULT_REPO", format!("s3://{BUCKET}/boot"))
            .env("BLOCKVAULT_CACHE_DIR", cache)
            .env("BLOCKVAULT_PASSWORD", PASSWORD)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_ENDPOINT_URL")
            .args(["--quiet", "--s3-allow-http", "--s3-endpoint"])
            .arg(format!("http://127.0.0.1:{}", server.port));
        c
    };
    let warm = work.join("cache-backup");
    run(s3(&warm).args(["repo", "init"]))?;
    let point = backup(s3(&warm), &img)?;
    for (work_name, cache_name, extra) in [
        ("boot to marker, mount, S3 cold", "cache-cold", None),
        (
            "boot to marker, mount, S3 cold, boot trace",
            "cache-cold-trace",
            Some("--prefetch-boot"),
        ),
    ] {
        let mut m = s3(&work.join(cache_name));
        m.args(["restore", "mount", &point, "--disk", "sys"]);
        m.args(extra);
        let secs = boot_from_mount(
            m,
            &work.join(format!("ov-{cache_name}")),
            &work.join(format!("console-{cache_name}.log")),
        )?;
        out.push(sample(work_name, "blockvault", secs));
    }
    drop(server);
    Ok(out)
}

fn backup(mut c: Command, img: &Path) -> Result<String> {
    let o = c
        .args(["backup", "--json", "--vm", "bootvm", "--disk"])
        .arg(format!("sys={}", img.display()))
        .output()?;
    if !o.status.success() {
        bail!(
            "backup of the boot disk: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    v["point"]
        .as_str()
        .map(str::to_string)
        .context("backup --json printed no point")
}
