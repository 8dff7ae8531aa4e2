//! Trees extracted from ext4 file systems made with the real tools: hard links come out as hard
//! links, on one thread or several, and listings still verify metadata checksums.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use blockvault_restore::*;

mod common;
use common::{ext4, run, volume};

fn debugfs(img: &Path, req: &str) -> Vec<u8> {
    run(Command::new("debugfs").args(["-R", req]).arg(img))
}

/// The inode number debugfs gives for `path`.
fn inode(img: &Path, path: &str) -> u64 {
    let out = String::from_utf8(debugfs(img, &format!("stat {path}"))).unwrap();
    let rest = out.split("Inode: ").nth(1).expect(&out);
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// A tree where `a/one`, `a/two`, `b/three` and `top` are names of one file, `a/x` and `b/y` of
/// another, and `lone` a file of its own.
fn linked_tree(root: &Path) {
    std::fs::create_dir_all(root.join("t/a")).unwrap();
    std::fs::create_dir_all(root.join("t/b")).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("t/a/one"), &data).unwrap();
    for n in ["t/a/two", "t/b/three", "top"] {
        std::fs::hard_link(root.join("t/a/one"), root.join(n)).unwrap();
    }
    std::fs::write(root.join("t/a/x"), b"other").unwrap();
    std::fs::hard_link(root.join("t/a/x"), root.join("t/b/y")).unwrap();
    std::fs::write(root.join("t/lone"), b"lone").unwrap();
}

fn host_inodes(root: &Path, names: &[&str]) -> Vec<u64> {
    names
        .iter()
        .map(|n| std::fs::symlink_metadata(root.join(n)).unwrap().ino())
        .collect()
}

#[test]
fn hard_links_in_the_tree_are_extracted_as_hard_links() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    linked_tree(&content);
    let img = ext4(
        tmp.path(),
        8,
        &content,
        &["-O", "metadata_csum", "-N", "1024"],
    );
    // The volume tells which names are one file: the inode numbers debugfs gives.
    let mut v = volume(&img);
    for n in ["/t/a/one", "/t/b/three", "/top", "/t/a/x", "/t/lone"] {
        let p = split_path(n).unwrap();
        assert_eq!(v.open_listed(&p).unwrap().id(), Some(inode(&img, n)), "{n}");
    }
    assert_eq!(inode(&img, "/t/a/one"), inode(&img, "/t/b/three"));
    for threads in [0, 1, 3] {
        let out = tmp.path().join(format!("out-{threads}"));
        let opts = ExtractOptions {
            threads,
            ..Default::default()
        };
        let r = extract(v.as_mut(), &[], &out, &opts).unwrap();
        assert_eq!((r.files, r.hard_links), (7, 4), "{threads} threads: {r:?}");
        let one = host_inodes(&out, &["t/a/one", "t/a/two", "t/b/three", "top"]);
        assert!(one.iter().all(|i| *i == one[0]), "{one:?}");
        let x = host_inodes(&out, &["t/a/x", "t/b/y"]);
        assert_eq!(x[0], x[1]);
        let lone = host_inodes(&out, &["t/lone"]);
        assert!(one[0] != x[0] && lone[0] != one[0] && lone[0] != x[0]);
        assert_eq!(std::fs::metadata(out.join("top")).unwrap().nlink(), 4);
        // Contents as debugfs reads them.
        for n in ["t/a/one", "t/b/three", "top", "t/b/y", "t/lone"] {
            assert_eq!(
                std::fs::read(out.join(n)).unwrap(),
                debugfs(&img, &format!("cat /{n}")),
                "{n}"
            );
        }
        // Only names inside the extracted tree are linked: `top` is outside `t`.
        let sub = tmp.path().join(format!("sub-{threads}"));
        let r = extract(v.as_mut(), &[b"t".to_vec()], &sub, &opts).unwrap();
        assert_eq!((r.files, r.hard_links), (6, 3), "{r:?}");
        let one = host_inodes(&sub, &["t/a/one", "t/a/two", "t/b/three"]);
        assert!(one.iter().all(|i| *i == one[0]), "{one:?}");
        assert_eq!(std::fs::metadata(sub.join("t/a/one")).unwrap().nlink(), 3);
    }
}

/// Lists every object below `root`: kind, size, mode and contents.
fn inventory(root: &Path) -> BTreeMap<String, (bool, u64, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if m.is_dir() {
                todo.push(e.path());
                out.insert(rel, (true, 0, m.mode() & 0o7777, Vec::new()));
            } else {
                let data = std::fs::read(e.path()).unwrap();
                out.insert(rel, (false, m.len(), m.mode() & 0o7777, data));
            }
        }
    }
    out
}

