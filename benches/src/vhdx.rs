//! The reference disk as a dynamic VHDX: a full backup from it, an incremental driven by an RCT
//! changed-ranges file after 640 scattered 256 KiB writes (2 % of an 8 GiB disk), and an export
//! back to VHDX beside `qemu-img convert`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use crate::disk::{run, Reference};
use crate::measure::{best_of, dir_bytes, qemu_img_convert, timed, Sample};

/// Writes in the incremental, and the length of each.
pub const WRITES: u64 = 640;
pub const WRITE_LEN: u64 = 256 << 10;

/// The reference disk changed by the incremental's writes, as both a VHDX and a raw image, with
/// the RCT documents that describe the full backup and the change.
pub struct Change {
    pub vhdx: PathBuf,
    pub raw: PathBuf,
    pub full_rct: PathBuf,
    pub inc_rct: PathBuf,
    pub ranges: Vec<(u64, u64)>,
}

/// `qemu-img convert` of the raw reference image to a dynamic VHDX, kept beside it.
pub fn reference_vhdx(r: &Reference) -> Result<PathBuf> {
    let vhdx = r.raw.with_extension("vhdx");
    let fresh = match (std::fs::metadata(&vhdx), std::fs::metadata(&r.raw)) {
        (Ok(v), Ok(raw)) => v.modified()? >= raw.modified()?,
        _ => false,
    };
    if !fresh {
        let tmp = vhdx.with_extension("vhdx.tmp");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx"])
            .args(["-o", "subformat=dynamic"])
            .arg(&r.raw)
            .arg(&tmp))?;
        std::fs::rename(&tmp, &vhdx)?;
    }
    Ok(vhdx)
}

pub fn rct_doc(
    size: u64,
    limit: Option<&str>,
    new: &str,
    ranges: &[(u64, u64)],
) -> serde_json::Value {
    serde_json::json!({
        "format": "hyperv-rct-changes", "version": 1, "vm_id": "bench-vm",
        "disk": {"path": "D:\\VMs\\bench\\disk.vhdx", "virtual_size": size,
                 "logical_sector_size": 512},
        "limit_id": limit, "new_rct_id": new, "full": false,
        "queries": [{"byte_offset": 0, "byte_length": size, "processed_byte_length": size,
                     "changed_byte_offsets": ranges.iter().map(|r| r.0).collect::<Vec<_>>(),
                     "changed_byte_lengths": ranges.iter().map(|r| r.1).collect::<Vec<_>>()}]})
}

/// Copies both images and applies the same 640 writes to each with `qemu-io`. Offsets are random
/// multiples of `align` that never overlap; each write fills its range with a one-byte pattern,
/// as the recipe in BENCHMARKS.md does.
pub fn make_change(work: &Path, r: &Reference, vhdx: &Path, align: u64) -> Result<Change> {
    let c = Change {
        vhdx: work.join("changed.vhdx"),
        raw: work.join("changed.raw"),
        full_rct: work.join("rct-full.json"),
        inc_rct: work.join("rct-inc.json"),
        ranges: scattered_ranges(r.size, align),
    };
    for (from, to) in [(vhdx, &c.vhdx), (r.raw.as_path(), &c.raw)] {
        run(Command::new("cp").arg("--sparse=always").arg(from).arg(to))?;
    }
    let script: Vec<String> = c
        .ranges
        .iter()
        .enumerate()
        .flat_map(|(i, (off, len))| {
            [
                "-c".to_string(),
                format!("write -q -P {} {off} {len}", 1 + i % 255),
            ]
        })
        .collect();
    for (fmt, file) in [("vhdx", &c.vhdx), ("raw", &c.raw)] {
        run(Command::new("qemu-io")
            .args(["-f", fmt])
            .args(&script)
            .arg(file))?;
    }
    std::fs::write(
        &c.full_rct,
        rct_doc(r.size, None, "rctX:bench:00000001", &[]).to_string(),
    )?;
    std::fs::write(
        &c.inc_rct,
        rct_doc(
            r.size,
            Some("rctX:bench:00000001"),
            "rctX:bench:00000002",
            &c.ranges,
        )
        .to_string(),
    )?;
    Ok(c)
}

fn scattered_ranges(size: u64, align: u64) -> Vec<(u64, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x2d15c);
    let mut out: Vec<(u64, u64)> = Vec::new();
    while (out.len() as u64) < WRITES {
        let off = rng.gen_range(0..(size - WRITE_LEN) / align) * align;
        if out
            .iter()
            .all(|&(o, l)| off + WRITE_LEN <= o || o + l <= off)
        {
            out.push((off, WRITE_LEN));
        }
    }
    out.sort_unstable();
    out
}

/// The sum of each changed range compressed on its own with zstd at `level`: what the
/// incremental's repository growth is measured against.
pub fn compressed_ranges(raw: &Path, ranges: &[(u64, u64)], level: i32) -> Result<u64> {
    let f = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let mut total = 0u64;
    let mut buf = Vec::new();
    for &(off, len) in ranges {
        buf.resize(len as usize, 0);
        f.read_exact_at(&mut buf, off)?;
        total += zstd::bulk::compress(&buf, level)?.len() as u64;
    }
    Ok(total)
}

