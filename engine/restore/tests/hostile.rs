//! Bad input and a hostile extraction target: file systems made with the real tools, then damaged
//! or made to loop; target directories holding traps.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockvault_restore::*;

mod common;
use common::{ext4, run, volume};

#[test]
fn a_directory_loop_ends_in_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(content.join("a/b")).unwrap();
    std::fs::write(content.join("a/b/f"), b"x").unwrap();
    let img = ext4(tmp.path(), 4, &content, &["-N", "8192"]);
    // A hard link from deep inside the tree back to its top: walking it never ends by itself.
    run(Command::new("debugfs")
        .args(["-w", "-R", "ln /a /a/b/loop"])
        .arg(&img));
    let mut v = volume(&img);
    let out = tmp.path().join("out");
    let r = extract(
        v.as_mut(),
        &[b"a".to_vec()],
        &out,
        &ExtractOptions {
            max_entries: 100_000,
            max_depth: 64,
            ..Default::default()
        },
    );
    match r {
        Err(Error::Limit(m)) => assert!(m.contains("deep"), "{m}"),
        other => panic!("expected a depth limit, got {other:?}"),
    }
}

/// A loop through a wide directory: every level waits with thousands of visits, each with a
/// longer path. What waits is bounded, whatever order the loop's link is listed in.
#[test]
fn a_directory_loop_through_a_wide_directory_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(content.join("a")).unwrap();
    for i in 0..3000 {
        std::fs::write(
            content.join(format!("a/file-with-a-longish-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    let img = ext4(tmp.path(), 16, &content, &["-N", "8192"]);
    run(Command::new("debugfs")
        .args(["-w", "-R", "ln /a /a/aaa"])
        .arg(&img));
    let mut v = volume(&img);
    let r = extract(
        v.as_mut(),
        &[b"a".to_vec()],
        &tmp.path().join("out"),
        &ExtractOptions {
            threads: 0,
            max_pending_bytes: 32 << 20,
            ..Default::default()
        },
    );
    match r {
        Err(Error::Limit(m)) => assert!(m.contains("waiting"), "{m}"),
        other => panic!("expected a limit, got {other:?}"),
    }
}

#[test]
fn a_huge_directory_is_listed_partially_and_extraction_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(content.join("big")).unwrap();
    for i in 0..5000 {
        std::fs::write(content.join(format!("big/{i}")), b"").unwrap();
    }
    let img = ext4(tmp.path(), 16, &content, &["-N", "8192"]);
    let mut v = volume(&img);
    let l = v.list(&[b"big".to_vec()], 100).unwrap();
    assert_eq!(l.entries.len(), 100);
    assert!(l.truncated);
    let r = extract(
        v.as_mut(),
        &[b"big".to_vec()],
        &tmp.path().join("out"),
        &ExtractOptions {
            max_entries: 1000,
            max_depth: 8,
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(Error::Limit(_))), "{r:?}");
}

#[test]
fn extraction_never_writes_through_a_symlink_in_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    std::fs::write(content.join("etc/passwd"), b"from the backup").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", content.join("etc/link")).unwrap();
    let img = ext4(tmp.path(), 4, &content, &["-N", "8192"]);
    let mut v = volume(&img);
    // The target already holds a symlink named like the extracted directory, pointing elsewhere.
    let out = tmp.path().join("out");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("etc")).unwrap();
    let r = extract(
        v.as_mut(),
        &[b"etc".to_vec()],
        &out,
        &ExtractOptions::default(),
    );
    assert!(matches!(r, Err(Error::Exists { .. })), "{r:?}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through the symlink"
    );
    // The same for a file.
    std::fs::remove_file(out.join("etc")).unwrap();
    std::fs::create_dir(out.join("etc")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("victim"), out.join("etc/passwd")).unwrap();
    let r = extract(
        v.as_mut(),
        &[b"etc".to_vec(), b"passwd".to_vec()],
        &out.join("etc"),
        &ExtractOptions::default(),
    );
    assert!(matches!(r, Err(Error::Exists { .. })), "{r:?}");
    assert!(!elsewhere.join("victim").exists());
    // Into a clean target: the link is a link, its target untouched.
    let clean = tmp.path().join("clean");
    let rep = extract(v.as_mut(), &[], &clean, &ExtractOptions::default()).unwrap();
    assert_eq!(rep.symlinks, 1);
    assert_eq!(
        std::fs::read_link(clean.join("etc/link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read(clean.join("etc/passwd")).unwrap(),
        b"from the backup"
    );
}

#[test]
fn paths_inside_the_backup_cannot_climb() {
    assert!(parse_location("p1:/a/../../etc").is_err());
    let l = parse_location("p2:/Users/ann/./Documents").unwrap();
    assert_eq!(l.partition.as_deref(), Some("p2"));
    assert_eq!(
        l.path,
        vec![b"Users".to_vec(), b"ann".to_vec(), b"Documents".to_vec()]
    );
    let l = parse_location("C:/x").unwrap();
    assert_eq!(l.partition, None);
    assert_eq!(l.path, vec![b"C:".to_vec(), b"x".to_vec()]);
}

#[test]
fn garbage_and_tiny_disks_are_errors() {
    for data in [
        vec![],
        vec![0u8; 100],
        vec![0xffu8; 4096],
        vec![0u8; 1 << 20],
    ] {
        let dev: Arc<dyn ReadAt> = Arc::new(MemDisk::new(data));
        if let Ok(t) = partitions(&dev) {
            for p in &t.partitions {
                assert!(open_volume(&dev, &t, &p.selector()).is_err());
            }
        }
    }
}