#[test]
fn a_tree_extracts_alike_on_one_thread_and_several() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    for d in 0..20 {
        let dir = content.join(format!("d{d}/e{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..30 {
            let len = (d * 30 + f) * 997 % 70_000;
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + d + f) as u8).collect();
            std::fs::write(dir.join(format!("f{f}")), data).unwrap();
        }
    }
    std::fs::set_permissions(
        content.join("d1"),
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .unwrap();
    let img = ext4(
        tmp.path(),
        48,
        &content,
        &["-O", "metadata_csum", "-N", "1024"],
    );
    let mut v = volume(&img);
    let mut seen = Vec::new();
    for threads in [0, 2] {
        let out = tmp.path().join(format!("out-{threads}"));
        let opts = ExtractOptions {
            threads,
            ..Default::default()
        };
        let r = extract(v.as_mut(), &[], &out, &opts).unwrap();
        assert_eq!(r.files, 600);
        seen.push(inventory(&out));
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0]["d1"].2, 0o555);
    seen[0].remove("lost+found");
    assert_eq!(seen[0], inventory(&content));
    // Writable again, so the temporary directory can be removed without privileges.
    for d in [
        content.join("d1"),
        tmp.path().join("out-0/d1"),
        tmp.path().join("out-2/d1"),
    ] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
}

#[test]
fn a_directory_block_that_fails_its_checksum_stops_the_extraction() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(content.join("d")).unwrap();
    std::fs::write(content.join("d/some-file-name"), b"x").unwrap();
    let img = ext4(
        tmp.path(),
        4,
        &content,
        &["-O", "metadata_csum", "-N", "1024"],
    );
    // Change one letter of the name in the directory's block; its checksum no longer matches.
    let block: u64 = String::from_utf8(debugfs(&img, "blocks /d"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut data = std::fs::read(&img).unwrap();
    let bs = 1024u64 << u32::from_le_bytes(data[1024 + 24..1024 + 28].try_into().unwrap());
    let at = (block * bs) as usize;
    let i = data[at..at + bs as usize]
        .windows(14)
        .position(|w| w == b"some-file-name")
        .unwrap();
    data[at + i] = b'S';
    std::fs::write(&img, &data).unwrap();
    let mut v = volume(&img);
    for threads in [0, 2] {
        let r = extract(
            v.as_mut(),
            &[],
            &tmp.path().join(format!("out-{threads}")),
            &ExtractOptions {
                threads,
                ..Default::default()
            },
        );
        match r {
            Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("checksum"), "{detail}"),
            other => panic!("expected a checksum error, got {other:?}"),
        }
    }
}

/// A file with preallocated (unwritten) extents: the blocks behind them hold stale bytes, which
/// must never come out as the file's contents. It is refused by name; its neighbours written
/// before it are intact.
#[test]
fn a_file_with_unwritten_extents_is_refused_not_read_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("c");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("plain"), vec![7u8; 10_000]).unwrap();
    std::fs::write(content.join("prealloc"), b"abc").unwrap();
    let img = ext4(tmp.path(), 16, &content, &["-b", "4096"]);
    // Blocks 1..63 of the file reserved but never written, and the size to cover them.
    debugfs_w(&img, "fallocate /prealloc 1 63");
    debugfs_w(&img, "sif /prealloc size 262144");
    let extents = String::from_utf8(debugfs(&img, "dump_extents /prealloc")).unwrap();
    assert!(extents.contains("Uninit"), "{extents}");
    // Stale bytes where the unwritten extent points.
    let physical: u64 = extents
        .lines()
        .find(|l| l.contains("Uninit"))
        .and_then(|l| l.split_whitespace().nth(6))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no physical start in {extents}"));
    let mut data = std::fs::read(&img).unwrap();
    let at = (physical * 4096) as usize;
    data[at..at + 63 * 4096].fill(0xee);
    std::fs::write(&img, &data).unwrap();

    let mut v = volume(&img);
    let mut got = Vec::new();
    let r = v.read_file(&[b"prealloc".to_vec()], 1 << 20, &mut |_, d| {
        got.extend_from_slice(d);
        Ok(())
    });
    match r {
        Err(Error::Unsupported { what, found }) => {
            assert!(what.contains("prealloc"), "{what}");
            assert!(found.contains("unwritten"), "{found}");
        }
        other => panic!("expected a refusal, got {other:?} with {} bytes", got.len()),
    }
    assert!(!got.contains(&0xee), "stale bytes came out");
    let r = extract(
        v.as_mut(),
        &[b"prealloc".to_vec()],
        &tmp.path().join("out"),
        &ExtractOptions::default(),
    );
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    // In a tree it is left out and named; everything else is extracted.
    for threads in [0, 2] {
        let out = tmp.path().join(format!("tree-{threads}"));
        let r = extract(
            v.as_mut(),
            &[],
            &out,
            &ExtractOptions {
                threads,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.refused_total, 1, "{:?}", r.refused);
        assert!(r.refused[0].contains("prealloc"), "{:?}", r.refused);
        assert!(!out.join("prealloc").exists());
        assert_eq!(std::fs::read(out.join("plain")).unwrap(), vec![7u8; 10_000]);
    }
    let mut plain = Vec::new();
    v.read_file(&[b"plain".to_vec()], 1 << 20, &mut |_, d| {
        plain.extend_from_slice(d);
        Ok(())
    })
    .unwrap();
    assert_eq!(plain, vec![7u8; 10_000]);
}

