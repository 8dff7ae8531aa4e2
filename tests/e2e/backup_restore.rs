use std::io::Write;

use crate::common::*;

#[test]
fn backup_then_export_is_bit_exact_sparse_and_streams() {
    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    make_image(&img, 48 << 20, 1, 12);
    let sum = w.backup("vm1", &[("disk0", &img)]);
    let point = sum["point"].as_str().unwrap().to_string();
    assert!(sum["bytes_read"].as_u64().unwrap() > 0);

    let out = w.path("out.raw");
    w.export(&point, "disk0", &out);
    assert!(same_content(&img, &out), "exported image differs");
    // Zero chunks are written as holes: the export occupies about what the source does.
    assert!(
        allocated_bytes(&out) <= allocated_bytes(&img) + (1 << 20),
        "export is not sparse: {} vs {}",
        allocated_bytes(&out),
        allocated_bytes(&img)
    );

    // --out - streams the whole image, zeros included.
    let streamed = w
        .cmd(&[
            "restore",
            "export",
            &point[..8],
            "--disk",
            "disk0",
            "--out",
            "-",
        ])
        .output()
        .unwrap();
    assert!(streamed.status.success(), "{}", stderr(&streamed));
    assert_eq!(streamed.stdout, std::fs::read(&img).unwrap());

    // Standard output redirected to a new file (`> f`): the same bytes, sparse, and the shared
    // offset left at the end, so what is written after lands after the disk.
    let to = w.path("redirected.raw");
    let f = std::fs::File::create(&to).unwrap();
    let st = w
        .cmd(&["restore", "export", &point, "--disk", "disk0", "--out", "-"])
        .stdout(f.try_clone().unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    (&f).write_all(b"END").unwrap();
    let mut want = std::fs::read(&img).unwrap();
    want.extend_from_slice(b"END");
    assert!(
        std::fs::read(&to).unwrap() == want,
        "redirected export differs"
    );
    assert!(
        allocated_bytes(&to) <= allocated_bytes(&img) + (1 << 20),
        "redirected export is not sparse"
    );

    // Appending (`>> f`) to a file with contents: streamed after them.
    let to = w.path("appended.raw");
    std::fs::write(&to, b"HEAD").unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&to).unwrap();
    let st = w
        .cmd(&["restore", "export", &point, "--disk", "disk0", "--out", "-"])
        .stdout(f)
        .status()
        .unwrap();
    assert!(st.success());
    let mut want = b"HEAD".to_vec();
    want.extend_from_slice(&std::fs::read(&img).unwrap());
    assert!(
        std::fs::read(&to).unwrap() == want,
        "appended export differs"
    );
}

#[test]
fn second_backup_deduplicates_and_changes_cost_what_changed() {
    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    make_image(&img, 32 << 20, 2, 10);
    let first = w.backup("vm", &[("d", &img)]);
    let again = w.backup("vm", &[("d", &img)]);
    assert_eq!(
        again["bytes_new"].as_u64().unwrap(),
        0,
        "unchanged disk stored new data: {again}"
    );

    // Change 3 ranges of at most 100 KB: at most ~3 * (100K/64K + 2) chunks are new.
    mutate_image(&img, 3, 3, 100_000);
    let third = w.backup("vm", &[("d", &img)]);
    let new = third["bytes_new"].as_u64().unwrap();
    assert!(new > 0 && new <= 3 * 4 * 65536, "new bytes {new}");
    assert!(first["bytes_new"].as_u64().unwrap() > new);

    let out = w.path("third.raw");
    w.export(third["point"].as_str().unwrap(), "d", &out);
    assert!(same_content(&img, &out));
}

