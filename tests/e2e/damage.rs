//! Bad input gets a clear error, a distinct exit code, and changes nothing.

use std::os::unix::fs::FileExt;

use crate::common::*;

fn repo_snapshot(w: &World) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    fn walk(dir: &std::path::Path, base: &std::path::Path, v: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), base, v);
            } else {
                let rel = e.path().strip_prefix(base).unwrap().display().to_string();
                v.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    walk(&w.repo, &w.repo, &mut v);
    v.sort();
    v
}

#[test]
fn wrong_password_missing_and_foreign_repositories() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 4 << 20, 1, 3);
    w.backup("vm", &[("d", &img)]);
    let before = repo_snapshot(&w);

    std::fs::write(&w.password_file, "wrong").unwrap();
    let out = w.run(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("d={}", img.display()),
    ]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("wrong password"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("wrong\n"),
        "the password itself must not be printed"
    );
    assert_eq!(
        repo_snapshot(&w),
        before,
        "a failed backup changed the repository"
    );

    let missing = World::new();
    let out = missing.run(&["points", "list"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    let foreign = World::new();
    std::fs::create_dir_all(&foreign.repo).unwrap();
    std::fs::write(
        foreign.repo.join("config"),
        "{\"version\": 2, \"id\": \"restic\"}",
    )
    .unwrap();
    let out = foreign.run(&["points", "list"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a blockvault repository"),
        "{}",
        stderr(&out)
    );

    // init refuses a place that is already a repository, or holds anything else.
    let out = w.run(&["repo", "init", "--kdf-memory-kib", "8192"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert_eq!(repo_snapshot(&w), before);
}

#[test]
fn unreadable_images_and_bad_arguments() {
    let w = World::with_repo("64KiB");
    let out = w.run(&["backup", "--vm", "vm", "--disk", "d=/nonexistent/disk.raw"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/disk.raw"),
        "{}",
        stderr(&out)
    );
    let out = w.run(&["backup", "--vm", "vm", "--disk", "no-equals-sign"]);
    assert_eq!(code(&out), 5);
    let out = w.run(&["repo", "init", "--chunk-size", "100KiB"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let out = w.run(&["points", "show", "deadbeef"]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    let img = w.path("d.raw");
    make_image(&img, 1 << 20, 2, 2);
    let p = w.backup("vm", &[("d", &img)]);
    let out = w.run(&[
        "restore",
        "export",
        p["point"].as_str().unwrap(),
        "--disk",
        "nope",
        "--out",
        "/dev/null",
    ]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no disk named 'nope'"),
        "{}",
        stderr(&out)
    );
    assert!(w.json(&["points", "list"]).as_array().unwrap().len() == 1);
}

#[test]
fn tampered_pack_is_reported_by_object_and_point() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 8 << 20, 3, 6);
    let p = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    w.ok(&["verify", "--read-data"]);

    let packs = w.packs();
    assert!(!packs.is_empty());
    // Flip one byte in the middle of the first blob of every pack.
    for pack in &packs {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pack)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 60).unwrap();
        f.write_all_at(&[b[0] ^ 0x55], 60).unwrap();
    }
    // Metadata-only verify does not read data, so it cannot see a flipped data byte; read-data must.
    let out = w.run(&["verify", "--read-data"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let pack_name = packs[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains(&format!("pack {pack_name}")), "{text}");
    assert!(
        text.contains(&p),
        "the affected point must be named: {text}"
    );

    let json = w.run(&["verify", "--read-data", "--json"]);
    assert_eq!(code(&json), 7);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(!v["problems"].as_array().unwrap().is_empty());

    let out = w.run(&[
        "restore",
        "export",
        &p,
        "--disk",
        "d",
        "--out",
        w.path("o").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("tampering or corruption"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn truncated_pack_and_deleted_pack_are_found() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 8 << 20, 4, 6);
    let p = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let packs = w.packs();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&packs[0])
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    drop(f);
    std::fs::remove_dir_all(&w.cache).unwrap();
    let out = w.run(&["verify", "--read-data"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains(&p), "{text}");
    // A restore reading the local pack straight from its file fails, naming the cut.
    let restored = w.path("restored.raw");
    let export = |w: &World| {
        w.run(&[
            "restore",
            "export",
            &p,
            "--disk",
            "d",
            "--overwrite",
            "--out",
            restored.to_str().unwrap(),
        ])
    };
    let out = export(&w);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data lost") && stderr(&out).contains("object truncated"),
        "{}",
        stderr(&out)
    );

    std::fs::remove_file(&packs[0]).unwrap();
    let out = w.run(&["verify"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    // Gone with no prune deleting it: a lost pack, named as such.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no prune deleted it"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And a pack file that is gone sends the read down the general path, which finds the
    // chunk stored nowhere.
    let out = export(&w);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data lost") && stderr(&out).contains("not stored in any pack"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tampered_manifest_and_config() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 2 << 20, 5, 3);
    let p1 = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let p2 = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = w.repo.join("points").join(&p1);
    let mut m = std::fs::read(&manifest).unwrap();
    let n = m.len();
    m[n / 2] ^= 1;
    std::fs::write(&manifest, &m).unwrap();

    let out = w.run(&["points", "show", &p1]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&p1) && stderr(&out).contains("tampering"),
        "{}",
        stderr(&out)
    );
    // The other point is unaffected and still listed; the damaged one is named on stderr.
    let out = w.run(&["points", "list", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"], p2.as_str());
    assert!(stderr(&out).contains(&p1));
    let out = w.run(&["verify"]);
    assert_eq!(code(&out), 7);

    // A swapped manifest (another point's bytes under this name) is caught too.
    std::fs::copy(w.repo.join("points").join(&p2), &manifest).unwrap();
    let out = w.run(&["points", "show", &p1]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));

    // An altered chunk size in the config is tampering, reported as such.
    let cfg_path = w.repo.join("config");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"chunk_size\": 65536", "\"chunk_size\": 131072"),
    )
    .unwrap();
    let out = w.run(&["points", "list"]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(stderr(&out).contains("config"), "{}", stderr(&out));
    // A truncated config is damage too, not a foreign repository.
    std::fs::write(&cfg_path, &cfg[..cfg.len() / 2]).unwrap();
    let out = w.run(&["points", "list"]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
}

#[test]
fn an_unreadable_index_segment_stops_no_restore_and_is_reported() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 4 << 20, 9, 3);
    let p = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let segments: Vec<_> = std::fs::read_dir(w.repo.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    let seg = &segments[0];
    let mut b = std::fs::read(seg).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x20;
    std::fs::write(seg, &b).unwrap();
    let id = seg.file_name().unwrap().to_string_lossy().to_string();

    // A host that never read the segment (its own cache) restores the point exactly.
    let out_file = w.path("out.raw");
    let fresh = w.path("fresh-cache");
    let on_fresh = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--repo")
            .arg(&w.repo)
            .arg("--cache-dir")
            .arg(&fresh)
            .arg("--password-file")
            .arg(&w.password_file)
            .env_remove("BLOCKVAULT_PASSWORD")
            .env_remove("BLOCKVAULT_REPO")
            .output()
            .unwrap()
    };
    let o = on_fresh(&[
        "restore",
        "export",
        &p,
        "--disk",
        "d",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_content(&img, &out_file));

    // verify, on a host that reads the segment, names it as damage; prune refuses until it is
    // deleted.
    let o = on_fresh(&["verify", "--json"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["object"], format!("index segment {id}"), "{v}");
    assert!(problems[0]["affected_points"]
        .as_array()
        .unwrap()
        .is_empty());
    let o = w.run(&["prune", "--grace", "0s"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains(&id), "{}", stderr(&o));
    // The failed prune does not hold the next one back.
    std::fs::remove_file(seg).unwrap();
    w.ok(&["prune", "--grace", "0s"]);
    let o = w.run(&["verify", "--read-data"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    w.export(&p, "d", &out_file);
    assert!(same_content(&img, &out_file));
}
