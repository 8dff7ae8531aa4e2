//! Repositories in S3: the same commands against a real S3-protocol server, through faults,
//! outages, concurrent agents, bandwidth limits and the on-disk blob cache.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockvault_repo::{Storage, StoreOptions, Write};
use bytes::Bytes;

use crate::common::{make_image, make_random_image, same_content};
use crate::s3_support::*;

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} not a number in {v}"))
}

/// The storage semantics the format relies on, for any backend. `long_suffix`: also read a suffix
/// longer than the object (s3s-fs 0.14 answers that with 500 instead of the whole object; the
/// format only asks for one when a pack is smaller than its 64 KiB table-of-contents probe).
async fn conformance(s: &Storage, long_suffix: bool) {
    let a = Bytes::from_static(b"0123456789abcdef");
    s.put("packs/ab/one", a.clone(), Write::Overwrite)
        .await
        .unwrap();
    assert_eq!(s.get("packs/ab/one").await.unwrap(), a);
    assert_eq!(s.get_range("packs/ab/one", 2..6).await.unwrap(), &a[2..6]);
    let (tail, size) = s.get_suffix("packs/ab/one", 4).await.unwrap();
    assert_eq!((&tail[..], size), (&a[12..], 16));
    if long_suffix {
        let (all, _) = s.get_suffix("packs/ab/one", 100).await.unwrap();
        assert_eq!(all, a);
    }
    assert_eq!(s.head("packs/ab/one").await.unwrap(), Some(16));
    assert_eq!(s.head("packs/ab/none").await.unwrap(), None);
    let e = s.get("packs/ab/none").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("packs/ab/none"), "{e}");
    // A range past the end is an error naming the object, never short data taken as whole.
    assert!(s.get_range("packs/ab/one", 10..40).await.is_err());
    // Create-only: the second writer loses; overwrite replaces.
    s.put("config", Bytes::from_static(b"first"), Write::CreateChecked)
        .await
        .unwrap();
    let e = s
        .put(
            "config",
            Bytes::from_static(b"second"),
            Write::CreateChecked,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("config"), "{e}");
    assert_eq!(s.get("config").await.unwrap(), Bytes::from_static(b"first"));
    s.put("config", Bytes::from_static(b"third"), Write::Overwrite)
        .await
        .unwrap();
    assert_eq!(s.get("config").await.unwrap(), Bytes::from_static(b"third"));
    // Listing by prefix, past one page of results (S3 pages at 1000).
    for i in 0..1005 {
        s.put(
            &format!("index/{i:05}"),
            Bytes::from_static(b"x"),
            Write::Overwrite,
        )
        .await
        .unwrap();
    }
    let mut l = s.list("index").await.unwrap();
    l.sort();
    assert_eq!(l.len(), 1005);
    assert_eq!(l[0], ("index/00000".to_string(), 1));
    assert_eq!(
        s.list("packs").await.unwrap(),
        vec![("packs/ab/one".to_string(), 16)]
    );
    s.delete("packs/ab/one").await.unwrap();
    s.delete("packs/ab/one").await.unwrap();
    assert_eq!(s.head("packs/ab/one").await.unwrap(), None);
}

fn s3_opts(endpoint: &str) -> StoreOptions {
    StoreOptions {
        s3_endpoint: Some(endpoint.into()),
        s3_allow_http: true,
        ..StoreOptions::default()
    }
}

fn with_test_credentials() {
    // Only this test binary's environment; the S3 client reads credentials from it.
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    std::env::set_var("AWS_REGION", "us-east-1");
}