#[test]
fn multi_disk_points_are_listed_and_shown() {
    let w = World::with_repo("64KiB");
    let (a, b) = (w.path("a.raw"), w.path("b.raw"));
    make_image(&a, 8 << 20, 4, 4);
    make_image(&b, 3 << 20 | 12345, 5, 4); // not a multiple of the chunk size
    let sum = w.json(&[
        "backup",
        "--vm",
        "web",
        "--disk",
        &format!("sys={}", a.display()),
        "--disk",
        &format!("data={}", b.display()),
        "--tag",
        "nightly",
    ]);
    let point = sum["point"].as_str().unwrap();
    let other = w.path("c.raw");
    make_image(&other, 1 << 20, 6, 2);
    w.backup("db", &[("x", &other)]);

    let all = w.json(&["points", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let web = w.json(&["points", "list", "--vm", "web"]);
    assert_eq!(web.as_array().unwrap().len(), 1);
    assert_eq!(web[0]["tags"][0], "nightly");
    let show = w.json(&["points", "show", point]);
    assert_eq!(show["disks"].as_array().unwrap().len(), 2);
    assert_eq!(show["disks"][1]["size"].as_u64().unwrap(), 3 << 20 | 12345);
    for (name, src) in [("sys", &a), ("data", &b)] {
        let out = w.path(&format!("{name}.out"));
        w.export(point, name, &out);
        assert!(same_content(src, &out), "disk {name}");
    }
    let human = w.ok(&["points", "list"]);
    assert!(human.contains("web") && human.contains("db"), "{human}");
}

#[test]
fn deleting_the_local_index_loses_nothing() {
    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    make_image(&img, 16 << 20, 7, 6);
    let p = w.backup("vm", &[("d", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_dir_all(&w.cache).unwrap();
    let out = w.path("o.raw");
    w.export(&p, "d", &out);
    assert!(same_content(&img, &out));
    // The rebuilt index still deduplicates.
    let again = w.backup("vm", &[("d", &img)]);
    assert_eq!(again["bytes_new"].as_u64().unwrap(), 0);
    let rebuilt = w.json(&["repo", "index", "rebuild"]);
    assert!(
        rebuilt["index"]["chunks"].as_u64().unwrap() > 0,
        "{rebuilt}"
    );
    w.ok(&["verify", "--read-data"]);
}

#[test]
fn an_index_of_another_repository_is_replaced() {
    let a = World::with_repo("64KiB");
    let img = a.path("disk.raw");
    make_image(&img, 8 << 20, 8, 4);
    a.backup("vm", &[("d", &img)]);
    // Put repository A's index where repository B will look for its own.
    let b = World::with_repo("64KiB");
    let b_id = b.json(&["repo", "info"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a_id = a.json(&["repo", "info"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_dir_all(b.cache.join(&b_id)).unwrap();
    copy_dir(&a.cache.join(&a_id), &b.cache.join(&b_id));
    let img_b = b.path("disk.raw");
    make_image(&img_b, 8 << 20, 9, 4);
    let p = b.backup("vm", &[("d", &img_b)]);
    assert!(p["bytes_new"].as_u64().unwrap() > 0);
    let out = b.path("o.raw");
    b.export(p["point"].as_str().unwrap(), "d", &out);
    assert!(same_content(&img_b, &out));
    b.ok(&["verify"]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn password_can_be_changed() {
    let w = World::with_repo("64KiB");
    let newpw = w.path("newpw");
    std::fs::write(&newpw, "second password").unwrap();
    w.ok(&[
        "repo",
        "passwd",
        "--new-password-file",
        newpw.to_str().unwrap(),
    ]);
    let out = w.run(&["repo", "info"]);
    assert_eq!(
        code(&out),
        3,
        "old password must stop working: {}",
        stderr(&out)
    );
    std::fs::copy(&newpw, &w.password_file).unwrap();
    w.ok(&["repo", "info"]);
}

#[test]
fn compression_level_trades_size_and_every_level_restores() {
    // Text compresses, and compresses better at a higher level.
    let text: String = (0..120_000)
        .map(|i| format!("{i:08} block {} of a log line\n", i % 977))
        .collect();
    let stored = |level: &str| {
        let w = World::with_repo("64KiB");
        let img = w.path("disk.raw");
        std::fs::write(&img, text.as_bytes()).unwrap();
        let sum = w.json(&[
            "--compression-level",
            level,
            "backup",
            "--vm",
            "vm",
            "--disk",
            &format!("d={}", img.display()),
        ]);
        let out = w.path("out.raw");
        w.export(sum["point"].as_str().unwrap(), "d", &out);
        assert!(same_content(&img, &out), "level {level} restores wrongly");
        sum["bytes_stored"].as_u64().unwrap()
    };
    let (fast, small) = (stored("1"), stored("19"));
    assert!(
        small < fast,
        "level 19 stored {small} bytes, level 1 {fast}"
    );

    let w = World::with_repo("64KiB");
    let img = w.path("disk.raw");
    std::fs::write(&img, text.as_bytes()).unwrap();
    let spec = format!("d={}", img.display());
    for bad in ["0", "20", "-3"] {
        let level = format!("--compression-level={bad}");
        let out = w.run(&[&level, "backup", "--vm", "vm", "--disk", &spec]);
        assert_eq!(code(&out), 5, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("--compression-level"),
            "{}",
            stderr(&out)
        );
    }
    assert!(w.json(&["points", "list"]).as_array().unwrap().is_empty());
}

/// A configuration file whose bytes equal a disk chunk (a VM that holds a copy of its own
/// configuration, say) is one blob: both the disk and the file restore exactly, whichever kind
/// it was stored as first.
#[test]
fn a_config_file_equal_to_a_disk_chunk_restores_both() {
    let w = World::with_repo("64KiB");
    let disk = w.path("d.raw");
    make_random_image(&disk, 1 << 20, 5);
    let cfg = w.path("vm.vmcx");
    let bytes = std::fs::read(&disk).unwrap();
    std::fs::write(&cfg, &bytes[64 << 10..128 << 10]).unwrap();
    let sum = w.json(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("d0={}", disk.display()),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let point = sum["point"].as_str().unwrap().to_string();
    let out = w.path("d.out");
    w.export(&point, "d0", &out);
    assert!(same_content(&disk, &out));
    let one = w.path("one.vmcx");
    w.ok(&[
        "restore",
        "export",
        &point,
        "--config",
        "vm.vmcx",
        "--out",
        one.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&cfg).unwrap());
    let (c, v) = {
        let o = w.run(&["verify", "--read-data", "--json"]);
        (code(&o), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(c, 0, "{v}");
}

/// `repo init` creates a local repository's directory owner-only: its `config` holds the wrapped
/// key and KDF parameters, which another user could attack offline.
#[test]
fn a_new_local_repository_is_the_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::with_repo("64KiB");
    let mode = std::fs::metadata(&w.repo).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "repository directory mode {mode:o}");
}

/// The hidden `--pack-size` stays within what a pack's 32-bit table offsets can address.
#[test]
fn a_pack_size_beyond_the_format_is_refused() {
    let w = World::with_repo("64KiB");
    let disk = w.path("d.raw");
    make_random_image(&disk, 1 << 20, 6);
    let spec = format!("d0={}", disk.display());
    for size in ["8GiB", "64KiB"] {
        let o = w.run(&["backup", "--vm", "vm", "--pack-size", size, "--disk", &spec]);
        assert_eq!(code(&o), 5, "{size}: {}", stderr(&o));
        assert!(stderr(&o).contains("1MiB to 1GiB"), "{}", stderr(&o));
    }
}

/// On a terminal, `repo passwd` asks for the current password once (it opened the repository
/// with it), then for the new one twice; the new one works afterwards. Driven through a pty.
#[test]
fn repo_passwd_on_a_terminal_asks_for_the_old_password_once() {
    let w = World::with_repo("64KiB");
    const DRIVE: &str = r#"
import os, pty, sys, time
bin_, repo, cache = sys.argv[1:4]
pid, fd = pty.fork()
if pid == 0:
    os.environ.pop("BLOCKVAULT_PASSWORD", None)
    os.environ.pop("BLOCKVAULT_REPO", None)
    os.execv(bin_, [bin_, "repo", "passwd", "--repo", repo, "--cache-dir", cache])
seen = b""; asked = []
prompts = [(b"repeat new password: ", b"brand new secret"), (b"new password: ", b"brand new secret"),
           (b"repository password: ", b"correct horse battery staple")]
deadline = time.time() + 60
while time.time() < deadline:
    try:
        chunk = os.read(fd, 1024)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
    for p, answer in prompts:
        if seen.endswith(p):
            asked.append(p.decode().strip())
            os.write(fd, answer + b"\n")
            seen = b""
            break
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
print("|".join(asked))
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", DRIVE, BIN])
        .arg(&w.repo)
        .arg(&w.cache)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "{out}\n{}", stderr(&o));
    assert_eq!(
        lines.get(1),
        Some(&"repository password:|new password:|repeat new password:"),
        "{out}"
    );
    std::fs::write(&w.password_file, "brand new secret").unwrap();
    w.ok(&["repo", "info"]);
}
