//! `restore files` and `restore vm`: disks built with the real tools (sgdisk, sfdisk, mkfs.ext4,
//! debugfs, mkntfs, ntfs-3g), backed up, and everything extracted compared with what debugfs and
//! ntfscat read from the same images; qcow2 images checked by qemu-img.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};

use crate::common::*;

/// Runs a tool that must be installed (scripts/install-deps.sh) and must succeed.
fn tool(cmd: &mut Command) -> Output {
    let name = format!("{:?}", cmd.get_program());
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install it with scripts/install-deps.sh")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

const LONG: &str = "a-name-that-is-long-enough-to-need-more-than-one-directory-entry-slot-\
                    0123456789012345678901234567890123456789012345678901234567890123456789\
                    0123456789012345678901234567890123456789012345678901234567890123456789-end";

/// A tree with thousands of files, deep directories, long and non-ASCII names, a sparse file,
/// hard links and symlinks (one pointing out of any extraction directory).
fn build_tree(root: &Path, files: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..files {
        let d = root.join(format!("many/d{:02}", i % 40));
        std::fs::create_dir_all(&d).unwrap();
        let len = (i * 37) % 3000;
        std::fs::write(d.join(format!("f{i:05}.txt")), random_bytes(i as u64, len)).unwrap();
    }
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.bin"), random_bytes(7, 5000)).unwrap();
    let names = root.join("names");
    std::fs::create_dir_all(&names).unwrap();
    for (i, n) in [
        "Überweisung ä ö ü.txt",
        "документ.odt",
        "日本語のファイル",
        "emoji 🎉.md",
        LONG,
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(names.join(n), random_bytes(100 + i as u64, 700 + i * 300)).unwrap();
    }
    std::fs::write(root.join("big.bin"), random_bytes(9, 3 << 20)).unwrap();
    // Sparse: 16 MiB apparent, two data islands.
    let f = File::create(root.join("sparse.img")).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&random_bytes(11, 70_000), 1 << 20).unwrap();
    f.write_all_at(&random_bytes(12, 4096), (12 << 20) + 5)
        .unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::hard_link(root.join("big.bin"), root.join("big-hardlink.bin")).unwrap();
    std::os::unix::fs::symlink("../../../../etc/passwd", root.join("names/escape")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("big.bin", root.join("relative-link")).unwrap();
    // A fixed, old modification time, to see that it survives.
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_234_567_890);
    File::options()
        .write(true)
        .open(root.join("big.bin"))
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Every path under `root` (relative) with what it is: ("f", size, mtime) etc.
fn inventory(root: &Path) -> BTreeMap<PathBuf, (char, u64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let kind = if m.file_type().is_symlink() {
                'l'
            } else if m.is_dir() {
                stack.push(p.clone());
                'd'
            } else {
                'f'
            };
            out.insert(
                rel,
                (kind, if kind == 'f' { m.len() } else { 0 }, m.mtime()),
            );
        }
    }
    out
}

/// Asserts that `got` holds exactly what `want` holds: same names and kinds, same bytes, same
/// link targets, same file modification times.
fn assert_same_tree(want: &Path, got: &Path) {
    let (a, b) = (inventory(want), inventory(got));
    let missing: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "trees differ: missing {missing:?}, extra {extra:?}"
    );
    for (rel, (kind, size, mtime)) in &a {
        let (k2, s2, m2) = b[rel];
        assert_eq!((*kind, *size), (k2, s2), "{}", rel.display());
        match kind {
            'f' => {
                assert!(
                    same_content(&want.join(rel), &got.join(rel)),
                    "{} differs",
                    rel.display()
                );
                assert_eq!(*mtime, m2, "mtime of {}", rel.display());
            }
            'l' => assert_eq!(
                std::fs::read_link(want.join(rel)).unwrap(),
                std::fs::read_link(got.join(rel)).unwrap(),
                "{}",
                rel.display()
            ),
            _ => {}
        }
    }
}

fn mkfs_ext4(img: &Path, mib: u64, content: &Path, extra: &[&str]) {
    File::create(img).unwrap().set_len(mib << 20).unwrap();
    tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(content)
            .args(extra)
            .arg(img),
    );
}

/// Copies `fs` into `disk` at byte `at`.
fn place(disk: &Path, fs: &Path, at: u64) {
    let data = std::fs::read(fs).unwrap();
    let f = File::options().write(true).open(disk).unwrap();
    // Keep the image sparse: write only non-zero 64 KiB pieces.
    for (i, c) in data.chunks(65536).enumerate() {
        if c.iter().any(|b| *b != 0) {
            f.write_all_at(c, at + (i * 65536) as u64).unwrap();
        }
    }
}