fn debugfs_w(img: &Path, req: &str) {
    run(Command::new("debugfs").args(["-w", "-R", req]).arg(img));
}

/// An NTFS file whose valid data length is short of its size (as `SetEndOfFile` or a
/// preallocating download leaves it): past it the file reads as zeros, whatever its clusters
/// hold. Compared with what ntfscat reads.
#[test]
fn ntfs_bytes_past_the_valid_data_length_read_as_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let img = ntfs_image(tmp.path(), |mnt| {
        std::fs::write(mnt.join("vdl.bin"), vec![0xabu8; 65536])
    });

    // The file's record: the MFT's place from the boot sector, the inode number from ntfsinfo.
    let info = String::from_utf8(run(Command::new("ntfsinfo")
        .args(["-F", "/vdl.bin"])
        .arg(&img)))
    .unwrap();
    let inode: u64 = info
        .split("Dumping Inode ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inode in {info}"));
    let mut data = std::fs::read(&img).unwrap();
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |a, x| a << 8 | u64::from(*x));
    let cluster = le(&data[0x0b..0x0d]) * u64::from(data[0x0d]);
    let record_size = match data[0x40] as i8 {
        n if n < 0 => 1u64 << -n,
        n => n as u64 * cluster,
    };
    let record = (le(&data[0x30..0x38]) * cluster + inode * record_size) as usize;
    assert_eq!(&data[record..record + 4], b"FILE");
    // Find the non-resident $DATA attribute and set its initialized size to 4096.
    let mut at = record + le(&data[record + 0x14..record + 0x16]) as usize;
    loop {
        let ty = le(&data[at..at + 4]);
        assert_ne!(ty, 0xffff_ffff, "no $DATA attribute");
        if ty == 0x80 {
            break;
        }
        at += le(&data[at + 4..at + 8]) as usize;
    }
    assert_eq!(data[at + 8], 1, "$DATA is not non-resident");
    let field = at + 0x38 - record;
    assert!(
        field % 512 < 502,
        "the field crosses an update sequence position"
    );
    assert_eq!(le(&data[at + 0x38..at + 0x40]), 65536);
    data[at + 0x38..at + 0x40].copy_from_slice(&4096u64.to_le_bytes());
    std::fs::write(&img, &data).unwrap();

    let oracle = run(Command::new("ntfscat").arg(&img).arg("vdl.bin"));
    let mut v = volume(&img);
    // Holes may be left out of the pieces: fill a buffer of the file's size.
    let mut got = vec![0u8; 65536];
    let size = v
        .read_file(&[b"vdl.bin".to_vec()], 1 << 20, &mut |off, d| {
            got[off as usize..off as usize + d.len()].copy_from_slice(d);
            Ok(())
        })
        .unwrap();
    assert_eq!(size, 65536);
    assert!(
        got == oracle,
        "differs from ntfscat ({} bytes) from byte {:?}",
        oracle.len(),
        got.iter().zip(&oracle).position(|(a, b)| a != b)
    );
    assert!(got[..4096].iter().all(|b| *b == 0xab));
    assert!(got[4096..].iter().all(|b| *b == 0));
}

