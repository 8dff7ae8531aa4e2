//! Maintenance while others work: forget and prune beside running backups (local directory and
//! S3), a backup paused across a whole grace period, an RCT incremental whose parent is forgotten
//! mid-run, two prunes at once, and kill -9 at every step of forget and prune.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::s3_support::{S3Server, S3World};

/// Short lease intervals so stale leases and claims are judged in about two seconds.
const REFRESH: &str = "0.3";
/// The grace period of the concurrency tests: long enough for a held backup to commit within it
/// (store times are compared with one second of slack), short enough for a quick test.
const GRACE: &str = "3s";
/// Grace plus the one-second slack plus a margin. S3 reports store times in whole seconds (moto,
/// like AWS, truncates Last-Modified), so two truncated times can seem up to a second closer than
/// they were: the margin covers that second too.
const OLDER_THAN_GRACE: Duration = Duration::from_millis(5300);
/// The slack, a second of store-time truncation and a margin: what "--grace 0s" waits.
const SLACK: Duration = Duration::from_millis(2150);

/// Makes a `blockvault` command with the repository's settings, the named cache directory (one
/// per simulated host) and the given arguments.
type MakeCommand = Box<dyn Fn(&str, &[&str]) -> Command>;

/// One repository, on a local directory or behind the S3 server, driven through the binary.
struct Repo {
    make: MakeCommand,
    dir: PathBuf,
    _keep: Box<dyn std::any::Any>,
}