/// Writes a partition table with sfdisk from its script.
fn sfdisk(disk: &Path, script: &str) {
    let mut sf = Command::new("sfdisk")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk: install fdisk with scripts/install-deps.sh");
    sf.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = sf.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files_json(w: &World, point: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["restore", "files", point, "--disk", "d0"];
    a.extend_from_slice(args);
    w.json(&a)
}

#[test]
fn ext4_tree_in_gpt_extracts_like_debugfs() {
    let w = World::with_repo("64KiB");
    let content = w.path("content");
    build_tree(&content, 3000);
    let fs = w.path("fs.img");
    mkfs_ext4(&fs, 48, &content, &["-N", "4096"]);
    // A fragmented file: free every other small file, then write a big one into the gaps.
    let mut cmds = String::new();
    for i in (0..600).step_by(2) {
        cmds.push_str(&format!("rm /many/d{:02}/f{i:05}.txt\n", i % 40));
    }
    let frag_src = w.path("frag.src");
    std::fs::write(&frag_src, random_bytes(21, 900_000)).unwrap();
    cmds.push_str(&format!("write {} /fragmented.bin\n", frag_src.display()));
    std::fs::write(w.path("cmds"), cmds).unwrap();
    tool(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(w.path("cmds"))
            .arg(&fs),
    );
    let frag = tool(
        Command::new("debugfs")
            .args(["-R", "stat /fragmented.bin"])
            .arg(&fs),
    );
    let extents = String::from_utf8_lossy(&frag.stdout).matches("):").count();
    assert!(
        extents > 3,
        "the test file is not fragmented: {extents} extents"
    );

    // GPT disk: the file system in partition 1 at 1 MiB, a second, empty partition after it.
    let disk = w.path("disk.raw");
    File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    tool(
        Command::new("sgdisk")
            .args([
                "-n",
                "1:2048:+48M",
                "-t",
                "1:8300",
                "-n",
                "2:0:+4M",
                "-t",
                "2:0700",
            ])
            .arg(&disk),
    );
    place(&disk, &fs, 1 << 20);
    let sum = w.backup("vm", &[("d0", &disk)]);
    let point = sum["point"].as_str().unwrap();

    let parts = files_json(&w, point, &["ls"]);
    assert_eq!(parts["scheme"], "gpt", "{parts}");
    let p = &parts["partitions"];
    assert_eq!(p[0]["index"], 1);
    assert_eq!(p[0]["filesystem"], "ext4");
    assert_eq!(p[0]["start"], 1 << 20);
    assert_eq!(p[0]["size"], 48 << 20);
    assert_eq!(p[1]["filesystem"], "empty", "{parts}");

    let root = files_json(&w, point, &["ls", "p1:/"]);
    let names: Vec<&str> = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for n in [
        "many",
        "deep",
        "names",
        "big.bin",
        "sparse.img",
        "lost+found",
        "fragmented.bin",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let big = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "big.bin")
        .unwrap();
    assert_eq!(big["size"], 3 << 20);
    assert_eq!(big["kind"], "file");
    assert_eq!(big["mtime"][0], 1_234_567_890);
    let nonascii = files_json(&w, point, &["ls", "p1:/names"]);
    assert_eq!(
        nonascii["entries"].as_array().unwrap().len(),
        6,
        "{nonascii}"
    );
    // A partition-less path works when the disk has one readable partition.
    let deep = files_json(&w, point, &["ls", "/deep/level0/level1"]);
    assert_eq!(deep["entries"][0]["name"], "level2");

    // The whole file system, beside debugfs's own dump of the same image.
    let oracle = w.path("oracle");
    std::fs::create_dir(&oracle).unwrap();
    tool(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", oracle.display()))
            .arg(&fs),
    );
    let out = w.path("restored");
    let got = files_json(&w, point, &["get", "p1:/", "--to", out.to_str().unwrap()]);
    let report = &got["extracted"][0]["report"];
    assert!(report["files"].as_u64().unwrap() > 2500, "{got}");
    assert_eq!(report["symlinks"], 3);
    assert_same_tree(&oracle, &out);
    // The two names of one file are one file again (debugfs's dump has two copies).
    assert_eq!(report["hard_links"], 1, "{got}");
    assert_eq!(
        std::fs::metadata(out.join("big.bin")).unwrap().ino(),
        std::fs::metadata(out.join("big-hardlink.bin"))
            .unwrap()
            .ino()
    );
    // Sparse stays sparse; the link pointing out was created as a link, nothing outside written.
    assert!(allocated_bytes(&out.join("sparse.img")) < 1 << 20);
    assert_eq!(
        std::fs::read_link(out.join("names/escape")).unwrap(),
        Path::new("../../../../etc/passwd")
    );
    assert_eq!(
        std::fs::metadata(out.join("big.bin")).unwrap().mtime(),
        1_234_567_890
    );

    // One file to standard output, beside debugfs's `cat`.
    for path in ["/fragmented.bin", "/names/документ.odt", "/sparse.img"] {
        let want = tool(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {path}"))
                .arg(&fs),
        )
        .stdout;
        let streamed = w
            .cmd(&[
                "restore",
                "files",
                &point[..8],
                "--disk",
                "d0",
                "get",
                &format!("p1:{path}"),
                "--out",
                "-",
            ])
            .output()
            .unwrap();
        assert!(streamed.status.success(), "{}", stderr(&streamed));
        assert!(streamed.stdout == want, "{path} streamed differs");
    }

    // A subtree into a second directory; extracting it again refuses to replace what is there.
    let sub = w.path("sub");
    w.ok(&[
        "restore",
        "files",
        point,
        "--disk",
        "d0",
        "get",
        "p1:/names",
        "p1:/big.bin",
        "--to",
        sub.to_str().unwrap(),
    ]);
    assert!(same_content(&content.join("big.bin"), &sub.join("big.bin")));
    assert!(same_content(
        &content.join("names").join(LONG),
        &sub.join("names").join(LONG)
    ));
    let again = w.run(&[
        "restore",
        "files",
        point,
        "--disk",
        "d0",
        "get",
        "p1:/big.bin",
        "--to",
        sub.to_str().unwrap(),
    ]);
    assert_eq!(code(&again), 5, "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let missing = w.run(&[
        "restore",
        "files",
        point,
        "--disk",
        "d0",
        "ls",
        "p1:/no/such",
    ]);
    assert_eq!(code(&missing), 8, "{}", stderr(&missing));
    let nopart = w.run(&["restore", "files", point, "--disk", "d0", "ls", "p7:/"]);
    assert_eq!(code(&nopart), 8, "{}", stderr(&nopart));
    assert!(
        stderr(&nopart).contains("p1 (ext2/3/4)"),
        "{}",
        stderr(&nopart)
    );
    let empty = w.run(&["restore", "files", point, "--disk", "d0", "ls", "p2:/"]);
    assert_eq!(code(&empty), 5, "{}", stderr(&empty));
    assert!(
        stderr(&empty).contains("restore mount"),
        "{}",
        stderr(&empty)
    );
}

