//! A real Linux guest boots from `restore mount` under `qemu-system-x86_64` (TCG: no KVM needed):
//! a BIOS disk with a Debian kernel, an initramfs and an ext4 root (built without root or mounts
//! by `tests/vm/make-boot-disk.sh`) is backed up, served writable, booted to a marker on the serial
//! console, and the guest writes a file and powers off. Then the overlay holds the write, a
//! hydration of the same mount equals the point plus the overlay (computed here from the overlay's
//! documented on-disk format, not by blockvault), and the hydrated file boots on its own and shows
//! the file. The same runs against an S3 server with a cold cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::mount::{compare, copy_raw, require, Mount};
use crate::s3_support::{S3Server, S3World};

const MIB: u64 = 1 << 20;
/// The root partition of the test disk (make-boot-disk.sh): 32 MiB at 33 MiB.
const ROOT_PART: std::ops::Range<u64> = 33 * MIB..65 * MIB;
/// A TCG boot of the test disk takes under 10 s on an idle machine; a loaded CI host is slower.
const BOOT_LIMIT: Duration = Duration::from_secs(150);

/// The boot disk, built once per test run (the kernel package is cached under ~/.cache).
fn boot_image() -> &'static Path {
    static IMG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &IMG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("boot.img");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vm/make-boot-disk.sh");
        let o = Command::new("bash")
            .arg(script)
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .expect("running make-boot-disk.sh");
        assert!(
            o.status.success(),
            "building the boot disk failed (scripts/install-deps.sh installs what it needs):\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        (dir, img)
    })
    .1
}