impl Repo {
    fn local() -> Self {
        let w = World::with_repo("64KiB");
        let dir = w.dir.path().to_path_buf();
        let (repo, pw) = (w.repo.clone(), w.password_file.clone());
        let base = dir.clone();
        let make = move |cache: &str, args: &[&str]| {
            let mut c = Command::new(BIN);
            c.args(args)
                .arg("--repo")
                .arg(&repo)
                .arg("--cache-dir")
                .arg(base.join(cache))
                .arg("--password-file")
                .arg(&pw)
                .env_remove("BLOCKVAULT_PASSWORD")
                .env_remove("BLOCKVAULT_REPO")
                .env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH)
                .stdin(Stdio::null());
            c
        };
        Self {
            make: Box::new(make),
            dir,
            _keep: Box::new(w),
        }
    }

    fn s3(server: &S3Server, prefix: &str) -> Self {
        let w = S3World::new(&server.endpoint(), prefix);
        w.init();
        let dir = w.dir.path().to_path_buf();
        let w = std::rc::Rc::new(w);
        let w2 = w.clone();
        let make = move |cache: &str, args: &[&str]| {
            let mut c = w2.cmd_in(cache, args);
            c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
            c
        };
        Self {
            make: Box::new(make),
            dir,
            _keep: Box::new(w),
        }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.join(n)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        (self.make)("cache", args)
    }

    /// A command run as another host: the same repository, a cache of its own.
    fn cmd_on(&self, host: &str, args: &[&str]) -> Command {
        (self.make)(host, args)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running blockvault")
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    fn json(&self, args: &[&str]) -> Value {
        json_of(args, |a| self.ok(a))
    }

    fn backup(&self, vm: &str, img: &Path, extra: &[&str]) -> Value {
        let spec = format!("d0={}", img.display());
        let mut args = vec!["backup", "--vm", vm, "--pack-size", "1MiB", "--disk", &spec];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Starts a backup that stops right before its manifest, while `hold` exists; returns once
    /// it is there.
    fn backup_held(&self, vm: &str, img: &Path, hold: &Path, extra: &[&str]) -> Child {
        std::fs::write(hold, b"").unwrap();
        let spec = format!("d0={}", img.display());
        let mut args = vec!["backup", "--vm", vm, "--pack-size", "1MiB", "--disk", &spec];
        args.extend_from_slice(extra);
        args.push("--json");
        let mut child = self
            .cmd(&args)
            .env(
                "BLOCKVAULT_TEST_HOLD",
                format!("backup-before-commit:{}", hold.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_reached(hold, &mut child);
        child
    }

    fn prune(&self, grace: &str) -> Value {
        self.json(&["prune", "--grace", grace])
    }

    fn verify_read_data(&self) {
        let v = self.json(&["verify", "--read-data"]);
        assert_eq!(v["problems"], json!([]), "{v}");
    }

    fn restores(&self, point: &str, img: &Path) {
        self.restores_on("cache", point, img);
    }

    /// Exports `point` as host `host` (its own cache) and compares it with `img`.
    fn restores_on(&self, host: &str, point: &str, img: &Path) {
        let out = self.path(&format!("restore-{point}.raw"));
        let args = [
            "restore",
            "export",
            point,
            "--disk",
            "d0",
            "--out",
            out.to_str().unwrap(),
        ];
        succeeded(&args, self.cmd_on(host, &args).output().unwrap());
        assert!(
            same_content(img, &out),
            "point {point} restores exactly on {host}"
        );
        std::fs::remove_file(out).unwrap();
    }

    fn points(&self) -> Vec<String> {
        self.json(&["points", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }
}

fn wait_reached(hold: &Path, child: &mut Child) {
    let mut reached = hold.as_os_str().to_owned();
    reached.push(".reached");
    let reached = PathBuf::from(reached);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reached.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            let out = child.stderr.take().map(std::io::read_to_string);
            panic!("the held process ended ({s}) before reaching its hold: {out:?}");
        }
        assert!(Instant::now() < deadline, "hold not reached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64().unwrap_or_else(|| panic!("{path:?} in {v}"))
}

fn id(v: &Value) -> String {
    v["point"].as_str().unwrap().to_string()
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Two VMs' worth of history; `a` is forgotten by the scenario, `b` stays.
fn history(r: &Repo) -> (PathBuf, PathBuf, String, String) {
    let (a, b) = (r.path("a.raw"), r.path("b.raw"));
    make_random_image(&a, 3 << 20, 1);
    make_random_image(&b, 2 << 20, 2);
    let pa = id(&r.backup("vma", &a, &[]));
    let pb = id(&r.backup("vmb", &b, &[]));
    (a, b, pa, pb)
}

/// A backup that started before forget + prune and commits after them, within the grace period:
/// it commits, the next sweep takes back what it needs, and everything restores.
fn spanning(r: &Repo) {
    let (a, b, pa, pb) = history(r);
    // A second copy of VM a's disk, backed up as another VM: every chunk deduplicates against
    // point `pa`, which is forgotten while this backup runs.
    // Store times are compared with a second of slack: the backup starts clearly after the
    // packs it deduplicates against were written.
    std::thread::sleep(SLACK);
    let hold = r.path("hold");
    let child = r.backup_held("vmc", &a, &hold, &[]);
    r.ok(&["forget", &pa]);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p1 = r.prune(GRACE);
    assert!(num(&p1, &["condemned", "packs"]) > 0, "{p1}");
    assert_eq!(num(&p1, &["deleted", "packs"]), 0, "{p1}");
    std::fs::remove_file(&hold).unwrap();
    let out = finish(child);
    let c = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pc = id(&c);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p2 = r.prune(GRACE);
    assert!(
        num(&p2, &["recovered", "packs"]) > 0,
        "the sweep takes back what pc needs: {p2}"
    );
    r.verify_read_data();
    r.restores(&pc, &a);
    r.restores(&pb, &b);
    assert_eq!(r.points().len(), 2);
}

/// A backup SIGSTOPped across a whole grace period while its data is condemned and swept: it
/// fails clearly and leaves no point; the next backup commits a point that restores exactly.
fn paused(r: &Repo) {
    let (a, b, pa, pb) = history(r);
    // Store times are compared with a second of slack: the backup starts clearly after the
    // packs it deduplicates against were written.
    std::thread::sleep(SLACK);
    let hold = r.path("hold");
    let child = r.backup_held("vmc", &a, &hold, &[]);
    signal(&child, "-STOP");
    std::fs::remove_file(&hold).unwrap();
    r.ok(&["forget", &pa]);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p1 = r.prune(GRACE);
    assert!(num(&p1, &["condemned", "packs"]) > 0, "{p1}");
    // Grace passes and the stopped backup's lease goes stale (3 x 0.3 s + 1 s slack).
    std::thread::sleep(OLDER_THAN_GRACE);
    let p2 = r.prune(GRACE);
    assert!(num(&p2, &["deleted", "packs"]) > 0, "{p2}");
    signal(&child, "-CONT");
    let out = finish(child);
    assert!(!out.status.success(), "the paused backup must not commit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("condemned data this backup relies on")
            && err.contains("run the backup again"),
        "{err}"
    );
    assert_eq!(r.points(), vec![pb.clone()], "no point was left behind");
    r.verify_read_data();
    let pc = id(&r.backup("vmc", &a, &[]));
    r.verify_read_data();
    r.restores(&pc, &a);
    r.restores(&pb, &b);
}

#[test]
fn backup_spanning_forget_and_prune_local() {
    spanning(&Repo::local());
}

#[test]
fn backup_paused_across_the_grace_period_local() {
    paused(&Repo::local());
}

#[test]
fn backup_spanning_forget_and_prune_s3() {
    let server = S3Server::start();
    spanning(&Repo::s3(&server, "span"));
}

#[test]
fn backup_paused_across_the_grace_period_s3() {
    let server = S3Server::start();
    paused(&Repo::s3(&server, "pause"));
}

/// A changed-ranges document covering the whole disk in one query.
fn rct_doc(size: u64, limit: Option<&str>, new: &str, full: bool, changed: &[(u64, u64)]) -> Value {
    json!({"format": "hyperv-rct-changes", "version": 1, "vm_id": "vm-rct",
        "disk": {"path": "D:\\VMs\\rct\\d0.vhdx", "virtual_size": size, "logical_sector_size": 512},
        "limit_id": limit, "new_rct_id": new, "full": full,
        "queries": [{"byte_offset": 0, "byte_length": size, "processed_byte_length": size,
            "changed_byte_offsets": changed.iter().map(|c| c.0).collect::<Vec<_>>(),
            "changed_byte_lengths": changed.iter().map(|c| c.1).collect::<Vec<_>>()}]})
}

/// An RCT incremental whose parent is forgotten and pruned while it runs commits a point that
/// restores exactly (the parent's data is taken back by the sweep).
fn rct_parent_forgotten(r: &Repo) {
    let img = r.path("rct.raw");
    let size = 4u64 << 20;
    make_random_image(&img, size, 7);
    let doc0 = r.path("rct0.json");
    std::fs::write(&doc0, rct_doc(size, None, "rct:0", true, &[]).to_string()).unwrap();
    let spec0 = format!("d0={}", doc0.display());
    let full = r.backup("rct", &img, &["--changes", &spec0]);
    let parent = id(&full);
    // Change 2 % of the disk: one 80 KiB range.
    let (off, len) = (1u64 << 20, 80u64 << 10);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0x5a; len as usize], off).unwrap();
    }
    let doc1 = r.path("rct1.json");
    std::fs::write(
        &doc1,
        rct_doc(size, Some("rct:0"), "rct:1", false, &[(off, len)]).to_string(),
    )
    .unwrap();
    let spec1 = format!("d0={}", doc1.display());
    // S3 servers may keep whole seconds: two slacks apart, the parent's packs are clearly older
    // than the incremental's lease.
    std::thread::sleep(2 * SLACK);
    let hold = r.path("hold");
    let child = r.backup_held("rct", &img, &hold, &["--changes", &spec1]);
    r.ok(&["forget", &parent]);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p1 = r.prune(GRACE);
    assert!(num(&p1, &["condemned", "packs"]) > 0, "{p1}");
    std::fs::remove_file(&hold).unwrap();
    let out = finish(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inc["disks"][0]["kind"], "incremental", "{inc}");
    assert!(inc["disks"][0]["stats"]["bytes_read"].as_u64().unwrap() < size / 4);
    let pi = id(&inc);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p2 = r.prune(GRACE);
    assert!(num(&p2, &["recovered", "packs"]) > 0, "{p2}");
    r.verify_read_data();
    r.restores(&pi, &img);
}

#[test]
fn rct_incremental_whose_parent_is_forgotten_mid_run_local() {
    rct_parent_forgotten(&Repo::local());
}

#[test]
fn rct_incremental_whose_parent_is_forgotten_mid_run_s3() {
    let server = S3Server::start();
    rct_parent_forgotten(&Repo::s3(&server, "rct"));
}

#[test]
fn prune_reclaims_in_two_phases_and_reports() {
    let r = Repo::local();
    let (_a, b, pa, pb) = history(&r);
    let before = r.json(&["repo", "info"]);
    let dry = r.json(&["prune", "--dry-run", "--grace", "0s"]);
    assert_eq!(dry["dry_run"], true);
    r.ok(&["forget", &pa]);
    std::thread::sleep(SLACK);
    let dry = r.json(&["prune", "--dry-run", "--grace", "0s"]);
    assert!(num(&dry, &["condemned", "packs"]) > 0, "{dry}");
    let p1 = r.prune("0s");
    assert_eq!(p1["epoch"], 1);
    assert!(num(&p1, &["condemned", "bytes"]) > 0);
    assert_eq!(
        num(&p1, &["deleted", "packs"]),
        0,
        "phase one deletes nothing"
    );
    assert!(p1["pending_deletable_at"].is_string(), "{p1}");
    let info = r.json(&["repo", "info"]);
    assert_eq!(info["maintenance"]["last_prune"]["epoch"], 1, "{info}");
    assert!(num(&info, &["maintenance", "pending_packs"]) > 0, "{info}");
    r.verify_read_data();
    std::thread::sleep(SLACK);
    let p2 = r.prune("0s");
    assert_eq!(p2["epoch"], 2);
    assert_eq!(
        num(&p2, &["deleted", "packs"]),
        num(&p1, &["condemned", "packs"]),
        "{p2}"
    );
    assert_eq!(num(&p2, &["pending", "packs"]), 0);
    assert!(num(&p2, &["storage", "requests"]) > 0);
    let after = r.json(&["repo", "info"]);
    assert!(num(&after, &["bytes_stored"]) < num(&before, &["bytes_stored"]));
    r.verify_read_data();
    r.restores(&pb, &b);
    // Text output says the same.
    let text = r.ok(&["prune", "--grace", "0s"]);
    assert!(text.contains("prune epoch 3"), "{text}");
}

#[test]
fn two_prunes_at_once_and_a_dead_prune_is_taken_over() {
    let r = Repo::local();
    let (_a, _b, pa, _pb) = history(&r);
    r.ok(&["forget", &pa]);
    let hold = r.path("hold-prune");
    std::fs::write(&hold, b"").unwrap();
    let mut first = r
        .cmd(&["prune", "--grace", "0s", "--json"])
        .env(
            "BLOCKVAULT_TEST_HOLD",
            format!("prune-after-claim:{}", hold.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_reached(&hold, &mut first);
    let second = r.run(&["prune", "--grace", "0s"]);
    assert_eq!(code(&second), 9, "{}", stderr(&second));
    assert!(
        stderr(&second).contains("prune already running (epoch 1"),
        "{}",
        stderr(&second)
    );
    std::fs::remove_file(&hold).unwrap();
    let out = finish(first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A prune stopped after its claim stops refreshing it; another takes over and the stopped
    // one, woken up, deletes and publishes nothing.
    std::fs::remove_file(r.path("hold-prune.reached")).unwrap();
    std::fs::write(&hold, b"").unwrap();
    let mut stopped = r
        .cmd(&["prune", "--grace", "0s", "--json"])
        .env(
            "BLOCKVAULT_TEST_HOLD",
            format!("prune-after-claim:{}", hold.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_reached(&hold, &mut stopped);
    signal(&stopped, "-STOP");
    std::fs::remove_file(&hold).unwrap();
    std::thread::sleep(Duration::from_millis(2300));
    let takeover = r.prune("0s");
    assert_eq!(takeover["epoch"], 3, "{takeover}");
    signal(&stopped, "-CONT");
    let out = finish(stopped);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taken over by epoch 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.verify_read_data();
}

/// Calendar periods are the local time zone's: the same point falls on different days for a
/// machine at UTC+14 and one at UTC-12 (POSIX `TZ` strings, so no zone database is needed).
#[test]
fn forget_counts_days_in_the_local_time_zone() {
    let r = Repo::local();
    let img = r.path("tz.raw");
    make_random_image(&img, 1 << 20, 5);
    r.backup("vm", &img, &[]);
    let day_in = |tz: &str, offset_hours: i64| {
        let mut c = r.cmd(&[
            "forget",
            "--vm",
            "vm",
            "--keep-daily",
            "1",
            "--dry-run",
            "--json",
        ]);
        let out = c.env("TZ", tz).output().unwrap();
        let f = serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", stderr(&out)));
        let d = &f["decisions"][0];
        let created = chrono::DateTime::parse_from_rfc3339(d["created"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{e}: {d}"));
        let local = created + chrono::Duration::hours(offset_hours);
        let want = format!("daily {}", local.format("%Y-%m-%d"));
        assert_eq!(d["reasons"][0], json!(want), "TZ={tz}: {f}");
        want
    };
    let east = day_in("EAST-14", 14);
    let west = day_in("WEST+12", -12);
    assert_ne!(east, west, "26 hours apart, never the same date");
}

#[test]
fn protected_and_newest_points_are_kept_by_policies() {
    let r = Repo::local();
    let img = r.path("p.raw");
    make_random_image(&img, 1 << 20, 3);
    let mut ids = Vec::new();
    for i in 0..4 {
        mutate_image(&img, 100 + i, 2, 4096);
        ids.push(id(&r.backup("vm", &img, &[])));
    }
    r.ok(&["points", "protect", &ids[0]]);
    let refused = r.run(&["forget", &ids[0]]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("protected"),
        "{}",
        stderr(&refused)
    );
    let empty = r.run(&["forget", "--vm", "vm"]);
    assert!(!empty.status.success(), "an empty policy is refused");
    let dry = r.json(&["forget", "--vm", "vm", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["removed"], 2, "{dry}");
    assert_eq!(r.points().len(), 4, "a dry run removes nothing");
    let f = r.json(&["forget", "--vm", "vm", "--keep-last", "1"]);
    let kept: Vec<&str> = f["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(kept.contains(&ids[0].as_str()), "protected kept: {f}");
    assert!(kept.contains(&ids[3].as_str()), "newest kept: {f}");
    assert_eq!(kept.len(), 2, "{f}");
    assert_eq!(r.points().len(), 2);
    r.ok(&["points", "unprotect", &ids[0]]);
    r.ok(&["forget", &ids[0]]);
    assert_eq!(r.points(), vec![ids[3].clone()]);
    r.restores(&ids[3], &img);
}

/// Copies a directory tree (repository or cache) for a fresh run of the crash scenario.
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The crash scenario on a copy of `base`: forget, prune, prune (grace 0), with a kill -9 before
/// the `k`-th object write or delete of command `victim`. Returns whether the kill happened.
/// `packs_left` is how many packs the kept point needs once all is done.
fn crash_run(
    base: &World,
    victim: usize,
    k: u64,
    img: &Path,
    keep: &str,
    old: &[String],
    packs_left: u64,
) -> bool {
    let w = World::new();
    copy_tree(&base.repo, &w.repo);
    copy_tree(&base.cache, &w.cache);
    let mut forget = vec!["forget"];
    forget.extend(old.iter().map(String::as_str));
    let steps: [&[&str]; 3] = [
        &forget,
        &["prune", "--grace", "0s"],
        &["prune", "--grace", "0s"],
    ];
    let mut killed = false;
    for (i, args) in steps.iter().enumerate() {
        if i == 2 {
            std::thread::sleep(SLACK);
        }
        let mut c = w.cmd(args);
        c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
        if i == victim {
            c.env("BLOCKVAULT_TEST_KILL_AT_STEP", k.to_string());
        }
        let out = c.output().unwrap();
        if i == victim && !out.status.success() {
            assert!(
                stderr(&out).contains("test hook: stopping"),
                "{args:?} failed otherwise: {}",
                stderr(&out)
            );
            killed = true;
            break;
        }
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let verify = |what: &str| {
        let mut c = w.cmd(&["verify", "--read-data", "--json"]);
        c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "verify after {what} (victim {victim}, step {k}): {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    verify("the kill");
    // The dead prune's claim goes stale; then the rest of the work is finished.
    if victim > 0 {
        std::thread::sleep(Duration::from_millis(2000));
    }
    // Forget what is still there (a killed forget may have removed some already).
    let listed: Value = serde_json::from_str(&w.ok(&["points", "list", "--json"])).unwrap();
    let mut forget = vec!["forget".to_string()];
    for p in listed.as_array().unwrap() {
        let id = p["id"].as_str().unwrap();
        if id != keep {
            forget.push(id.to_string());
        }
    }
    let forget: Vec<&str> = forget.iter().map(String::as_str).collect();
    let finishing: Vec<&[&str]> = if forget.len() > 1 {
        vec![
            &forget,
            &["prune", "--grace", "0s"],
            &["prune", "--grace", "0s"],
        ]
    } else {
        vec![&["prune", "--grace", "0s"], &["prune", "--grace", "0s"]]
    };
    let n = finishing.len();
    for (i, args) in finishing.into_iter().enumerate() {
        if i == n - 1 {
            std::thread::sleep(SLACK);
        }
        let mut c = w.cmd(args);
        c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} after the kill: {}",
            stderr(&out)
        );
    }
    let mut c = w.cmd(&["prune", "--grace", "0s", "--json"]);
    c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
    let last: Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    assert_eq!(
        num(&last, &["pending", "packs"]),
        0,
        "work finished: {last}"
    );
    assert_eq!(
        num(&last, &["packs_listed", "packs"]),
        packs_left,
        "only the kept point's packs: {last}"
    );
    assert_eq!(num(&last, &["unused_before"]), 0, "{last}");
    verify("finishing");
    let out = w.path("r.raw");
    w.export(keep, "d0", &out);
    assert!(same_content(img, &out));
    killed
}

#[test]
fn kill_at_every_step_of_forget_and_prune() {
    let base = World::with_repo("64KiB");
    let img = base.path("k.raw");
    make_random_image(&img, 1 << 20, 5);
    let mut ids = Vec::new();
    for i in 0..3 {
        // Unrelated contents: each point has a pack of its own.
        make_random_image(&img, 1 << 20, 200 + i);
        ids.push(id(&base.backup("vm", &[("d0", &img)])));
    }
    let last = ids.pop().unwrap();
    std::thread::sleep(SLACK);
    for victim in 0..3 {
        let mut k = 1;
        while crash_run(&base, victim, k, &img, &last, &ids, 1) {
            k += 1;
            assert!(k < 50, "command {victim} never finished");
        }
        assert!(k > 1, "command {victim} wrote or deleted nothing");
    }
}

/// Makes `img` a new version of itself: its second half replaced by random bytes from `seed`.
fn change_second_half(img: &Path, seed: u64) {
    let mut bytes = std::fs::read(img).unwrap();
    let half = bytes.len() / 2;
    let fresh = img.with_extension("half");
    make_random_image(&fresh, (bytes.len() - half) as u64, seed);
    bytes[half..].copy_from_slice(&std::fs::read(&fresh).unwrap());
    std::fs::write(img, &bytes).unwrap();
}

/// The same crash scenario where the first prune repacks: the kept point shares its first pack
/// with the forgotten one, whose half of that pack is dead.
#[test]
fn kill_at_every_step_of_a_repacking_prune() {
    let base = World::with_repo("64KiB");
    let img = base.path("k.raw");
    make_random_image(&img, 1 << 20, 300);
    let old = id(&base.backup("vm", &[("d0", &img)]));
    change_second_half(&img, 301);
    let keep = id(&base.backup("vm", &[("d0", &img)]));
    std::thread::sleep(SLACK);
    for victim in 1..3 {
        let mut k = 1;
        while crash_run(&base, victim, k, &img, &keep, std::slice::from_ref(&old), 2) {
            k += 1;
            assert!(k < 50, "command {victim} never finished");
        }
        assert!(k > 1, "command {victim} wrote or deleted nothing");
    }
}

/// A backup with packs big enough that one pack holds a whole 2 MiB image.
fn backup_big_packs(r: &Repo, vm: &str, img: &Path, extra: &[&str]) -> Value {
    let spec = format!("d0={}", img.display());
    let mut args = vec!["backup", "--vm", vm, "--pack-size", "4MiB", "--disk", &spec];
    args.extend_from_slice(extra);
    r.json(&args)
}

/// Repack: a pack half dead is copied and condemned, then deleted; hosts that indexed the old
/// pack before (one saw the repack's plan while the old pack was still there, one did not) read
/// the new copies, and an identical backup afterwards deduplicates against them.
fn repack_and_other_hosts(r: &Repo) {
    let img = r.path("d.raw");
    make_random_image(&img, 2 << 20, 31);
    let old = id(&backup_big_packs(r, "vm", &img, &[]));
    change_second_half(&img, 32);
    let keep = id(&backup_big_packs(r, "vm", &img, &[]));
    r.restores_on("host2", &keep, &img);
    r.restores_on("host3", &keep, &img);
    r.ok(&["forget", &old]);
    let before = r.json(&["repo", "info"]);
    std::thread::sleep(SLACK);
    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--grace", "0s"];
        args.extend_from_slice(extra);
        r.json(&args)
    };
    let dry = prune(&["--dry-run", "--max-unused", "0%"]);
    assert_eq!(num(&dry, &["repacked", "packs"]), 1, "{dry}");
    assert!(num(&dry, &["unused_before"]) >= 1 << 20, "{dry}");
    // A third of what stays is unused: within 40 %, nothing moves.
    let lax = prune(&["--dry-run", "--max-unused", "40%"]);
    assert_eq!(num(&lax, &["repacked", "packs"]), 0, "{lax}");
    let p1 = prune(&["--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    assert_eq!(num(&p1, &["repack_written", "packs"]), 1, "{p1}");
    assert_eq!(num(&p1, &["unused_after"]), 0, "{p1}");
    assert_eq!(num(&p1, &["deleted", "packs"]), 0, "{p1}");
    assert!(num(&p1, &["pending", "packs"]) >= 1, "{p1}");
    // While the old pack is condemned but still there, a host reads through the new copies.
    r.restores_on("host3", &keep, &img);
    r.verify_read_data();
    std::thread::sleep(SLACK);
    let p2 = prune(&[]);
    assert!(num(&p2, &["deleted", "packs"]) >= 1, "{p2}");
    assert_eq!(num(&p2, &["recovered", "packs"]), 0, "{p2}");
    assert_eq!(num(&p2, &["pending", "packs"]), 0, "{p2}");
    // The old pack is gone. Host 2 never saw the repack's plan before its deletion; host 3 did.
    r.restores_on("host2", &keep, &img);
    r.restores_on("host3", &keep, &img);
    r.restores(&keep, &img);
    r.verify_read_data();
    let after = r.json(&["repo", "info"]);
    assert!(
        num(&after, &["bytes_stored"]) + (900 << 10) < num(&before, &["bytes_stored"]),
        "the dead megabyte is reclaimed: {before} -> {after}"
    );
    // Nothing is left to repack, and an identical backup deduplicates against the new copies.
    let p3 = prune(&["--max-unused", "0%"]);
    assert_eq!(num(&p3, &["unused_before"]), 0, "{p3}");
    assert_eq!(num(&p3, &["repacked", "packs"]), 0, "{p3}");
    let again = backup_big_packs(r, "vm", &img, &[]);
    assert!(
        num(&again, &["storage", "bytes_uploaded"]) < 256 << 10,
        "{again}"
    );
    let text = r.ok(&["prune", "--grace", "0s", "--max-unused", "0%"]);
    assert!(!text.contains("repacked"), "{text}");
}

#[test]
fn prune_repacks_and_other_hosts_follow_local() {
    repack_and_other_hosts(&Repo::local());
}

#[test]
fn prune_repacks_and_other_hosts_follow_s3() {
    let server = S3Server::start();
    repack_and_other_hosts(&Repo::s3(&server, "repack"));
}

/// A backup that deduplicated against the dead half of a pack, and commits after a prune
/// repacked that pack (copying only the live half) and within the grace period: the sweep
/// finds the backup's chunks in the old pack only and takes it back instead of deleting it.
fn backup_spanning_a_repack(r: &Repo) {
    let img = r.path("a.raw");
    make_random_image(&img, 2 << 20, 51);
    let original = r.path("a0.raw");
    std::fs::copy(&img, &original).unwrap();
    let old = id(&backup_big_packs(r, "vm", &img, &[]));
    change_second_half(&img, 52);
    let keep = id(&backup_big_packs(r, "vm", &img, &[]));
    std::thread::sleep(SLACK);
    // Another VM with the original contents: every chunk deduplicates against the first pack.
    let hold = r.path("hold");
    std::fs::write(&hold, b"").unwrap();
    let spec = format!("d0={}", original.display());
    let args = [
        "backup",
        "--vm",
        "vmc",
        "--pack-size",
        "4MiB",
        "--disk",
        &spec,
        "--json",
    ];
    let mut child = r
        .cmd(&args)
        .env(
            "BLOCKVAULT_TEST_HOLD",
            format!("backup-before-commit:{}", hold.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_reached(&hold, &mut child);
    r.ok(&["forget", &old]);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p1 = r.json(&["prune", "--grace", GRACE, "--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    std::fs::remove_file(&hold).unwrap();
    let out = finish(child);
    assert!(out.status.success(), "{}", stderr(&out));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pc = id(&c);
    std::thread::sleep(OLDER_THAN_GRACE);
    let p2 = r.prune(GRACE);
    assert_eq!(
        num(&p2, &["recovered", "packs"]),
        1,
        "the old pack holds the only copy of half of pc: {p2}"
    );
    assert_eq!(num(&p2, &["deleted", "packs"]), 0, "{p2}");
    r.verify_read_data();
    r.restores(&pc, &original);
    r.restores(&keep, &img);
}

#[test]
fn backup_spanning_a_repack_local() {
    backup_spanning_a_repack(&Repo::local());
}

#[test]
fn backup_spanning_a_repack_s3() {
    let server = S3Server::start();
    backup_spanning_a_repack(&Repo::s3(&server, "spanrepack"));
}

/// Exports `point` as host `host` (a cache of its own) and compares it with `img`.
fn restores_as(w: &World, host: &str, point: &str, img: &Path) {
    let out = w.path(&format!("{host}.raw"));
    let args = [
        "restore",
        "export",
        "--overwrite",
        point,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut c = Command::new(BIN);
    c.args(args)
        .arg("--repo")
        .arg(&w.repo)
        .arg("--cache-dir")
        .arg(w.path(host))
        .arg("--password-file")
        .arg(&w.password_file)
        .env_remove("BLOCKVAULT_PASSWORD")
        .env_remove("BLOCKVAULT_REPO")
        .env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH)
        .stdin(Stdio::null());
    succeeded(&args, c.output().unwrap());
    assert!(same_content(img, &out), "{host} restored other bytes");
}

/// A local repository's pack files with their sizes, smallest first.
fn packs_by_size(r: &Repo) -> Vec<(u64, PathBuf)> {
    let mut packs: Vec<(u64, PathBuf)> = Vec::new();
    for dir in std::fs::read_dir(r.dir.join("repo/packs"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            packs.push((f.metadata().unwrap().len(), f.path()));
        }
    }
    packs.sort();
    packs
}

/// Files under `dir` (recursively), without temporary ones.
fn files_under(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += files_under(&p);
        } else if !e.file_name().to_string_lossy().contains('#') {
            n += 1;
        }
    }
    n
}

/// The hardest order for a reader: a host whose index took a chunk's location from the old pack
/// after it had seen the repack's new copy (the old pack has no index segment, so a full sync
/// reads its table of contents last), during the window between the repack and its plan. When
/// the old pack is deleted, that host must still find the new copy: applying the plan re-reads
/// the repack's segment.
#[test]
fn a_host_that_indexed_the_old_pack_last_follows_the_repack() {
    let w = World::with_repo("64KiB");
    let cmd = |args: &[&str]| {
        let mut c = w.cmd(args);
        c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
        c
    };
    let img = w.path("d.raw");
    let spec = format!("d0={}", img.display());
    let backup = [
        "backup",
        "--vm",
        "vm",
        "--pack-size",
        "4MiB",
        "--disk",
        &spec,
    ];
    make_random_image(&img, 2 << 20, 41);
    // A backup killed after its pack and before its index segment: the pack stays uncovered.
    let mut k = 1;
    loop {
        let out = cmd(&backup)
            .env("BLOCKVAULT_TEST_KILL_AT_STEP", k.to_string())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "step {k}: the backup was not stopped"
        );
        if files_under(&w.repo.join("packs")) > 0 {
            assert_eq!(files_under(&w.repo.join("index")), 0, "step {k}");
            break;
        }
        k += 1;
        assert!(k < 10, "no pack was ever written");
    }
    // The same data backed up again: the point uses the uncovered pack.
    let old = id(&w.json(&backup));
    change_second_half(&img, 42);
    let keep = id(&w.json(&backup));
    assert_eq!(
        files_under(&w.repo.join("index")),
        1,
        "one segment, for the new half"
    );
    w.ok(&["forget", &old]);
    std::thread::sleep(SLACK);

    // The repack stops after writing its packs and segment, before its plan.
    let hold = w.path("hold-repack");
    std::fs::write(&hold, b"").unwrap();
    let mut prune = cmd(&["prune", "--grace", "0s", "--max-unused", "0%", "--json"])
        .env(
            "BLOCKVAULT_TEST_HOLD",
            format!("prune-after-repack:{}", hold.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_reached(&hold, &mut prune);
    // A new host indexes everything now: the repack's segment, then the old pack's table.
    restores_as(&w, "host4", &keep, &img);
    std::fs::remove_file(&hold).unwrap();
    let out = finish(prune);
    assert!(out.status.success(), "{}", stderr(&out));
    let p1: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    std::thread::sleep(SLACK);
    let p2 = w.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p2, &["deleted", "packs"]), 1, "{p2}");
    restores_as(&w, "host4", &keep, &img);
}

/// Nine VMs backed up once each: nine small index segments. Returns the points and images.
fn small_segments(w: &World) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for i in 0..9 {
        let img = w.path(&format!("s{i}.raw"));
        make_random_image(&img, 256 << 10, 600 + i);
        let p = id(&w.backup(&format!("vm{i}"), &[("d0", &img)]));
        out.push((p, img));
    }
    assert_eq!(files_under(&w.repo.join("index")), 9);
    out
}

#[test]
fn prune_merges_small_index_segments() {
    let w = World::with_repo("64KiB");
    let points = small_segments(&w);
    // Host 2 has absorbed the nine segments before they are merged.
    restores_as(&w, "host2", &points[0].0, &points[0].1);
    std::thread::sleep(SLACK);
    let p = w.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p, &["segments_merged"]), 9, "{p}");
    assert_eq!(num(&p, &["segments_written"]), 1, "{p}");
    assert_eq!(num(&p, &["segments_retired"]), 9, "{p}");
    assert_eq!(files_under(&w.repo.join("index")), 1);
    let v = w.json(&["verify", "--read-data"]);
    assert_eq!(v["problems"], json!([]), "{v}");
    for (point, img) in [&points[0], &points[8]] {
        restores_as(&w, "host2", point, img);
        restores_as(&w, "host3", point, img);
    }
    // The merged segment alone rebuilds a whole index.
    let r = w.json(&["repo", "index", "rebuild"]);
    assert_eq!(
        num(&r, &["report", "packs_read"]),
        0,
        "every pack is in the merged segment: {r}"
    );
    assert_eq!(num(&r, &["index", "packs"]), 9, "{r}");
    w.export(&points[4].0, "d0", &w.path("x.raw"));
    assert!(same_content(&points[4].1, &w.path("x.raw")));
    let again = w.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&again, &["segments_merged"]), 0, "{again}");
}

/// kill -9 before each object write or delete of a prune that merges segments: verify passes,
/// the next prune finishes the merge (one segment left) and the points restore.
#[test]
fn kill_at_every_step_of_a_merging_prune() {
    let base = World::with_repo("64KiB");
    let points = small_segments(&base);
    std::thread::sleep(SLACK);
    let mut k = 1;
    loop {
        let w = World::new();
        copy_tree(&base.repo, &w.repo);
        copy_tree(&base.cache, &w.cache);
        let run = |args: &[&str], kill: Option<u64>| {
            let mut c = w.cmd(args);
            c.env("BLOCKVAULT_LEASE_REFRESH_SECS", REFRESH);
            if let Some(k) = kill {
                c.env("BLOCKVAULT_TEST_KILL_AT_STEP", k.to_string());
            }
            c.output().unwrap()
        };
        let out = run(&["prune", "--grace", "0s"], Some(k));
        if out.status.success() {
            break;
        }
        assert!(
            stderr(&out).contains("test hook: stopping"),
            "step {k}: {}",
            stderr(&out)
        );
        let v = run(&["verify", "--read-data"], None);
        assert!(v.status.success(), "verify after step {k}: {}", stderr(&v));
        // The dead prune's claim goes stale; then the work is finished.
        std::thread::sleep(Duration::from_millis(2000));
        let out = run(&["prune", "--grace", "0s"], None);
        assert!(
            out.status.success(),
            "prune after step {k}: {}",
            stderr(&out)
        );
        assert_eq!(files_under(&w.repo.join("index")), 1, "after step {k}");
        for (point, img) in [&points[0], &points[8]] {
            restores_as(&w, "fresh", point, img);
        }
        k += 1;
        assert!(k < 40, "the prune never finished");
    }
    assert!(k > 3, "the prune wrote and deleted objects");
}

/// A pack holding damaged live blobs is not repacked: prune names it and keeps it whole (not
/// condemned), so a later sweep cannot delete the only copy of what is still intact in it.
#[test]
fn a_pack_with_damaged_live_blobs_is_not_repacked() {
    let r = Repo::local();
    let img = r.path("d.raw");
    make_random_image(&img, 2 << 20, 61);
    let old = id(&backup_big_packs(&r, "vm", &img, &[]));
    change_second_half(&img, 62);
    backup_big_packs(&r, "vm", &img, &[]);
    r.ok(&["forget", &old]);
    // The first pack (the larger one) holds 32 blobs, half of them live. Damage the first three
    // quarters of its body, away from its table: at least 8 live blobs are hit.
    let mut packs = packs_by_size(&r);
    let (size, first) = packs.pop().unwrap();
    let mut bytes = std::fs::read(&first).unwrap();
    for at in (1000..size as usize * 3 / 4).step_by(16 << 10) {
        bytes[at] ^= 0xff;
    }
    std::fs::write(&first, &bytes).unwrap();
    let pack = first.file_name().unwrap().to_string_lossy().into_owned();
    std::thread::sleep(SLACK);
    let p1 = r.json(&["prune", "--grace", "0s", "--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 0, "{p1}");
    assert_eq!(num(&p1, &["condemned", "packs"]), 0, "{p1}");
    let skipped = p1["repack_skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{p1}");
    let why = skipped[0].as_str().unwrap();
    assert!(why.contains(&pack) && why.contains("chunk"), "{why}");
    std::thread::sleep(SLACK);
    let p2 = r.prune("0s");
    assert_eq!(num(&p2, &["deleted", "packs"]), 0, "{p2}");
    assert!(first.exists(), "the damaged pack is kept");
}

/// Three images sharing their first 2 MiB: `a|b`, `a|c`, and a small unrelated one.
fn shared_halves(r: &Repo, seed: u64) -> (PathBuf, PathBuf, PathBuf) {
    let (one, two, small) = (r.path("one.raw"), r.path("two.raw"), r.path("small.raw"));
    make_random_image(&one, 4 << 20, seed);
    std::fs::copy(&one, &two).unwrap();
    change_second_half(&two, seed + 1);
    make_random_image(&small, 256 << 10, seed + 2);
    (one, two, small)
}

/// Verification finds a blob damaged; the next backup of that content stores it again (the
/// damaged copy is never deduplicated against). When the pack holding the good copy becomes
/// partly dead, its repack must copy the chunk: the damaged copy elsewhere covers nothing, or
/// the sweep would delete the only good copy and undo the healing.
#[test]
fn a_healed_chunk_keeps_its_good_copy_through_a_repack() {
    let r = Repo::local();
    let (one, two, _) = shared_halves(&r, 81);
    let big = |vm: &str, img: &Path| {
        let spec = format!("d0={}", img.display());
        id(&r.json(&["backup", "--vm", vm, "--pack-size", "8MiB", "--disk", &spec]))
    };
    let kept = big("vm1", &one);
    let first = packs_by_size(&r);
    assert_eq!(first.len(), 1, "one pack");
    // One byte in the first half's data (the 17th of 64 incompressible 64 KiB blobs).
    let mut bytes = std::fs::read(&first[0].1).unwrap();
    bytes[1 << 20] ^= 0xff;
    std::fs::write(&first[0].1, &bytes).unwrap();
    let v = r.run(&["verify", "--read-data", "--json"]);
    assert!(!v.status.success(), "verify finds the damage");
    // The healing backup stores the damaged chunk again beside the second half's new data.
    let healer = big("vm2", &two);
    let v = r.json(&["verify", "--read-data"]);
    assert_eq!(v["problems"], json!([]), "healed: {v}");
    // The healer's pack becomes partly dead: only the healed chunk in it is still needed.
    r.ok(&["forget", &healer]);
    std::thread::sleep(SLACK);
    let p1 = r.json(&["prune", "--grace", "0s", "--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    assert_eq!(
        num(&p1, &["repack_written", "packs"]),
        1,
        "the healed chunk is copied: {p1}"
    );
    std::thread::sleep(SLACK);
    let p2 = r.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p2, &["deleted", "packs"]), 1, "{p2}");
    let v = r.json(&["verify", "--read-data"]);
    assert_eq!(v["problems"], json!([]), "still healed: {v}");
    let out = r.path("kept.raw");
    r.ok(&[
        "restore",
        "export",
        &kept,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(same_content(&one, &out));
}

/// A chunk stored twice (a backup killed before its index segment, then the same data backed
/// up by a host that never saw that pack). A new host's full sync reads segments first and the
/// unlisted pack's table last, so its index points at the copy in the unlisted pack. Returns
/// the point and its image once host "new" has read the point that way.
fn chunk_stored_twice(r: &Repo) -> (String, PathBuf) {
    let (one, two, small) = shared_halves(r, 91);
    let packs = r.dir.join("repo/packs");
    // Host "other" opens the repository (and its index) before the unlisted pack exists.
    let small_spec = format!("d0={}", small.display());
    succeeded(
        &["backup"],
        r.cmd_on("other", &["backup", "--vm", "vm0", "--disk", &small_spec])
            .output()
            .unwrap(),
    );
    let spec = format!("d0={}", one.display());
    let mut k = 1;
    loop {
        let out = r
            .cmd(&[
                "backup",
                "--vm",
                "vm1",
                "--pack-size",
                "8MiB",
                "--disk",
                &spec,
            ])
            .env("BLOCKVAULT_TEST_KILL_AT_STEP", k.to_string())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "step {k}: the backup was not stopped"
        );
        if files_under(&packs) > 1 {
            assert_eq!(files_under(&r.dir.join("repo/index")), 1, "step {k}");
            break;
        }
        k += 1;
        assert!(k < 10, "no pack was ever written");
    }
    let spec = format!("d0={}", two.display());
    let args = [
        "backup",
        "--vm",
        "vm2",
        "--pack-size",
        "8MiB",
        "--disk",
        &spec,
        "--json",
    ];
    let out = r.cmd_on("other", &args).output().unwrap();
    let point = id(&json_of(&args, |a| succeeded(a, out)));
    assert_eq!(files_under(&packs), 3, "the shared half is stored twice");
    r.restores_on("new", &point, &two);
    (point, two)
}

/// The unlisted pack of `chunk_stored_twice` is partly dead, repacked without copying (the other
/// copy stays) and deleted: every host must still find the other copy, which the deleting plan
/// names for re-reading.
#[test]
fn a_host_indexing_the_deleted_copy_of_a_chunk_finds_the_other() {
    let r = Repo::local();
    let (point, two) = chunk_stored_twice(&r);
    std::thread::sleep(SLACK);
    let p1 = r.json(&["prune", "--grace", "0s", "--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    assert_eq!(num(&p1, &["repack_written", "packs"]), 0, "{p1}");
    std::thread::sleep(SLACK);
    let p2 = r.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p2, &["deleted", "packs"]), 1, "{p2}");
    for host in ["new", "other", "fresh"] {
        r.restores_on(host, &point, &two);
    }
}

/// Starts a prune that stops at test hold `at` while `hold` exists; returns once it is there.
fn prune_held(r: &Repo, at: &str, hold: &Path) -> Child {
    std::fs::write(hold, b"").unwrap();
    let mut child = r
        .cmd(&["prune", "--grace", "0s", "--json"])
        .env("BLOCKVAULT_TEST_HOLD", format!("{at}:{}", hold.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_reached(hold, &mut child);
    child
}

/// The sweep that deletes the unlisted pack of `chunk_stored_twice` is stopped before its plan,
/// then killed after its plan and before its deletions: every host reads the point throughout
/// (the pack is never gone before a plan names the other copy), and the next prune deletes the
/// pack the killed one announced.
#[test]
fn a_sweep_stopped_before_its_deletions_leaves_every_host_reading() {
    let r = Repo::local();
    let (point, two) = chunk_stored_twice(&r);
    let packs = r.dir.join("repo/packs");
    std::thread::sleep(SLACK);
    let p1 = r.json(&["prune", "--grace", "0s", "--max-unused", "0%"]);
    assert_eq!(num(&p1, &["repacked", "packs"]), 1, "{p1}");
    std::thread::sleep(SLACK);
    let hold = r.path("hold-prune");
    let everyone_reads = |when: &str| {
        for host in ["new", "other"] {
            r.restores_on(host, &point, &two);
        }
        let args = ["verify", "--read-data", "--json"];
        let v = r.cmd_on("new", &args).output().unwrap();
        assert!(v.status.success(), "verify {when}: {}", stderr(&v));
    };

    let mut before_plan = prune_held(&r, "prune-after-repack", &hold);
    everyone_reads("before the plan");
    before_plan.kill().unwrap();
    finish(before_plan);
    assert_eq!(files_under(&packs), 3, "nothing deleted before the plan");
    everyone_reads("after a kill before the plan");
    // The dead prune's claim goes stale.
    std::thread::sleep(Duration::from_millis(2000));

    let mut before_deletion = prune_held(&r, "prune-after-plan", &hold);
    before_deletion.kill().unwrap();
    finish(before_deletion);
    assert_eq!(files_under(&packs), 3, "the plan came first");
    everyone_reads("after a kill between the plan and its deletions");
    r.restores_on("fresh", &point, &two);
    let rebuilt = r
        .cmd_on("rebuilt", &["repo", "index", "rebuild"])
        .output()
        .unwrap();
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    r.restores_on("rebuilt", &point, &two);

    let p3 = r.json(&["prune", "--grace", "0s"]);
    assert_eq!(
        num(&p3, &["deleted", "packs"]),
        1,
        "the leftover pack: {p3}"
    );
    assert_eq!(files_under(&packs), 2, "{p3}");
    everyone_reads("after the leftover is deleted");
    for host in ["fresh", "rebuilt", "last"] {
        r.restores_on(host, &point, &two);
    }
    let p4 = r.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p4, &["deleted", "packs"]), 0, "{p4}");
}

/// The local copy of a plan is a cache: one torn by a crash or a full disk is fetched again,
/// not taken for tampering (which would stop every backup and prune on that host).
#[test]
fn a_torn_cached_plan_is_fetched_again() {
    let r = Repo::local();
    let img = r.path("d.raw");
    make_random_image(&img, 1 << 20, 95);
    let old = id(&r.backup("vm", &img, &[]));
    change_second_half(&img, 96);
    r.backup("vm", &img, &[]);
    r.ok(&["forget", &old]);
    std::thread::sleep(SLACK);
    r.json(&["prune", "--grace", "0s"]);
    let mut cached = Vec::new();
    for repo_dir in std::fs::read_dir(r.path("cache")).unwrap().flatten() {
        let plans = repo_dir.path().join("plans");
        for f in std::fs::read_dir(&plans).into_iter().flatten().flatten() {
            cached.push(f.path());
        }
    }
    assert_eq!(cached.len(), 1, "one cached plan: {cached:?}");
    let len = std::fs::metadata(&cached[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cached[0])
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::thread::sleep(SLACK);
    let p = r.json(&["prune", "--grace", "0s"]);
    assert_eq!(num(&p, &["epoch"]), 2, "{p}");
    assert_eq!(
        std::fs::metadata(&cached[0]).unwrap().len(),
        len,
        "cached again"
    );
}

/// Verification finds a chunk damaged in a range the guest never wrote again: the next RCT
/// incremental, which would reuse that chunk from its parent's map without reading it, reads
/// the range from the disk instead and stores the chunk again, and every point is whole.
#[test]
fn an_incremental_heals_a_damaged_chunk_it_would_have_reused() {
    let r = Repo::local();
    let img = r.path("rct.raw");
    let size = 1u64 << 20;
    make_random_image(&img, size, 97);
    let write_doc = |name: &str, doc: Value| {
        let p = r.path(name);
        std::fs::write(&p, serde_json::to_vec(&doc).unwrap()).unwrap();
        format!("d0={}", p.display())
    };
    let full = write_doc("c0.json", rct_doc(size, None, "rct-1", true, &[]));
    let first = id(&r.backup("rct", &img, &["--changes", &full]));
    // Damage one blob in the middle of the larger pack (away from its first chunk, which the
    // incremental reads anyway).
    let mut packs = packs_by_size(&r);
    let (len, pack) = packs.pop().unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[len as usize / 2] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();
    let v = r.run(&["verify", "--read-data", "--json"]);
    assert_eq!(v.status.code(), Some(7), "verify finds the damage");

    let inc = write_doc(
        "c1.json",
        rct_doc(size, Some("rct-1"), "rct-2", false, &[(0, 4096)]),
    );
    let b = r.backup("rct", &img, &["--changes", &inc]);
    assert_eq!(b["disks"][0]["kind"], "incremental", "{b}");
    let second = id(&b);
    let v = r.json(&["verify", "--read-data"]);
    assert_eq!(v["problems"], json!([]), "healed: {v}");
    for point in [&first, &second] {
        let out = r.path("out.raw");
        r.ok(&[
            "restore",
            "export",
            "--overwrite",
            point,
            "--disk",
            "d0",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(same_content(&img, &out), "{point}");
    }
}

/// A manifest that cannot be read stops every prune; naming it in `forget` removes it (a policy
/// leaves it alone), and prune runs again.
#[test]
fn forget_removes_a_named_unreadable_manifest_and_prune_runs_again() {
    let r = Repo::local();
    let img = r.path("d.raw");
    make_random_image(&img, 1 << 20, 97);
    let broken = id(&r.backup("vm", &img, &[]));
    make_random_image(&img, 1 << 20, 98);
    let kept = id(&r.backup("vm", &img, &[]));
    let manifest = r.dir.join("repo/points").join(&broken);
    let len = std::fs::metadata(&manifest).unwrap().len() as usize;
    std::fs::write(&manifest, vec![0x5a; len]).unwrap();

    let refused = r.run(&["prune", "--grace", "0s"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(&format!("blockvault forget {broken}")),
        "{}",
        stderr(&refused)
    );
    let policy = r.json(&["forget", "--keep-last", "1"]);
    assert_eq!(policy["unreadable"], json!([broken]), "{policy}");
    assert!(manifest.exists(), "a policy leaves it alone");

    let named = r.json(&["forget", &broken]);
    assert_eq!(num(&named, &["removed"]), 1, "{named}");
    let why = named["decisions"][0]["reasons"][0].as_str().unwrap();
    assert!(why.contains("could not be read"), "{why}");
    assert!(!manifest.exists());
    assert_eq!(r.points(), vec![kept.clone()]);
    std::thread::sleep(SLACK);
    let p = r.prune("0s");
    assert!(num(&p, &["condemned", "packs"]) >= 1, "{p}");
    r.restores(&kept, &img);
}