/// An NTFS image mounted with ntfs-3g (FUSE) while the test fills it; unmounted when dropped.
struct NtfsMount(PathBuf);

impl Drop for NtfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Marks an NTFS directory compressed through ntfs-3g's attribute xattr, so files created in it
/// are stored LZNT1-compressed.
fn set_compressed(dir: &Path) {
    tool(Command::new("python3").args([
        "-c",
        "import os,sys; os.setxattr(sys.argv[1], 'system.ntfs_attrib_be', (0x800 | 0x10).to_bytes(4, 'big'))",
    ]).arg(dir));
}

#[test]
fn ntfs_and_ext4_in_mbr_extract_like_ntfscat_and_debugfs() {
    let w = World::with_repo("64KiB");
    let ntfs = w.path("ntfs.img");
    File::create(&ntfs).unwrap().set_len(32 << 20).unwrap();
    tool(
        Command::new("mkntfs")
            .args(["-F", "-Q", "-q", "-L", "win"])
            .arg(&ntfs),
    );
    let mnt = w.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    tool(
        Command::new("ntfs-3g")
            .args(["-o", "compression"])
            .arg(&ntfs)
            .arg(&mnt),
    );
    let guard = NtfsMount(mnt.clone());
    let docs = mnt.join("Users/ann/Documents");
    std::fs::create_dir_all(&docs).unwrap();
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    let mut put = |rel: &str, data: Vec<u8>| {
        std::fs::write(mnt.join(rel), &data).unwrap();
        expected.push((rel.to_string(), data));
    };
    put(
        "Users/ann/Documents/tiny-resident.txt",
        b"small enough to live in the MFT record".to_vec(),
    );
    put(
        "Users/ann/Documents/Übersicht 2026 – März.xlsx",
        random_bytes(31, 150_000),
    );
    put("Users/ann/Documents/日本語.txt", random_bytes(32, 3000));
    put("Users/ann/big.iso", random_bytes(33, 2 << 20));
    let comp = mnt.join("Compressed");
    std::fs::create_dir(&comp).unwrap();
    set_compressed(&comp);
    let text: Vec<u8> = (0..400_000u32)
        .flat_map(|i| format!("line {i} of a very compressible log file\n").into_bytes())
        .take(400_000)
        .collect();
    put("Compressed/log.txt", text.clone());
    put("Compressed/random.bin", random_bytes(34, 200_000));
    // Compressible, then 128 KiB of zeros (sparse units), then random (units stored raw).
    let mut mixed = text[..100_000].to_vec();
    mixed.extend(vec![0u8; 131072]);
    mixed.extend(random_bytes(35, 70_000));
    put("Compressed/mixed.dat", mixed);
    std::fs::hard_link(
        mnt.join("Users/ann/big.iso"),
        mnt.join("Users/big-link.iso"),
    )
    .unwrap();
    let mtimes: BTreeMap<String, i64> = expected
        .iter()
        .map(|(r, _)| (r.clone(), std::fs::metadata(mnt.join(r)).unwrap().mtime()))
        .collect();
    // A junction (a directory with a mount-point reparse point, as `mklink /J` makes) to
    // C:\Users\ann, written through ntfs-3g's reparse-data xattr.
    let junction = mnt.join("Users/Links");
    std::fs::create_dir(&junction).unwrap();
    tool(Command::new("python3").args([
        "-c",
        r#"import os, struct, sys
sub = "\\??\\C:\\Users\\ann".encode("utf-16-le"); prn = "C:\\Users\\ann".encode("utf-16-le")
buf = struct.pack("<HHHH", 0, len(sub), len(sub) + 2, len(prn)) + sub + b"\0\0" + prn + b"\0\0"
os.setxattr(sys.argv[1], "system.ntfs_reparse_data", struct.pack("<IHH", 0xA0000003, len(buf), 0) + buf)"#,
    ]).arg(&junction));
    drop(guard);
    // ntfs-3g stored the compressed files compressed (ntfsinfo shows the flag on the attribute).
    let info = tool(
        Command::new("ntfsinfo")
            .args(["-F", "/Compressed/log.txt"])
            .arg(&ntfs),
    );
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("Compressed size:"),
        "ntfs-3g did not compress: {}",
        String::from_utf8_lossy(&info.stdout)
    );

    // ext4 in a logical partition of the same disk.
    let small = w.path("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("hello.txt"), b"hello from a logical partition\n").unwrap();
    let ext = w.path("ext.img");
    mkfs_ext4(&ext, 8, &small, &["-b", "4096"]);

    let disk = w.path("disk.raw");
    File::create(&disk).unwrap().set_len(48 << 20).unwrap();
    sfdisk(&disk, "label: dos\nstart=2048, size=65536, type=7\nstart=67584, size=24576, type=5\nstart=69632, size=16384, type=83\n");
    place(&disk, &ntfs, 2048 * 512);
    place(&disk, &ext, 69632 * 512);
    let sum = w.backup("vm", &[("d0", &disk)]);
    let point = sum["point"].as_str().unwrap();

    let parts = files_json(&w, point, &["ls"]);
    assert_eq!(parts["scheme"], "mbr", "{parts}");
    let p = parts["partitions"].as_array().unwrap();
    assert_eq!(p.len(), 2, "{parts}");
    assert_eq!(
        (p[0]["index"].as_u64(), p[0]["filesystem"].as_str()),
        (Some(1), Some("ntfs"))
    );
    assert_eq!(
        (p[1]["index"].as_u64(), p[1]["filesystem"].as_str()),
        (Some(5), Some("ext4"))
    );
    assert_eq!(p[1]["start"], 69632 * 512);

    let docs_ls = files_json(&w, point, &["ls", "p1:/Users/ann/Documents"]);
    let e = docs_ls["entries"].as_array().unwrap();
    assert_eq!(e.len(), 3, "{docs_ls}");
    let x = e
        .iter()
        .find(|e| e["name"] == "Übersicht 2026 – März.xlsx")
        .unwrap();
    assert_eq!(x["size"], 150_000);
    // A case-insensitive lookup, as on Windows.
    files_json(&w, point, &["ls", "p1:/users/ANN"]);
    // The junction is listed as what it is, not as a directory.
    let users = files_json(&w, point, &["ls", "p1:/Users"]);
    let links = users["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "Links")
        .unwrap_or_else(|| panic!("{users}"));
    assert_eq!(links["kind"], "other", "{users}");
    let c = files_json(&w, point, &["ls", "p1:/Compressed"]);
    assert!(
        c["entries"][0]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "compressed"),
        "{c}"
    );

    let out = w.path("out");
    w.ok(&[
        "restore",
        "files",
        point,
        "--disk",
        "d0",
        "get",
        "p1:/",
        "p5:/hello.txt",
        "--to",
        out.to_str().unwrap(),
    ]);
    for (rel, data) in &expected {
        let got = std::fs::read(out.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let oracle = tool(Command::new("ntfscat").arg(&ntfs).arg(format!("/{rel}"))).stdout;
        assert!(
            &oracle == data,
            "ntfscat disagrees with what was written to {rel}"
        );
        assert!(got == oracle, "{rel} differs from ntfscat's");
        assert_eq!(
            std::fs::metadata(out.join(rel)).unwrap().mtime(),
            mtimes[rel],
            "mtime of {rel}"
        );
    }
    assert!(same_content(
        &out.join("Users/big-link.iso"),
        &out.join("Users/ann/big.iso")
    ));
    assert!(
        !out.join("$MFT").exists(),
        "metadata files are not user files"
    );
    assert!(
        !out.join("Users/Links").exists(),
        "a junction is skipped, not extracted as an empty directory"
    );
    assert_eq!(
        std::fs::read(out.join("hello.txt")).unwrap(),
        b"hello from a logical partition\n"
    );
    let ext_oracle = tool(
        Command::new("debugfs")
            .args(["-R", "cat /hello.txt"])
            .arg(&ext),
    )
    .stdout;
    assert_eq!(std::fs::read(out.join("hello.txt")).unwrap(), ext_oracle);
}

#[test]
fn unreadable_partitions_are_named_and_bad_tables_are_errors() {
    let w = World::with_repo("64KiB");
    let disk = w.path("disk.raw");
    File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    tool(
        Command::new("sgdisk")
            .args([
                "-n",
                "1:2048:+4M",
                "-n",
                "2:0:+4M",
                "-n",
                "3:0:+4M",
                "-t",
                "3:8e00",
            ])
            .arg(&disk),
    );
    let f = File::options().write(true).open(&disk).unwrap();
    // Signatures as XFS and LVM2 write them: XFS's superblock magic at the partition start,
    // LVM2's label in the second sector.
    f.write_all_at(b"XFSB", 1 << 20).unwrap();
    let lvm = (1 << 20) + (4 << 20) * 2 + 512;
    f.write_all_at(b"LABELONE", lvm).unwrap();
    f.write_all_at(b"LVM2 001", lvm + 24).unwrap();
    f.write_all_at(b"\x00\x00\x00-FVE-FS-", (1 << 20) + (4 << 20))
        .unwrap();
    let sum = w.backup("vm", &[("d0", &disk)]);
    let point = sum["point"].as_str().unwrap();
    let parts = files_json(&w, point, &["ls"]);
    let found: Vec<&str> = parts["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["filesystem"]["other"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        found,
        ["XFS", "BitLocker (encrypted)", "an LVM2 physical volume"],
        "{parts}"
    );
    for (p, what) in [("p1", "XFS"), ("p2", "BitLocker"), ("p3", "LVM2")] {
        let r = w.run(&[
            "restore",
            "files",
            point,
            "--disk",
            "d0",
            "ls",
            &format!("{p}:/"),
        ]);
        assert_eq!(code(&r), 5, "{}", stderr(&r));
        let e = stderr(&r);
        assert!(e.contains(what) && e.contains("restore mount"), "{e}");
    }

    // An MBR partition running past the end of the disk is listed with the problem and refused.
    let mbr = w.path("mbr.raw");
    File::create(&mbr).unwrap().set_len(8 << 20).unwrap();
    let mut entry = [0u8; 16];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&1_000_000u32.to_le_bytes());
    let f = File::options().write(true).open(&mbr).unwrap();
    f.write_all_at(&entry, 446).unwrap();
    f.write_all_at(&[0x55, 0xaa], 510).unwrap();
    let sum = w.backup("vm2", &[("d0", &mbr)]);
    let point = sum["point"].as_str().unwrap();
    let parts = files_json(&w, point, &["ls"]);
    assert!(
        parts["partitions"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("disk has"),
        "{parts}"
    );
    let r = w.run(&["restore", "files", point, "--disk", "d0", "ls", "p1:/"]);
    assert_ne!(code(&r), 0);
    assert!(
        stderr(&r).contains("past") || stderr(&r).contains("disk has"),
        "{}",
        stderr(&r)
    );

    // MBR with an extended partition: ext4 in the logical partition p5, beside debugfs.
    let small = w.path("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("hello.txt"), b"hello from a logical partition\n").unwrap();
    let ext = w.path("ext.img");
    mkfs_ext4(&ext, 8, &small, &["-b", "4096"]);
    let logical = w.path("logical.raw");
    File::create(&logical).unwrap().set_len(24 << 20).unwrap();
    sfdisk(&logical, "label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=32768, type=5\nstart=10240, size=16384, type=83\n");
    place(&logical, &ext, 10240 * 512);
    let sum = w.backup("vm4", &[("d0", &logical)]);
    let point = sum["point"].as_str().unwrap();
    let parts = files_json(&w, point, &["ls"]);
    let p = parts["partitions"].as_array().unwrap();
    assert_eq!(parts["scheme"], "mbr");
    assert_eq!(p.len(), 2, "{parts}");
    assert_eq!(
        (p[1]["index"].as_u64(), p[1]["filesystem"].as_str()),
        (Some(5), Some("ext4")),
        "{parts}"
    );
    let got = w
        .cmd(&[
            "restore",
            "files",
            point,
            "--disk",
            "d0",
            "get",
            "p5:/hello.txt",
            "--out",
            "-",
        ])
        .output()
        .unwrap();
    let oracle = tool(
        Command::new("debugfs")
            .args(["-R", "cat /hello.txt"])
            .arg(&ext),
    )
    .stdout;
    assert_eq!(got.stdout, oracle);

    // A truncated ext4 file system (its superblock claims more blocks than the disk holds).
    let content = w.path("c");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("a"), b"x").unwrap();
    let fs = w.path("fs.img");
    mkfs_ext4(&fs, 8, &content, &[]);
    let cut = w.path("cut.raw");
    std::fs::write(&cut, &std::fs::read(&fs).unwrap()[..4 << 20]).unwrap();
    let sum = w.backup("vm3", &[("d0", &cut)]);
    let point = sum["point"].as_str().unwrap();
    let r = w.run(&["restore", "files", point, "--disk", "d0", "ls", "/"]);
    assert_ne!(code(&r), 0);
    assert!(stderr(&r).contains("truncated"), "{}", stderr(&r));
}

#[test]
fn restore_vm_writes_every_disk_and_config_and_never_overwrites() {
    let w = World::with_repo("64KiB");
    let (a, b) = (w.path("sys.raw"), w.path("data.raw"));
    make_image(&a, 24 << 20, 41, 8);
    make_image(&b, (9 << 20) + 4096, 42, 5);
    let cfg = w.path("web01.vmcx");
    std::fs::write(&cfg, b"hyper-v configuration bytes").unwrap();
    let sum = w.json(&[
        "backup",
        "--vm",
        "web01",
        "--disk",
        &format!("sys={}", a.display()),
        "--disk",
        &format!("data={}", b.display()),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let point = sum["point"].as_str().unwrap();

    // qcow2: qemu-img finds each image clean and identical to the original disk.
    let to = w.path("restored");
    let r = w.json(&[
        "restore",
        "vm",
        point,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_eq!(r["files"].as_array().unwrap().len(), 3, "{r}");
    for (img, orig) in [("sys.qcow2", &a), ("data.qcow2", &b)] {
        let p = to.join(img);
        tool(
            Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&p),
        );
        tool(
            Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "raw"])
                .arg(&p)
                .arg(orig),
        );
        // Sparse where the disk is zero: no bigger than what the source occupies plus metadata.
        assert!(
            allocated_bytes(&p) <= allocated_bytes(orig) + (2 << 20),
            "{img} is not sparse"
        );
    }
    assert_eq!(
        std::fs::read(to.join("web01.vmcx")).unwrap(),
        b"hyper-v configuration bytes"
    );
    let how = r["bring_up"].as_str().unwrap();
    assert!(
        how.contains("Import-VM")
            && how.contains("-GenerateNewId")
            && how.contains("--format vhdx"),
        "{how}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Again into the same directory: refused, nothing touched; with --overwrite, replaced.
    let before = std::fs::metadata(to.join("sys.qcow2"))
        .unwrap()
        .modified()
        .unwrap();
    let again = w.run(&[
        "restore",
        "vm",
        point,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_eq!(code(&again), 5, "{}", stderr(&again));
    assert!(stderr(&again).contains("already exists") && stderr(&again).contains("--overwrite"));
    assert_eq!(
        std::fs::metadata(to.join("sys.qcow2"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    w.ok(&[
        "restore",
        "vm",
        point,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "qcow2",
        "--overwrite",
        "--disk",
        "data",
    ]);
    tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(to.join("data.qcow2"))
            .arg(&b),
    );

    // raw, one disk: a virt-install line when there is no Hyper-V configuration.
    let img = w.path("linux.raw");
    make_image(&img, 8 << 20, 43, 4);
    let s2 = w.backup("kvm1", &[("root", &img)]);
    let raw_to = w.path("raw");
    let r = w.json(&[
        "restore",
        "vm",
        s2["point"].as_str().unwrap(),
        "--to",
        raw_to.to_str().unwrap(),
    ]);
    assert!(same_content(&img, &raw_to.join("linux.raw")), "{r}");
    let how = r["bring_up"].as_str().unwrap();
    assert!(
        how.starts_with("virt-install --import") && how.contains("linux.raw,format=raw"),
        "{how}"
    );

    // vhdx: qemu-img reads the same bytes.
    let vh = w.path("vhdx");
    w.ok(&[
        "restore",
        "vm",
        point,
        "--to",
        vh.to_str().unwrap(),
        "--format",
        "vhdx",
        "--disk",
        "sys",
    ]);
    tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "vhdx", "-F", "raw"])
            .arg(vh.join("sys.vhdx"))
            .arg(&a),
    );
}

#[test]
fn export_refuses_to_overwrite_without_the_flag() {
    let w = World::with_repo("64KiB");
    let img = w.path("d.raw");
    make_image(&img, 4 << 20, 44, 3);
    let sum = w.backup("vm", &[("d", &img)]);
    let point = sum["point"].as_str().unwrap();
    let out = w.path("out.raw");
    std::fs::write(&out, b"precious").unwrap();
    for format in ["raw", "vhdx", "qcow2"] {
        let r = w.run(&[
            "restore",
            "export",
            point,
            "--disk",
            "d",
            "--out",
            out.to_str().unwrap(),
            "--format",
            format,
        ]);
        assert_eq!(code(&r), 5, "{format}: {}", stderr(&r));
        assert!(stderr(&r).contains("--overwrite"));
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    }
    w.ok(&[
        "restore",
        "export",
        point,
        "--disk",
        "d",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(same_content(&img, &out));
    let q = w.path("out.qcow2");
    w.ok(&[
        "restore",
        "export",
        point,
        "--disk",
        "d",
        "--out",
        q.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    tool(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&q),
    );
    tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&q)
            .arg(&img),
    );
}

/// One small file from a 64 GiB disk in S3, with a cold cache: only the chunks of that file and
/// the file-system metadata on its path are fetched, a small fraction of what is stored.
#[test]
fn one_file_from_a_64gib_disk_in_s3_fetches_only_what_it_needs() {
    use crate::s3_support::{S3Server, S3World};
    let server = S3Server::start();
    let w = S3World::new(&server.endpoint(), "files");
    w.init();
    let content = w.path("content");
    std::fs::create_dir_all(content.join("data")).unwrap();
    for i in 0..6 {
        std::fs::write(
            content.join(format!("data/blob{i}.bin")),
            random_bytes(60 + i, 3 << 20),
        )
        .unwrap();
    }
    let small = random_bytes(70, 5000);
    std::fs::create_dir_all(content.join("home/ann")).unwrap();
    std::fs::write(content.join("home/ann/notes.txt"), &small).unwrap();
    let fs = w.path("fs.img");
    mkfs_ext4(&fs, 32, &content, &["-b", "4096"]);
    let disk = w.path("disk.raw");
    File::create(&disk).unwrap().set_len(64 << 30).unwrap();
    tool(
        Command::new("sgdisk")
            .args(["-n", "1:2048:+32M", "-n", "2:0:0"])
            .arg(&disk),
    );
    place(&disk, &fs, 1 << 20);
    // More data far into the disk, in the second partition.
    File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&random_bytes(80, 6 << 20), 40 << 30)
        .unwrap();
    let args = S3World::backup_args(&disk);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let sum = w.json(&a);
    let stored = sum["bytes_stored"].as_u64().unwrap();
    assert!(stored > 20 << 20, "{sum}");
    let point = sum["point"].as_str().unwrap();

    let out = w.path("out");
    let cold = w
        .cmd_in(
            "cold-cache",
            &[
                "restore",
                "files",
                point,
                "--disk",
                "d0",
                "get",
                "p1:/home/ann/notes.txt",
                "--to",
                out.to_str().unwrap(),
                "--json",
            ],
        )
        .output()
        .unwrap();
    let text = succeeded(&[], cold);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), small);
    let down = v["storage"]["bytes_downloaded"].as_u64().unwrap();
    let requests = v["storage"]["requests"].as_u64().unwrap();
    eprintln!(
        "one 5000-byte file: {requests} requests, {down} bytes downloaded of {stored} stored"
    );
    assert!(down < stored / 4, "fetched {down} of {stored} bytes: {v}");
    assert!(requests < 60, "{requests} requests: {v}");
}

/// Two `restore vm` runs into one directory would share part-file names: the second is refused
/// while the first holds the directory's lock, and the lock file goes with the run.
#[test]
fn restore_vm_refuses_a_directory_another_restore_is_writing() {
    let w = World::with_repo("64KiB");
    let a = w.path("sys.raw");
    make_image(&a, 4 << 20, 43, 3);
    let sum = w.json(&[
        "backup",
        "--vm",
        "web01",
        "--disk",
        &format!("sys={}", a.display()),
    ]);
    let point = sum["point"].as_str().unwrap();
    let to = w.path("restored");
    std::fs::create_dir_all(&to).unwrap();
    let lock = to.join(".blockvault-restore.lock");
    // flock(1) holds the lock as another restore would (-o: only flock holds it, not sleep).
    let mut holder = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "30"])
        .process_group(0)
        .spawn()
        .expect("flock (util-linux)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = w.run(&["restore", "vm", point, "--to", to.to_str().unwrap()]);
    // flock and its sleep, by their process group.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", holder.id())])
        .status();
    let _ = holder.wait();
    assert_eq!(code(&r), 5, "{}", stderr(&r));
    assert!(
        stderr(&r).contains("another restore is writing"),
        "{}",
        stderr(&r)
    );
    assert!(!to.join("sys.raw").exists());
    w.ok(&["restore", "vm", point, "--to", to.to_str().unwrap()]);
    assert!(to.join("sys.raw").exists());
    assert!(!lock.exists(), "the lock file stays behind");
}

/// A file whose data sits in a tampered pack: `get` fails with exit 6 (repository damage) naming
/// the pack, as every other command does, while files elsewhere on the disk still come out.
#[test]
fn a_file_whose_data_is_tampered_with_exits_6() {
    let w = World::with_repo("64KiB");
    let content = w.path("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("big.bin"), random_bytes(61, 1 << 20)).unwrap();
    std::fs::write(content.join("small.txt"), b"still here\n").unwrap();
    let img = w.path("fs.img");
    mkfs_ext4(&img, 16, &content, &["-b", "4096"]);
    // The same disk without big.bin's data: backed up first, it puts everything but that data
    // into packs of its own, so the second backup's new pack holds big.bin's chunks first.
    let blocks = tool(
        Command::new("debugfs")
            .args(["-R", "blocks /big.bin"])
            .arg(&img),
    );
    let blocks: Vec<u64> = String::from_utf8_lossy(&blocks.stdout)
        .split_whitespace()
        .map(|b| b.parse().unwrap())
        .collect();
    assert_eq!(blocks.len(), 256, "{blocks:?}");
    let hollow = w.path("hollow.img");
    std::fs::copy(&img, &hollow).unwrap();
    let f = File::options().write(true).open(&hollow).unwrap();
    for b in &blocks {
        f.write_all_at(&[0u8; 4096], b * 4096).unwrap();
    }
    w.backup("vm", &[("d0", &hollow)]);
    let before = w.packs();
    let point = w.backup("vm", &[("d0", &img)])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let new: Vec<PathBuf> = w
        .packs()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    // The pack's header is 24 bytes (docs/FORMAT.md); its first blob is big.bin's first chunk.
    let mut b = std::fs::read(&new[0]).unwrap();
    b[24 + 100] ^= 0x5a;
    std::fs::write(&new[0], b).unwrap();

    let to = w.path("out");
    let small = w.run(&[
        "restore",
        "files",
        &point,
        "--disk",
        "d0",
        "get",
        "/small.txt",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(code(&small), 0, "{}", stderr(&small));
    assert_eq!(
        std::fs::read(to.join("small.txt")).unwrap(),
        b"still here\n"
    );
    let big = w.run(&[
        "restore",
        "files",
        &point,
        "--disk",
        "d0",
        "get",
        "/big.bin",
        "--to",
        to.to_str().unwrap(),
    ]);
    let pack = new[0].file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(code(&big), 6, "{}", stderr(&big));
    assert!(stderr(&big).contains(&pack), "{}", stderr(&big));
}