/// Boots `drive` (a file or an NBD URI) until the guest powers off; returns the serial console.
pub(crate) fn boot(drive: &str, log: &Path) -> String {
    require("qemu-system-x86_64");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "256", "-nographic"])
        .args(["-no-reboot", "-monitor", "none", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=virtio"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = qemu.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > BOOT_LIMIT {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "the guest did not power off within {BOOT_LIMIT:?}; console:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = std::fs::read_to_string(log).unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(
        status.success(),
        "qemu failed ({status}): {err}\nconsole:\n{console}"
    );
    assert!(
        console.contains("BV-BOOT-MARKER") && console.contains("BV-POWEROFF"),
        "the guest did not boot to its marker:\n{console}"
    );
    console
}

/// `image` with the overlay in `dir` applied, read straight from the overlay's files as
/// docs/OPERATIONS.md describes them (4 KiB header, one state byte per 4 KiB block).
fn with_overlay(image: &Path, dir: &Path, disk: &str) -> (Vec<u8>, Vec<u64>) {
    let mut out = std::fs::read(image).unwrap();
    let map = std::fs::read(dir.join(format!("{disk}.map"))).unwrap();
    let data = std::fs::read(dir.join(format!("{disk}.data"))).unwrap();
    assert_eq!(&map[..8], b"BVOVMAP1");
    let mut changed = Vec::new();
    for (b, st) in map[4096..].iter().enumerate() {
        let r = b * 4096..(b + 1) * 4096;
        match st {
            0 => continue,
            1 => out[r.clone()].copy_from_slice(&data[r]),
            2 => out[r].fill(0),
            s => panic!("block {b} has state {s}"),
        }
        changed.push(b as u64 * 4096);
    }
    (out, changed)
}

/// The status of the one running mount.
fn session(cmd: &dyn Fn(&[&str]) -> Command) -> serde_json::Value {
    let o = cmd(&["restore", "sessions", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v[0].clone()
}

/// The whole scenario against a repository reached through `cmd`, with scratch space in `dir`.
fn boot_write_hydrate_boot(cmd: &dyn Fn(&[&str]) -> Command, dir: &Path, point: &str) {
    let image = boot_image();
    let ov = dir.join("overlay");
    let hyd = dir.join("sys.raw");
    let writable = [
        point,
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--writable",
        "--overlay",
        ov.to_str().unwrap(),
    ];
    let mount = |extra: &[&str], log: &str| {
        let mut args = vec!["restore", "mount"];
        args.extend_from_slice(&writable);
        args.extend_from_slice(extra);
        Mount::spawn(cmd(&args), dir.join(log), 1)
    };

    // First boot, from the backup: the guest writes /guest-note and powers off.
    let mut m = mount(&[], "mount1.log");
    let console = boot(&m.uris[0], &dir.join("console1.log"));
    assert!(console.contains("BV-WROTE"), "{console}");
    assert!(m.sigterm(), "log:\n{}", m.log());

    // That first mount of the point recorded its boot trace.
    let shown: serde_json::Value = serde_json::from_slice(
        &cmd(&["points", "show", point, "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let traced = shown["boot_trace"]["disks"][0]["chunks"]
        .as_u64()
        .unwrap_or(0);
    assert!(traced > 0, "no boot trace after the first boot: {shown}");

    // The overlay holds the guest's write, inside the root partition only.
    let (expect, changed) = with_overlay(image, &ov, "sys");
    assert!(!changed.is_empty(), "the overlay holds no write");
    assert!(
        changed.iter().all(|o| ROOT_PART.contains(o)),
        "the overlay holds blocks outside the root partition: {changed:?}"
    );

    // Hydration of the same disk: complete, the overlay merged in, served from the file. The
    // boot trace is replayed meanwhile.
    let mut m = mount(
        &["--hydrate-to", hyd.to_str().unwrap(), "--prefetch-boot"],
        "mount2.log",
    );
    let t = Instant::now();
    loop {
        let s = session(cmd);
        let d = &s["disks"][0];
        assert!(d["hydration"]["error"].is_null(), "{s}");
        let prefetched = d["boot_prefetch"]["chunks"].as_u64();
        if d["hydration"]["complete"] == true && !d["local_file"].is_null() && prefetched.is_some()
        {
            assert_eq!(prefetched, Some(traced), "{s}");
            assert_eq!(d["local_file"], hyd.to_str().unwrap(), "{s}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "hydration stalled: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expect_file = dir.join("expect.raw");
    std::fs::write(&expect_file, &expect).unwrap();
    compare(&expect_file, &hyd);
    // What the mount serves now is the file.
    let served = dir.join("served.raw");
    copy_raw(&m.uris[0], served.to_str().unwrap());
    compare(&expect_file, &served);
    assert!(m.sigterm(), "log:\n{}", m.log());
    compare(&expect_file, &hyd);

    // The hydrated file boots on its own and the guest finds its file.
    let console = boot(hyd.to_str().unwrap(), &dir.join("console2.log"));
    assert!(
        console.contains("BV-FOUND written by the guest"),
        "{console}"
    );

    // A later mount with the same overlay serves the hydrated file, second boot's changes included.
    let mut m = mount(&["--hydrate-to", hyd.to_str().unwrap()], "mount3.log");
    copy_raw(&m.uris[0], served.to_str().unwrap());
    compare(&hyd, &served);
    assert!(m.sigterm(), "log:\n{}", m.log());
    assert!(
        m.log().contains("serving the hydrated file"),
        "log:\n{}",
        m.log()
    );
}

/// A later point of the same VM replays its predecessor's boot trace.
fn successor_prefetches(cmd: &dyn Fn(&[&str]) -> Command, dir: &Path, first: &str, later: &str) {
    assert_ne!(first, later);
    let mut m = Mount::spawn(
        cmd(&[
            "restore",
            "mount",
            later,
            "--disk",
            "sys",
            "--listen",
            "127.0.0.1:0",
            "--prefetch-boot",
        ]),
        dir.join("mount-successor.log"),
        1,
    );
    let t = Instant::now();
    loop {
        let s = session(cmd);
        if let Some(n) = s["disks"][0]["boot_prefetch"]["chunks"].as_u64() {
            assert!(n > 0, "{s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no prefetch: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(m.sigterm(), "log:\n{}", m.log());
    assert!(
        m.log().contains(&format!(
            "prefetching the boot trace recorded on point {first}"
        )),
        "log:\n{}",
        m.log()
    );
}

#[test]
fn a_linux_guest_boots_from_the_mount_and_again_from_its_hydrated_file() {
    let w = World::with_repo("64KiB");
    let img = w.path("vm.raw");
    std::fs::copy(boot_image(), &img).unwrap();
    let point = w.backup("vm", &[("sys", &img)])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = w.path("run");
    std::fs::create_dir_all(&dir).unwrap();
    boot_write_hydrate_boot(&|args| w.cmd(args), &dir, &point);
    let later = w.backup("vm", &[("sys", &dir.join("sys.raw"))])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    successor_prefetches(&|args| w.cmd(args), &dir, &point, &later);
    // Forgetting the traced point deletes its trace too.
    let trace = w.repo.join("boot-traces").join(&point);
    assert!(trace.exists(), "no trace object at {}", trace.display());
    w.ok(&["forget", &point]);
    assert!(
        !trace.exists(),
        "forget left the boot trace of the point it removed"
    );
}

#[test]
fn a_linux_guest_boots_from_an_s3_repository_with_a_cold_cache() {
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "boot");
    w.init();
    let img = w.path("vm.raw");
    std::fs::copy(boot_image(), &img).unwrap();
    let point = w.json(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("sys={}", img.display()),
    ])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = w.path("run");
    std::fs::create_dir_all(&dir).unwrap();
    // A cache directory no command has used: no index, no cached blobs.
    boot_write_hydrate_boot(&|args| w.cmd_in("cold", args), &dir, &point);
}