#[test]
fn storage_conformance_local_memory_and_s3() {
    let server = S3Server::start();
    with_test_credentials();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = Storage::open(dir.path().join("r").to_str().unwrap(), true).unwrap();
    rt.block_on(conformance(&local, true));
    rt.block_on(conformance(
        &Storage::open("memory://", true).unwrap(),
        true,
    ));
    let s3 = Storage::open_with("s3://vault/conf/a", true, &s3_opts(&server.endpoint())).unwrap();
    assert_eq!(s3.location(), "s3://vault/conf/a");
    assert!(s3.remote_cache_size().is_some());
    rt.block_on(conformance(&s3, true));
    // The prefix is applied: another prefix in the same bucket sees nothing of it.
    let other =
        Storage::open_with("s3://vault/conf/b", true, &s3_opts(&server.endpoint())).unwrap();
    assert!(rt.block_on(other.list("")).unwrap().is_empty());
    // The same against s3s-fs, the on-disk server the kill test uses (create-only puts included).
    let disk = DiskS3Server::start(&dir.path().join("s3s-fs"));
    let s3 = Storage::open_with("s3://vault/conf/a", true, &s3_opts(&disk.endpoint())).unwrap();
    rt.block_on(conformance(&s3, false));
}

#[test]
fn s3_full_round_trip_and_no_secret_anywhere() {
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "team/host1");
    let out = w.json(&[
        "repo",
        "init",
        "--chunk-size",
        "64KiB",
        "--kdf-memory-kib",
        "8192",
    ]);
    assert_eq!(out["location"], "s3://vault/team/host1");
    let img = w.path("disk.img");
    make_image(&img, 8 << 20, 11, 12);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let b = w.json(&a);
    let point = b["point"].as_str().unwrap().to_string();
    assert!(num(&b, &["storage", "bytes_uploaded"]) > 0);
    let out = w.path("out.img");
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        &point,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(same_content(&img, &out));
    w.ok(&["verify", "--read-data"]);
    w.ok(&["repo", "index", "rebuild"]);
    w.ok(&["points", "list"]);
    w.ok(&["repo", "info"]);
    // A second init on the same prefix refuses.
    let again = w.run(&["repo", "init", "--kdf-memory-kib", "8192"]);
    assert!(!again.status.success());
    // A missing bucket: a clear error naming it, quickly, without the secret.
    let mut bad = S3World::new(&server.endpoint(), "x");
    bad.location = "s3://no-such-bucket/x".into();
    let t = Instant::now();
    let o = bad.run(&["points", "list", "--json"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no-such-bucket"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "a permanent error was retried"
    );
}

#[test]
fn s3_backup_through_faults_and_permanent_failure() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port);
    let w = S3World::new(&proxy.endpoint(), "flaky");
    w.init();
    proxy.set(Mode::Flaky);
    let img = w.path("disk.img");
    make_image(&img, 6 << 20, 5, 10);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let b = w.json(&a);
    assert!(
        proxy.faults.load(Ordering::SeqCst) >= 5,
        "no faults were injected"
    );
    let point = b["point"].as_str().unwrap().to_string();
    let out = w.path("out.img");
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        &point,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(same_content(&img, &out));

    proxy.set(Mode::Forbidden);
    let img2 = w.path("disk2.img");
    make_image(&img2, 4 << 20, 6, 10);
    let args = S3World::backup_args(&img2);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    let o = w.run(&a);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("s3://vault/flaky"), "{err}");
    assert!(
        err.to_lowercase().contains("denied") || err.contains("403"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "a 403 was retried");
    proxy.set(Mode::Pass);
    w.ok(&["verify", "--read-data"]);
}

