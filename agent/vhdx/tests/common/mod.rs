//! Shared helpers for the oracle tests: qemu wrappers, deterministic random
//! content, whole-disk comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault_vhdx::VhdxDisk;
use rand::{Rng, SeedableRng};

pub type TestRng = rand::rngs::StdRng;

pub fn rng(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Runs a command and returns (success, output).
pub fn try_run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img convert -f vhdx -O raw` and return the raw bytes.
pub fn qemu_to_raw(vhdx: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!(
        "{}.oracle.raw",
        vhdx.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&[
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        vhdx.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).ok();
    v
}

/// Reads the whole virtual disk through the reader in `piece`-byte reads.
pub fn read_all(disk: &VhdxDisk, piece: usize) -> Vec<u8> {
    let size = disk.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut p = 0;
    while p < size {
        let n = piece.min(size - p);
        disk.read_at(p as u64, &mut out[p..p + n])
            .unwrap_or_else(|e| panic!("read_at {p}+{n}: {e}"));
        p += n;
    }
    out
}

/// Asserts two disk images are equal, naming the first differing offset.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Asserts every non-zero byte of `content` lies inside `ranges`, and that
/// ranges are sorted, merged and inside the disk.
pub fn assert_ranges_cover(what: &str, ranges: &[std::ops::Range<u64>], content: &[u8]) {
    for w in ranges.windows(2) {
        assert!(
            w[0].end < w[1].start,
            "{what}: ranges not sorted/merged: {ranges:?}"
        );
    }
    if let Some(last) = ranges.last() {
        assert!(last.end <= content.len() as u64, "{what}: range past end");
    }
    let mut covered = vec![false; content.len().div_ceil(512)];
    for r in ranges {
        for s in (r.start / 512)..r.end.div_ceil(512) {
            covered[s as usize] = true;
        }
    }
    for (i, sector) in content.chunks(512).enumerate() {
        if !covered[i] && sector.iter().any(|&b| b != 0) {
            panic!(
                "{what}: non-zero sector {i} (byte {}) outside allocated_ranges {ranges:?}",
                i * 512
            );
        }
    }
}

/// A raw disk image with random sparse content: `n` extents of random
/// lengths at random offsets, some with random bytes and some with a pattern.
pub fn sparse_content(rng: &mut TestRng, size: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for _ in 0..n {
        let len = rng.gen_range(1..(3 << 20)).min(size as usize);
        let off = rng.gen_range(0..=(size as usize - len));
        if rng.gen_bool(0.5) {
            rng.fill(&mut v[off..off + len]);
        } else {
            let b: u8 = rng.gen_range(1..=255);
            v[off..off + len].fill(b);
        }
    }
    v
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

/// Reads a VHDX through libvhdi (`vhdimount`, FUSE) — a second reader independent of qemu.
/// The cross-check is part of the suite: a missing `vhdimount` (apt-get install libvhdi-utils,
/// done by scripts/install-deps.sh) or an unusable FUSE fails the test loudly.
pub fn libvhdi_read(vhdx: &Path) -> Vec<u8> {
    assert!(
        have("vhdimount"),
        "vhdimount is not installed: run scripts/install-deps.sh (apt-get install libvhdi-utils)"
    );
    let mnt = tempfile::tempdir().expect("tempdir");
    let (ok, out) = try_run(Command::new("vhdimount").arg(vhdx).arg(mnt.path()));
    assert!(
        ok,
        "vhdimount {} failed (is /dev/fuse usable?): {out}",
        vhdx.display()
    );
    let data = std::fs::read(mnt.path().join("vhdi1"));
    let _ = Command::new("fusermount")
        .arg("-u")
        .arg(mnt.path())
        .output();
    data.unwrap_or_else(|e| panic!("reading {} through vhdimount: {e}", vhdx.display()))
}