/// NTFS files with reparse points that are not links: a hydrated cloud file (OneDrive) is
/// extracted with its data; a cloud placeholder whose data is elsewhere and a WOF-compressed
/// file are refused by name, and in a tree left out and listed, never skipped silently.
#[test]
fn ntfs_cloud_files_are_extracted_and_files_whose_data_is_elsewhere_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = ntfs_image(tmp.path(), |mnt| {
        std::fs::write(mnt.join("hydrated.docx"), vec![0x42u8; 20_000])?;
        std::fs::write(mnt.join("wof.dll"), vec![0x43u8; 20_000])?;
        std::fs::write(mnt.join("plain.txt"), b"plain")?;
        let tag = |file: &str, tag: u32| {
            run(Command::new("python3")
                .args([
                    "-c",
                    "import os, struct, sys\n\
                     os.setxattr(sys.argv[1], 'system.ntfs_reparse_data', \
                     struct.pack('<IHH', int(sys.argv[2]), 4, 0) + b'\\x01\\x00\\x00\\x00')",
                ])
                .arg(mnt.join(file))
                .arg(tag.to_string()));
        };
        tag("hydrated.docx", 0x9000_101A);
        tag("wof.dll", 0x8000_0017);
        Ok(())
    });

    let mut v = volume(&img);
    let mut got = Vec::new();
    v.read_file(&[b"hydrated.docx".to_vec()], 1 << 20, &mut |_, d| {
        got.extend_from_slice(d);
        Ok(())
    })
    .unwrap();
    assert_eq!(got, vec![0x42u8; 20_000]);
    let r = v.read_file(&[b"wof.dll".to_vec()], 1 << 20, &mut |_, _| Ok(()));
    assert!(
        matches!(&r, Err(Error::Unsupported { found, .. }) if found.contains("WOF")),
        "{r:?}"
    );
    let out = tmp.path().join("out");
    let r = extract(v.as_mut(), &[], &out, &ExtractOptions::default()).unwrap();
    assert_eq!(r.refused_total, 1, "{:?}", r.refused);
    assert!(r.refused[0].contains("wof.dll"), "{:?}", r.refused);
    assert_eq!(
        std::fs::read(out.join("hydrated.docx")).unwrap(),
        vec![0x42u8; 20_000]
    );
    assert_eq!(std::fs::read(out.join("plain.txt")).unwrap(), b"plain");
    assert!(!out.join("wof.dll").exists());
}

/// A 16 MiB NTFS image made with mkntfs and filled by `fill` through an ntfs-3g mount (unmounted
/// before a failure of `fill` is reported).
fn ntfs_image(dir: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> std::path::PathBuf {
    let img = dir.join("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&img));
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("ntfs-3g").arg(&img).arg(&mnt));
    let filled = fill(&mnt);
    run(Command::new("umount").arg(&mnt));
    filled.unwrap();
    img
}

/// A case-sensitive NTFS directory (as WSL and ntfs-3g make them) holding `Report.txt` and
/// `report.txt`: each name reads its own file, alone and in a tree, while a name typed in
/// another case still finds a file when no name matches exactly.
#[test]
fn ntfs_names_that_differ_only_in_case_are_different_files() {
    let tmp = tempfile::tempdir().unwrap();
    let img = ntfs_image(tmp.path(), |mnt| {
        std::fs::create_dir(mnt.join("d"))?;
        std::fs::write(mnt.join("d/Report.txt"), b"upper")?;
        std::fs::write(mnt.join("d/report.txt"), b"lower")?;
        std::fs::write(mnt.join("d/Only.txt"), b"only")
    });
    let mut v = volume(&img);
    let read = |v: &mut Box<dyn Volume>, p: &str| {
        let mut got = Vec::new();
        v.read_file(&split_path(p).unwrap(), 1 << 20, &mut |_, d| {
            got.extend_from_slice(d);
            Ok(())
        })
        .map(|_| got)
    };
    assert_eq!(read(&mut v, "/d/Report.txt").unwrap(), b"upper");
    assert_eq!(read(&mut v, "/d/report.txt").unwrap(), b"lower");
    assert_eq!(read(&mut v, "/D/ONLY.TXT").unwrap(), b"only");
    let out = tmp.path().join("out");
    extract(v.as_mut(), &[], &out, &ExtractOptions::default()).unwrap();
    assert_eq!(std::fs::read(out.join("d/Report.txt")).unwrap(), b"upper");
    assert_eq!(std::fs::read(out.join("d/report.txt")).unwrap(), b"lower");
}