#[test]
fn s3_outage_mid_backup_then_resume_uploads_only_the_rest() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port);
    let w = S3World::new(&proxy.endpoint(), "outage");
    w.init();
    let img = w.path("disk.img");
    make_random_image(&img, 16 << 20, 21);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let child = w
        .cmd_in(
            "cache",
            &[a.as_slice(), &["--json", "--limit-upload", "4MiB/s"]].concat(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = proxy.forwarded.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.forwarded.load(Ordering::SeqCst) - start < 8 << 20 {
        assert!(Instant::now() < deadline, "backup made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The store vanishes for longer than the retry budget (6 s in these tests).
    proxy.set(Mode::Down);
    let o = child.wait_with_output().unwrap();
    assert_no_secret(&o);
    assert!(!o.status.success(), "backup succeeded through an outage");
    proxy.set(Mode::Pass);
    w.ok(&["verify"]);
    let b = w.json(&a);
    let uploaded = num(&b, &["storage", "bytes_uploaded"]);
    assert!(
        num(&b, &["bytes_new"]) < 10 << 20 && uploaded < 10 << 20,
        "the resumed backup uploaded again what was already stored: {b}"
    );
    restores_exactly_and_verifies(&w, &b, &img);
}

#[test]
fn s3_server_killed_mid_backup_then_restarted() {
    let data = tempfile::tempdir().unwrap();
    let mut server = DiskS3Server::start(data.path());
    let w = S3World::new(&server.endpoint(), "killed");
    w.init();
    let size: u64 = 40 << 20;
    let img = w.path("disk.img");
    make_random_image(&img, size, 77);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut child = w
        .cmd_in(
            "cache",
            &[a.as_slice(), &["--json", "--limit-upload", "4MiB/s"]].concat(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let packs = server.bucket_dir().join("killed").join("packs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir_size(&packs) < 12 << 20 {
        assert!(Instant::now() < deadline, "backup made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup ended before the server was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    // What the killed server had stored (objects are renamed into place whole).
    let stored = dir_size(&packs);
    // The server stays down for longer than the retry budget (6 s per request in these tests):
    // the backup gives up with an error that names the repository.
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    assert_no_secret(&o);
    assert!(
        !o.status.success(),
        "backup succeeded with its server killed"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let err = stderr
        .lines()
        .find(|l| l.starts_with("blockvault: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        err.contains("s3://vault/killed") && err.to_lowercase().contains("connect"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(180),
        "the failing backup took {:?}",
        t.elapsed()
    );

    server.restart();
    w.ok(&["verify"]);
    let points = w.json(&["points", "list"]);
    assert_eq!(
        points.as_array().unwrap().len(),
        0,
        "the interrupted backup left a point: {points}"
    );
    let b = w.json(&a);
    let (new, uploaded) = (
        num(&b, &["bytes_new"]),
        num(&b, &["storage", "bytes_uploaded"]),
    );
    // Everything the killed server had stored is reused; only the rest (plus metadata and
    // the packs that were in flight) goes up again.
    assert!(
        new + stored <= size + (2 << 20) && uploaded + stored <= size + (4 << 20),
        "the backup after the restart uploaded again what was already stored \
         ({stored} bytes of packs): {b}"
    );
    restores_exactly_and_verifies(&w, &b, &img);
}

/// The point a backup printed restores `img` byte for byte, and `verify --read-data` passes.
fn restores_exactly_and_verifies(w: &S3World, backup: &serde_json::Value, img: &std::path::Path) {
    let point = backup["point"].as_str().unwrap().to_string();
    let out = w.path("out.img");
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        &point,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(same_content(img, &out));
    w.ok(&["verify", "--read-data"]);
}

#[test]
fn s3_two_agents_share_a_bucket_and_deduplicate() {
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "shared");
    w.init();
    let img = w.path("disk.img");
    make_random_image(&img, 16 << 20, 33);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let first = w
        .cmd_in(
            "host-a",
            &[a.as_slice(), &["--json", "--limit-upload", "4MiB/s"]].concat(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Start the second agent once most of the first's packs are in the bucket.
    std::thread::sleep(Duration::from_millis(3000));
    let second = w
        .cmd_in("host-b", &[a.as_slice(), &["--json"]].concat())
        .output()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    for o in [&first, &second] {
        assert_no_secret(o);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let j1: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let j2: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    let (n1, n2) = (num(&j1, &["bytes_new"]), num(&j2, &["bytes_new"]));
    assert!(n1 > 4 << 20, "{j1}");
    assert!(
        n2 * 10 < n1 * 7,
        "second agent did not deduplicate: {n2} vs {n1}"
    );
    w.ok(&["verify", "--read-data"]);
    for j in [&j1, &j2] {
        let out = w.path("out.img");
        let p = j["point"].as_str().unwrap();
        w.ok(&[
            "restore",
            "export",
            "--overwrite",
            p,
            "--disk",
            "d0",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(same_content(&img, &out));
    }
}

#[test]
fn s3_upload_limit_paces_backup() {
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "slow");
    w.init();
    let img = w.path("disk.img");
    make_random_image(&img, 8 << 20, 44);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    w.ok(&[a.as_slice(), &["--limit-upload", "4MiB/s"]].concat());
    // 8 MiB at 4 MiB/s is 2 s; allow for the burst allowance and measurement slack.
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut t = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            t += if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            };
        }
    }
    t
}

#[test]
fn s3_cold_reads_use_the_bounded_disk_cache() {
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "cache");
    w.init();
    let img = w.path("disk.img");
    make_random_image(&img, 4 << 20, 55);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let p = w.json(&a)["point"].as_str().unwrap().to_string();
    let out = w.path("out.img");
    let export = |cache: &str, size: &str| -> serde_json::Value {
        let o = w
            .cmd_in(
                cache,
                &[
                    "restore",
                    "export",
                    "--overwrite",
                    &p,
                    "--disk",
                    "d0",
                    "--out",
                    out.to_str().unwrap(),
                    "--json",
                    "--cache-size",
                    size,
                ],
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(same_content(&img, &out));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // A cache that holds the disk: the second export downloads almost nothing.
    let cold = export("big", "64MiB");
    let warm = export("big", "64MiB");
    assert!(num(&warm, &["blob_cache", "hits"]) > 0, "{warm}");
    assert!(
        num(&warm, &["storage", "bytes_downloaded"]) * 4
            < num(&cold, &["storage", "bytes_downloaded"]),
        "cold {cold} warm {warm}"
    );
    // Without a cache every blob is a range request of its own; with one, a miss fetches the
    // blob's whole 1 MiB pack window (about four of these 256 KiB chunks) in one request, plus
    // one read of the pack's table of contents.
    let alone = export("none", "0");
    let (windowed, single) = (
        num(&cold, &["storage", "requests"]),
        num(&alone, &["storage", "requests"]),
    );
    assert!(
        windowed + 8 <= single,
        "window reads made {windowed} requests, blob-by-blob reads {single}"
    );
    // A small cache never grows past its bound, however much is read through it.
    for _ in 0..2 {
        export("small", "1MiB");
        // The blob cache alone: the cache directory also holds the local index and catalog,
        // whose sizes RocksDB decides.
        let cached = dir_size(&blobs_dir(&w, "small"));
        assert!(cached <= 1 << 20, "blob cache holds {cached} bytes");
    }
    // A damaged cached blob is discarded and refetched, not reported as repository damage.
    let blobs = blobs_dir(&w, "big");
    for shard in std::fs::read_dir(&blobs).unwrap().flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let mut b = std::fs::read(f.path()).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0x55;
            std::fs::write(f.path(), b).unwrap();
        }
    }
    export("big", "64MiB");
}

fn blobs_dir(w: &S3World, cache: &str) -> std::path::PathBuf {
    let root = w.path(cache);
    let id = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name();
    root.join(id).join("blobs")
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn s3_unreadable_pack_table_falls_back_to_reading_blobs_alone() {
    let data = tempfile::tempdir().unwrap();
    let server = DiskS3Server::start(data.path());
    let w = S3World::new(&server.endpoint(), "toc");
    w.init();
    let img = w.path("disk.img");
    make_random_image(&img, 8 << 20, 91);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let point = w.json(&a)["point"].as_str().unwrap().to_string();
    // Break the authentication tag of every pack's table of contents (the sealed table ends
    // just before the 12-byte trailer); the blobs themselves stay intact.
    let packs = files_under(&server.bucket_dir().join("toc").join("packs"));
    assert!(!packs.is_empty());
    for p in &packs {
        let mut b = std::fs::read(p).unwrap();
        let at = b.len() - 13;
        b[at] ^= 0x55;
        std::fs::write(p, b).unwrap();
    }
    // Window reads need the table; without it every blob is read alone and still checked, so a
    // cold restore is exact.
    let out = w.path("out.img");
    let o = w
        .cmd_in(
            "fresh",
            &[
                "restore",
                "export",
                "--overwrite",
                &point,
                "--disk",
                "d0",
                "--out",
                out.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(same_content(&img, &out));
    // The damage itself is still reported.
    let v = w
        .cmd_in("fresh", &["verify", "--read-data"])
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}
