//! `restore mount`: real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against the served
//! restore point, the writable overlay, hydration, sessions and unmount.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

const CHUNK: u64 = 64 << 10;

pub(crate) fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is needed by the mount tests; install it with scripts/install-deps.sh \
         (Debian packages qemu-utils, libnbd-bin, python3-libnbd, nbdkit)"
    );
}

/// A running `restore mount`, killed by pid when dropped (also when a test fails).
pub(crate) struct Mount {
    child: Option<Child>,
    pub(crate) uris: Vec<String>,
    stderr: PathBuf,
}

impl Mount {
    pub(crate) fn start(w: &World, args: &[&str], disks: usize) -> Mount {
        let stderr = w.path(&format!("mount-{}.log", rand::random::<u32>()));
        let mut all = vec!["restore", "mount"];
        all.extend_from_slice(args);
        Mount::spawn(w.cmd(&all), stderr, disks)
    }

    /// Starts `cmd` (a complete `restore mount` command line) and waits for its URIs.
    pub(crate) fn spawn(mut cmd: Command, stderr: PathBuf, disks: usize) -> Mount {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning blockvault restore mount");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut m = Mount {
            child: Some(child),
            uris: Vec::new(),
            stderr,
        };
        while m.uris.len() < disks {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => m.uris.push(l),
                Err(_) => panic!("mount printed no URI; log:\n{}", m.log()),
            }
        }
        m
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to end by itself; returns whether it exited successfully.
    pub(crate) fn wait(&mut self, limit: Duration) -> bool {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.success();
            }
            if t.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                panic!("mount did not stop within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `secs` seconds for `cond`; fails saying `what` went wrong, with the log.
    pub(crate) fn wait_until(&self, what: &str, secs: u64, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn sigterm(&mut self) -> bool {
        let st = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    require(cmd);
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

pub(crate) fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads a whole served disk into a raw file with `qemu-img convert`.
pub(crate) fn copy_raw(uri: &str, out: &str) {
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, out]);
}

pub(crate) fn compare(a: &Path, b: &Path) {
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

/// An 8 MiB image backed up as one point of 64 KiB chunks; returns (world, image, point).
pub(crate) fn setup(seed: u64) -> (World, PathBuf, String) {
    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    make_image(&img, 8 << 20, seed, 6);
    let p = w.backup("vm", &[("sys", &img)]);
    let point = p["point"].as_str().unwrap().to_owned();
    (w, img, point)
}

/// An image of random bytes backed up as one point of 64 KiB chunks; returns (world, image,
/// point).
fn random_point(size: u64, seed: u64) -> (World, PathBuf, String) {
    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    make_random_image(&img, size, seed);
    let p = w.backup("vm", &[("sys", &img)]);
    let point = p["point"].as_str().unwrap().to_owned();
    (w, img, point)
}

fn sessions(w: &World) -> serde_json::Value {
    w.json(&["restore", "sessions"])
}

#[test]
fn read_only_mount_serves_the_point_to_real_clients() {
    let (w, img, point) = setup(41);
    let mut m = Mount::start(&w, &[&point, "--disk", "sys", "--listen", "127.0.0.1:0"], 1);
    let uri = m.uris[0].clone();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/sys"),
        "{uri}"
    );

    // qemu: whole-disk copy and compare against the original image.
    let out = w.path("out.raw");
    copy_raw(&uri, out.to_str().unwrap());
    compare(&img, &out);

    // libnbd: four connections at once (the export advertises multi-conn).
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("is_read_only: true"), "{info}");
    let out2 = w.path("out2.raw");
    ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &uri,
            out2.to_str().unwrap(),
        ],
    );
    compare(&img, &out2);

    // Block status: holes exactly where the point has zero chunks.
    let data = std::fs::read(&img).unwrap();
    let mut expected: Vec<(u64, u64, bool)> = Vec::new();
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        let zero = c.iter().all(|b| *b == 0);
        match expected.last_mut() {
            Some(e) if e.2 == zero => e.1 += c.len() as u64,
            _ => expected.push((i as u64 * CHUNK, c.len() as u64, zero)),
        }
    }
    assert!(expected.iter().any(|e| e.2) && expected.iter().any(|e| !e.2));
    let map = ok("nbdinfo", &["--map", &uri]);
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for e in map.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            match f[2] {
                "3" => true,
                "0" => false,
                t => panic!("unexpected extent type {t} in {l}"),
            },
        )
    }) {
        // Extents may arrive split across replies; compare the merged runs.
        match got.last_mut() {
            Some(g) if g.2 == e.2 && g.0 + g.1 == e.0 => g.1 += e.1,
            _ => got.push(e),
        }
    }
    assert_eq!(got, expected, "nbdinfo --map:\n{map}");

    // A write to a read-only mount is refused with EPERM by the server (libnbd's own checks are
    // off so the request really goes out) and the mount keeps serving.
    let script =
        "import nbd, sys\nh = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])\n\
                  try:\n    h.pwrite(b'x' * 4096, 0); print('written')\n\
                  except nbd.Error as e:\n    print('errno', e.errno)\n";
    let o = ok("/usr/bin/python3", &["-c", script, &uri]);
    assert_eq!(o.trim(), "errno EPERM");
    let again = w.path("again.raw");
    copy_raw(&uri, again.to_str().unwrap());
    compare(&img, &again);

    // Sessions list the mount with what it served; unmount stops it cleanly.
    // The status file is refreshed every second.
    let t = Instant::now();
    let s = loop {
        let s = sessions(&w);
        if s[0]["bytes_served"].as_u64().unwrap_or(0) > 0 || t.elapsed() > Duration::from_secs(5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let list = s.as_array().unwrap();
    assert_eq!(list.len(), 1, "{s}");
    assert!(list[0]["total_connections"].as_u64().unwrap() >= 4, "{s}");
    assert_eq!(list[0]["point"], point.as_str());
    assert_eq!(list[0]["disks"][0]["uri"], uri.as_str());
    assert_eq!(list[0]["pid"], m.pid());
    assert!(list[0]["bytes_served"].as_u64().unwrap() > 0, "{s}");
    let session = list[0]["session"].as_str().unwrap().to_owned();
    w.ok(&["restore", "unmount", &session]);
    assert!(m.wait(Duration::from_secs(10)), "log:\n{}", m.log());
    assert_eq!(sessions(&w), serde_json::json!([]));
    let o = run("nbdinfo", &[&uri]);
    assert!(!o.status.success(), "the mount still answers after unmount");
}

#[test]
fn writable_overlay_is_shared_and_survives_a_restart() {
    let (w, img, point) = setup(42);
    let overlay = w.path("overlay");
    let ov = overlay.to_str().unwrap();
    let args = [
        &point,
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--writable",
        "--overlay",
        ov,
    ];
    let mut m = Mount::start(&w, &args, 1);
    let uri = m.uris[0].clone();
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000k 72k",
            "-c",
            "write -z 3m 128k",
            "-c",
            "write -P 0x5c 8188k 4k",
            "-c",
            "flush",
            &uri,
        ],
    );
    // The same data through a second, independent connection.
    let check = |uri: &str| {
        let out = ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0xab 1000k 72k",
                "-c",
                "read -P 0 3m 128k",
                "-c",
                "read -P 0x5c 8188k 4k",
                uri,
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    };
    check(&uri);
    // The whole disk equals the original with the same writes applied.
    let expect = w.path("expect.raw");
    std::fs::copy(&img, &expect).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .unwrap();
    f.write_all_at(&vec![0xab; 72 << 10], 1000 << 10).unwrap();
    f.write_all_at(&vec![0; 128 << 10], 3 << 20).unwrap();
    f.write_all_at(&vec![0x5c; 4 << 10], 8188 << 10).unwrap();
    let out = w.path("out.raw");
    copy_raw(&uri, out.to_str().unwrap());
    compare(&expect, &out);
    assert!(m.sigterm(), "log:\n{}", m.log());

    // Same overlay, new process: every flushed write is still there.
    let m2 = Mount::start(&w, &args, 1);
    check(&m2.uris[0]);
    // A second mount of the overlay in use is refused: each would flush its own map over the
    // other's.
    let mut again = vec!["restore", "mount"];
    again.extend_from_slice(&args);
    let o = w.run(&again);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by another process"),
        "{}",
        stderr(&o)
    );
    let out2 = w.path("out2.raw");
    copy_raw(&m2.uris[0], out2.to_str().unwrap());
    compare(&expect, &out2);
    // A flushed write survives SIGKILL of the mount.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3e 5m 8k",
            "-c",
            "flush",
            &m2.uris[0],
        ],
    );
    let killed = m2.pid();
    drop(m2); // SIGKILL: no chance to clean up
    let stale = w.cache.join("sessions").join(format!("{killed}.json"));
    assert!(
        stale.exists(),
        "a killed mount leaves its status file behind"
    );
    assert_eq!(
        sessions(&w),
        serde_json::json!([]),
        "stale sessions are ignored"
    );
    assert!(!stale.exists(), "and cleaned up");
    let m3 = Mount::start(&w, &args, 1);
    let out = ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3e 5m 8k", &m3.uris[0]],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(m3);

    // An overlay belongs to one restore point: another point is refused by name.
    make_image(&img, 8 << 20, 43, 3);
    let other = w.backup("vm", &[("sys", &img)])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = w.run(&[
        "restore",
        "mount",
        &other,
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--writable",
        "--overlay",
        ov,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("belongs to restore point"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn two_disks_over_a_unix_socket() {
    let w = World::with_repo("64KiB");
    let (a, b) = (w.path("a.raw"), w.path("b.raw"));
    make_image(&a, 4 << 20, 51, 4);
    make_image(&b, 6 << 20, 52, 4);
    let point = w.backup("vm", &[("sys", &a), ("data", &b)])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let sock = w.path("nbd.sock");
    let mut m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--disk",
            "data",
            "--socket",
            sock.to_str().unwrap(),
        ],
        2,
    );
    assert_eq!(
        m.uris[0],
        format!("nbd+unix:///sys?socket={}", sock.display())
    );
    for (uri, img) in [(&m.uris[0], &a), (&m.uris[1], &b)] {
        let out = w.path("out.raw");
        copy_raw(uri, out.to_str().unwrap());
        compare(img, &out);
    }
    let s = sessions(&w);
    assert_eq!(s[0]["disks"].as_array().unwrap().len(), 2, "{s}");
    assert!(m.sigterm(), "log:\n{}", m.log());
    assert!(!sock.exists(), "the socket is removed at exit");
    assert_eq!(sessions(&w), serde_json::json!([]));
}

#[test]
fn hydration_merges_the_overlay_and_takes_later_writes_durably() {
    let (w, img, point) = random_point(8 << 20, 61);
    let hyd = w.path("hydrated.raw");
    let overlay = w.path("ov");
    let args = hydrating_args(&point, &overlay, &hyd);
    // Slowed to 2 MiB/s (4 s for the disk) so the first writes land while it runs.
    let m = Mount::start(
        &w,
        &[&args[..], &["--limit-download", "2MiB/s"]].concat(),
        1,
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 2m 64k",
            "-c",
            "write -z 5m 8k",
            "-c",
            "flush",
            &m.uris[0],
        ],
    );
    let s = sessions(&w);
    assert_eq!(
        s[0]["disks"][0]["hydration"]["complete"], false,
        "hydration finished before the first writes: {s}"
    );
    assert!(s[0]["disks"][0]["local_file"].is_null(), "{s}");
    let t = Instant::now();
    loop {
        let s = sessions(&w);
        let d = &s[0]["disks"][0];
        assert!(d["hydration"]["error"].is_null(), "{s}");
        if d["hydration"]["complete"] == true {
            assert_eq!(d["hydration"]["bytes_done"], d["hydration"]["bytes_total"]);
            assert_eq!(d["local_file"], hyd.to_str().unwrap(), "{s}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration stalled: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once complete, the file is the point plus the guest's writes, while the mount runs.
    let expect = w.path("expect.raw");
    std::fs::copy(&img, &expect).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .unwrap();
    f.write_all_at(&vec![0x77; 64 << 10], 2 << 20).unwrap();
    f.write_all_at(&vec![0; 8 << 10], 5 << 20).unwrap();
    compare(&expect, &hyd);
    assert!(w.path("ov/sys.local").exists(), "no merge record");

    // Later writes go to the file itself; a flushed one survives SIGKILL of the mount.
    guest_writes(&m.uris[0], "write -P 0x3e 6m 12k");
    f.write_all_at(&vec![0x3e; 12 << 10], 6 << 20).unwrap();
    // A trim gives the file's space back (a guest's fstrim must not fill the host), and reads
    // as zeroes; zeroes written with NO_HOLE stay allocated.
    let before = allocated_bytes(&hyd);
    guest_writes(&m.uris[0], "discard 3m 1m");
    assert!(
        allocated_bytes(&hyd) + (1 << 20) <= before,
        "trim left {} of {before} bytes allocated",
        allocated_bytes(&hyd)
    );
    f.write_all_at(&vec![0; 1 << 20], 3 << 20).unwrap();
    let before = allocated_bytes(&hyd);
    guest_writes(&m.uris[0], "write -z 4m 256k");
    assert!(allocated_bytes(&hyd) + (256 << 10) > before);
    f.write_all_at(&vec![0; 256 << 10], 4 << 20).unwrap();
    compare(&expect, &hyd);
    let killed = m.pid();
    drop(m); // SIGKILL
    assert!(!hyd.with_extension("raw.part").exists());
    compare(&expect, &hyd);

    // Mounting again serves the hydrated file (the overlay is history now).
    let m = Mount::start(&w, &args, 1);
    assert_ne!(m.pid(), killed);
    let out = w.path("out.raw");
    copy_raw(&m.uris[0], out.to_str().unwrap());
    compare(&expect, &out);
    drop(m);

    // A hydration target that exists without a merge record is never overwritten.
    let o = w.run(&[
        "restore",
        "mount",
        &point,
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--hydrate-to",
        hyd.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    compare(&expect, &hyd);
}

/// A mount killed after it recorded that the overlay was merged into the hydrated file and before
/// it renamed `FILE.part` to `FILE`: mounting again finishes the rename and serves the file, which
/// holds the point and the guest's writes.
#[test]
fn a_mount_killed_right_after_the_merge_record_serves_the_merged_file() {
    let (w, img, point) = random_point(8 << 20, 67);
    let hyd = w.path("hydrated.raw");
    let part = w.path("hydrated.raw.part");
    let ov = w.path("ov");
    let m = hydrating_mount_held_at(&w, &point, &ov, &hyd, "hydration-merged");
    guest_writes(&m.uris[0], "write -P 0x5a 1m 64k");
    wait_for(&w.path("hold.reached"), &m);
    assert!(w.path("ov/sys.local").exists(), "no merge record");
    assert!(
        hyd.exists() && part.exists(),
        "the part name was removed before the hold"
    );
    drop(m); // SIGKILL between the merge record and the removal of the part name

    let expect = image_with(&w, &img, &[(0x5a, 1 << 20)]);
    let m = Mount::start(&w, &hydrating_args(&point, &ov, &hyd), 1);
    assert!(
        m.log().contains("serving the hydrated file"),
        "log:\n{}",
        m.log()
    );
    assert!(hyd.exists() && !part.exists(), "the part name stayed");
    assert!(
        !w.path("hydrated.raw.part.done").exists(),
        "the hydration record stayed"
    );
    compare(&expect, &hyd);
    let out = w.path("out.raw");
    copy_raw(&m.uris[0], out.to_str().unwrap());
    compare(&expect, &out);
}

/// A mount killed after it linked `FILE` to the part file and before it recorded the merge: the
/// overlay still holds the disk and nothing runs on `FILE`. Mounting again removes that name,
/// resumes, merges and serves the file with the point and the guest's writes; it used to refuse,
/// taking `FILE` for someone's finished copy.
#[test]
fn a_mount_killed_between_linking_the_file_and_recording_the_merge_finishes_next_time() {
    let (w, img, point) = random_point(8 << 20, 69);
    let hyd = w.path("hydrated.raw");
    let part = w.path("hydrated.raw.part");
    let ov = w.path("ov");
    let m = hydrating_mount_held_at(&w, &point, &ov, &hyd, "hydration-linked");
    guest_writes(&m.uris[0], "write -P 0x5a 1m 64k");
    wait_for(&w.path("hold.reached"), &m);
    assert!(hyd.exists() && part.exists(), "not linked at the hold");
    assert!(
        !w.path("ov/sys.local").exists(),
        "merge recorded before the hold"
    );
    drop(m); // SIGKILL between the link and the merge record

    let m = Mount::start(&w, &hydrating_args(&point, &ov, &hyd), 1);
    m.wait_until("the merge never finished", 60, || {
        w.path("ov/sys.local").exists() && !part.exists()
    });
    let expect = image_with(&w, &img, &[(0x5a, 1 << 20)]);
    compare(&expect, &hyd);
    let out = w.path("out.raw");
    copy_raw(&m.uris[0], out.to_str().unwrap());
    compare(&expect, &out);
}

#[test]
fn a_stopped_hydration_resumes_where_it_was() {
    let (w, img, point) = random_point(16 << 20, 63);
    let hyd = w.path("hydrated.raw");
    let part = w.path("hydrated.raw.part");
    let record = w.path("hydrated.raw.part.done");
    let hydration = |w: &World| sessions(w)[0]["disks"][0]["hydration"].clone();
    let base = [
        point.as_str(),
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--hydrate-to",
        hyd.to_str().unwrap(),
    ];

    // Slowed to 1 MiB/s so the mount can be stopped half way, after its record was written.
    let mut m = Mount::start(
        &w,
        &[&base[..], &["--limit-download", "1MiB/s"]].concat(),
        1,
    );
    let t = Instant::now();
    while !(record.exists() && hydration(&w)["bytes_done"].as_u64().unwrap() >= 2 << 20) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration made no recorded progress: {}",
            hydration(&w)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2500)); // one more record
    let before = hydration(&w);
    assert_eq!(before["complete"], false, "{before}");
    w.ok(&["restore", "unmount", &m.pid().to_string()]);
    assert!(m.wait(Duration::from_secs(10)), "log:\n{}", m.log());
    assert!(!hyd.exists() && part.exists() && record.exists());

    let mut m = Mount::start(&w, &base, 1);
    let resumed = hydration(&w)["bytes_resumed"].as_u64().unwrap();
    assert!(
        ((2 << 20)..16 << 20).contains(&resumed),
        "resumed {resumed} bytes of 16 MiB after {before}"
    );
    let t = Instant::now();
    while hydration(&w)["complete"] != true {
        let h = hydration(&w);
        assert!(h["error"].is_null(), "{h}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration stalled: {h}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    compare(&img, &hyd);
    assert!(
        !part.exists() && !record.exists(),
        "the part file or its record stayed"
    );
    w.ok(&["restore", "unmount", &m.pid().to_string()]);
    assert!(m.wait(Duration::from_secs(10)), "log:\n{}", m.log());
    compare(&img, &hyd);
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn cache_requests_for_the_whole_disk_hold_no_memory() {
    let (w, img, point) = random_point(192 << 20, 77);
    let m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--listen",
            "127.0.0.1:0",
            "--memory-cache",
            "8MiB",
        ],
        1,
    );
    let uri = m.uris[0].clone();
    // Sixteen NBD_CMD_CACHE requests for the whole 192 MiB disk at once, then a read of every
    // byte. Holding what a request fetched takes the disk's size at least; prefetching into
    // the cache takes the cache.
    let script = "import nbd, sys\n\
                  h = nbd.NBD(); h.connect_uri(sys.argv[1]); size = h.get_size()\n\
                  cookies = [h.aio_cache(size, 0) for _ in range(16)]\n\
                  while h.aio_in_flight() > 0:\n    h.poll(-1)\n\
                  assert all(h.aio_command_completed(c) for c in cookies)\n\
                  out = open(sys.argv[2], 'wb')\n\
                  for off in range(0, size, 1 << 20):\n    out.write(h.pread(1 << 20, off))\n\
                  out.close(); print('ok')\n";
    let out = w.path("out.raw");
    let o = ok(
        "/usr/bin/python3",
        &["-c", script, &uri, out.to_str().unwrap()],
    );
    assert_eq!(o.trim(), "ok");
    compare(&img, &out);
    let peak = peak_rss(m.pid());
    assert!(
        peak < 128 << 20,
        "peak {} MiB after CACHE requests; log:\n{}",
        peak >> 20,
        m.log()
    );
}

/// Runs `cmd` (a qemu-io command) on the served disk, then a flush.
fn guest_writes(uri: &str, cmd: &str) {
    ok("qemu-io", &["-f", "raw", "-c", cmd, "-c", "flush", uri]);
}

/// A writable mount of `point` with overlay `ov` hydrating into `hyd`, slowed so that the guest's
/// write (0x5a over 64 KiB at 1 MiB) lands in the overlay before the copy ends; returned once it
/// holds after the merge's first pass (test hook `hydration-merge-pass`, while `hold` exists).
fn mount_held_mid_merge(w: &World, point: &str, ov: &Path, hyd: &Path) -> Mount {
    let m = hydrating_mount_held_at(w, point, ov, hyd, "hydration-merge-pass");
    guest_writes(&m.uris[0], "write -P 0x5a 1m 64k");
    wait_for(&w.path("hold.reached"), &m);
    m
}

/// The arguments of a writable mount of disk `sys` of `point` with overlay `ov`, hydrating into
/// `hyd`.
fn hydrating_args<'a>(point: &'a str, ov: &'a Path, hyd: &'a Path) -> [&'a str; 10] {
    [
        point,
        "--disk",
        "sys",
        "--listen",
        "127.0.0.1:0",
        "--writable",
        "--overlay",
        ov.to_str().unwrap(),
        "--hydrate-to",
        hyd.to_str().unwrap(),
    ]
}

/// A writable mount of `point` with overlay `ov` hydrating into `hyd`, slowed to 2 MiB/s (4 s
/// for the disk) so that a guest's write lands in the overlay first, which holds at test hook
/// `hook` while the file `hold` exists.
fn hydrating_mount_held_at(w: &World, point: &str, ov: &Path, hyd: &Path, hook: &str) -> Mount {
    let hold = w.path("hold");
    std::fs::write(&hold, b"").unwrap();
    let mut args = vec!["restore", "mount"];
    args.extend_from_slice(&hydrating_args(point, ov, hyd));
    args.extend_from_slice(&["--limit-download", "2MiB/s"]);
    let mut cmd = w.cmd(&args);
    cmd.env("BLOCKVAULT_TEST_HOLD", format!("{hook}:{}", hold.display()));
    Mount::spawn(cmd, w.path("mount-held.log"), 1)
}

fn wait_for(path: &Path, m: &Mount) {
    m.wait_until(&format!("{} never appeared", path.display()), 60, || {
        path.exists()
    });
}

/// A copy of `img` with 64 KiB of each `(byte, offset)` written over it: what the disk holds
/// after those guest writes.
fn image_with(w: &World, img: &Path, writes: &[(u8, u64)]) -> PathBuf {
    let expect = w.path("expect.raw");
    std::fs::copy(img, &expect).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .unwrap();
    for (byte, at) in writes {
        f.write_all_at(&vec![*byte; 64 << 10], *at).unwrap();
    }
    expect
}

#[test]
fn a_merge_stopped_half_way_is_never_taken_for_a_copy_of_the_point() {
    let (w, img, point) = random_point(8 << 20, 71);
    let hyd = w.path("hydrated.raw");
    let ov = w.path("ov");
    let m = mount_held_mid_merge(&w, &point, &ov, &hyd);
    // Killed after the overlay's blocks were copied into the part file, before the switch.
    drop(m);
    assert!(!hyd.exists());

    // A read-only mount hydrating into the same file must copy the point, not the point plus
    // the overlay's writes the part file now holds.
    let mut m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--listen",
            "127.0.0.1:0",
            "--hydrate-to",
            hyd.to_str().unwrap(),
        ],
        1,
    );
    m.wait_until("hydration never finished", 60, || hyd.exists());
    assert!(m.sigterm(), "log:\n{}", m.log());
    compare(&img, &hyd);
}

#[test]
fn a_file_that_appears_before_the_switch_leaves_the_guest_on_its_overlay() {
    let (w, img, point) = random_point(8 << 20, 73);
    let hyd = w.path("hydrated.raw");
    let ov = w.path("ov");
    let m = mount_held_mid_merge(&w, &point, &ov, &hyd);
    // Someone else's file takes the name; the switch must fail without recording a merge.
    std::fs::write(&hyd, b"not the disk").unwrap();
    std::fs::remove_file(w.path("hold")).unwrap();
    m.wait_until("the switch did not fail", 30, || {
        m.log().contains("hydration failed")
    });
    assert!(!w.path("ov/sys.local").exists(), "a merge was recorded");
    assert_eq!(std::fs::read(&hyd).unwrap(), b"not the disk");
    // The guest writes on; its writes are in the overlay, and a new mount of it sees them all.
    guest_writes(&m.uris[0], "write -P 0x77 3m 64k");
    drop(m);
    let m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--listen",
            "127.0.0.1:0",
            "--writable",
            "--overlay",
            ov.to_str().unwrap(),
        ],
        1,
    );
    let expect = image_with(&w, &img, &[(0x5a, 1 << 20), (0x77, 3 << 20)]);
    let out = w.path("out.raw");
    copy_raw(&m.uris[0], out.to_str().unwrap());
    compare(&expect, &out);
}