/// The chunks the changed ranges touch (rounded outward to `chunk` bytes), each compressed on its
/// own with zstd at `level`, all-zero chunks left out: the least a fixed-chunk incremental can
/// store for this change.
pub fn compressed_chunks(raw: &Path, ranges: &[(u64, u64)], chunk: u64, level: i32) -> Result<u64> {
    let f = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let size = f.metadata()?.len();
    let mut slots: Vec<u64> = ranges
        .iter()
        .flat_map(|&(off, len)| off / chunk..(off + len).div_ceil(chunk))
        .collect();
    slots.dedup();
    let mut total = 0u64;
    let mut buf = Vec::new();
    for slot in slots {
        let len = chunk.min(size - slot * chunk);
        buf.resize(len as usize, 0);
        f.read_exact_at(&mut buf, slot * chunk)?;
        if buf.iter().any(|&b| b != 0) {
            total += zstd::bulk::compress(&buf, level)?.len() as u64;
        }
    }
    Ok(total)
}

/// blockvault on the VHDX: full backup, RCT incremental, export of both points. Returns the
/// samples; the incremental's `repo_bytes` is the repository's growth.
pub fn run_blockvault(
    bv: impl Fn() -> Command,
    work: &Path,
    repo: &Path,
    r: &Reference,
    vhdx: &Path,
    c: &Change,
) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let mut cmd = bv();
    cmd.args(["backup", "--vm", "bench-vhdx", "--disk"])
        .arg(format!("d={}", vhdx.display()))
        .arg("--changes")
        .arg(format!("d={}", c.full_rct.display()));
    let mut s = timed("full backup from VHDX", "blockvault", cmd, None, None)?;
    let before = dir_bytes(repo);
    s.repo_bytes = Some(before);
    out.push(s);

    let mut cmd = bv();
    cmd.args(["backup", "--vm", "bench-vhdx", "--disk"])
        .arg(format!("d={}", c.vhdx.display()))
        .arg("--changes")
        .arg(format!("d={}", c.inc_rct.display()));
    let mut s = timed("incremental, 2% change", "blockvault", cmd, None, None)?;
    s.repo_bytes = Some(dir_bytes(repo) - before);
    out.push(s);

    let points = points(&bv)?;
    let (full, inc) = match points.as_slice() {
        [.., a, b] => (a.clone(), b.clone()),
        _ => anyhow::bail!("expected two VHDX restore points, found {points:?}"),
    };
    // The incremental must hold the changed disk, read only through the RCT ranges.
    let check = work.join("check.raw");
    run(bv()
        .args([
            "restore",
            "export",
            &inc,
            "--disk",
            "d",
            "--overwrite",
            "--out",
        ])
        .arg(&check))?;
    crate::measure::check_same(&c.raw, &check)?;
    std::fs::remove_file(&check)?;

    let out_vhdx = work.join("export.vhdx");
    out.push(best_of(|_| {
        let _ = std::fs::remove_file(&out_vhdx);
        let mut cmd = bv();
        cmd.args([
            "restore", "export", &full, "--disk", "d", "--format", "vhdx",
        ])
        .arg("--out")
        .arg(&out_vhdx);
        timed("export to VHDX", "blockvault", cmd, None, None)
    })?);
    qemu_same(&r.raw, "raw", &out_vhdx)?;
    std::fs::remove_file(&out_vhdx)?;

    // What instant restore is held against (docs/BENCHMARKS.md): qemu-img turning the VHDX into
    // a raw disk.
    let out_raw = work.join("qemu-from-vhdx.raw");
    out.push(qemu_img_convert(
        "VHDX to a raw file",
        "qemu-img",
        &["-f", "vhdx", "-O", "raw"],
        vhdx,
        &out_raw,
    )?);
    std::fs::remove_file(&out_raw)?;
    out.push(qemu_img_convert(
        "export to VHDX",
        "qemu-img",
        &["-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic"],
        &r.raw,
        &out_vhdx,
    )?);
    std::fs::remove_file(&out_vhdx)?;

    // Verification of the full point and its RCT incremental: everything, then a 5 % subset
    // (its "repo MiB" column is the bytes it read).
    out.push(best_of(|_| {
        let mut cmd = bv();
        cmd.args(["verify", "--read-data"]);
        timed("verify all data", "blockvault", cmd, None, None)
    })?);
    let report = work.join("verify-subset.json");
    let mut cmd = bv();
    cmd.args(["verify", "--json", "--read-data-subset", "5%"]);
    let mut s = timed("verify 5% subset", "blockvault", cmd, None, Some(&report))?;
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report)?).context("verify --json")?;
    s.repo_bytes = v["bytes_read"].as_u64();
    std::fs::remove_file(&report)?;
    out.push(s);
    Ok(out)
}

fn points(bv: &impl Fn() -> Command) -> Result<Vec<String>> {
    let o = bv()
        .args(["points", "list", "--vm", "bench-vhdx", "--json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("points list --json")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// `qemu-img check` finds `vhdx` clean and `qemu-img compare` finds it equal to `original`.
fn qemu_same(original: &Path, fmt: &str, vhdx: &Path) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["check", "-q", "-f", "vhdx"])
        .arg(vhdx))?;
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", fmt, "-F", "vhdx"])
        .arg(original)
        .arg(vhdx))
}
