//! VHDX disks and RCT-driven incrementals, checked against qemu's own VHDX code: images made and
//! changed by `qemu-img` / `qemu-io`, every restore point compared with `qemu-img convert` of the
//! VHDX at that moment, and exported VHDX files checked with `qemu-img check` / `compare`.
// Changed-range lists of one range are lists on purpose, not mistyped ranges.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// Runs an outside tool; a missing tool fails the test with an install hint.
fn tool(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install it with scripts/install-deps.sh (Debian package qemu-utils)")
    });
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_create(path: &Path, size: u64, subformat: &str, block: &str, zero: &str) {
    let o = format!("subformat={subformat},block_size={block},block_state_zero={zero}");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &o,
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
}

/// Applies qemu-io commands to a VHDX.
fn qemu_io(path: &Path, cmds: &[String]) {
    let mut args = vec!["-f", "vhdx"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    tool("qemu-io", &args);
}

fn qemu_to_raw(vhdx: &Path, raw: &Path) {
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            vhdx.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// A changed-ranges document in docs/changed-ranges.md's format. The disk is covered by `queries` successive
/// queries (as a host answering in pieces would); each range is split at query boundaries.
fn rct_doc(size: u64, limit: Option<&str>, new: &str, full: bool, ranges: &[Range<u64>]) -> Value {
    let queries = 3u64;
    let step = (size / queries).div_ceil(512) * 512;
    let mut qs = Vec::new();
    let mut start = 0;
    while start < size {
        let end = (start + step).min(size);
        let (mut offs, mut lens) = (Vec::new(), Vec::new());
        for r in ranges {
            let (a, b) = (r.start.max(start), r.end.min(end));
            if a < b {
                offs.push(a);
                lens.push(b - a);
            }
        }
        qs.push(json!({"byte_offset": start, "byte_length": end - start,
            "processed_byte_length": end - start,
            "changed_byte_offsets": offs, "changed_byte_lengths": lens}));
        start = end;
    }
    json!({"format": "hyperv-rct-changes", "version": 1, "vm_id": "6b1a1f4e-vm",
        "disk": {"path": "D:\\VMs\\app\\disk0.vhdx", "virtual_size": size, "logical_sector_size": 512},
        "limit_id": limit, "new_rct_id": new, "full": full, "queries": qs})
}

fn write_doc(w: &World, name: &str, doc: &Value) -> String {
    let p = w.path(name);
    std::fs::write(&p, doc.to_string()).unwrap();
    p.to_str().unwrap().to_string()
}

/// `backup --json` with extra arguments.
fn backup(w: &World, vm: &str, disks: &[(&str, &Path)], extra: &[&str]) -> Value {
    let specs: Vec<String> = disks
        .iter()
        .map(|(n, p)| format!("{n}={}", p.display()))
        .collect();
    let mut args = vec!["backup", "--vm", vm];
    for s in &specs {
        args.push("--disk");
        args.push(s);
    }
    args.extend_from_slice(extra);
    w.json(&args)
}

fn show(w: &World, point: &str) -> Value {
    w.json(&["points", "show", point])
}

fn point_id(v: &Value) -> String {
    v["point"].as_str().unwrap().to_string()
}

/// Bytes of `ranges` rounded outward to chunks: what an incremental may read at most.
fn rounded(ranges: &[Range<u64>], size: u64) -> u64 {
    let mut slots = std::collections::BTreeSet::new();
    for r in ranges {
        for s in r.start / CHUNK..r.end.div_ceil(CHUNK) {
            slots.insert(s);
        }
    }
    slots
        .iter()
        .map(|s| ((s + 1) * CHUNK).min(size) - s * CHUNK)
        .sum()
}

/// Random writes (pattern and zero) with qemu-io; returns the ranges written.
fn random_writes(path: &Path, rng: &mut impl Rng, size: u64, count: usize) -> Vec<Range<u64>> {
    let mut cmds = Vec::new();
    let mut ranges = Vec::new();
    for _ in 0..count {
        // qemu-io needs sector-aligned requests on VHDX.
        let len = rng.gen_range(1..=(512 * 1024 / 512)) * 512;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        if rng.gen_bool(0.2) {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", rng.gen_range(1..=255)));
        }
        ranges.push(off..off + len);
    }
    qemu_io(path, &cmds);
    ranges
}

/// The exported image of `disk` of `point` equals qemu's raw conversion of `vhdx`.
fn assert_point_matches(w: &World, point: &str, disk: &str, vhdx: &Path, what: &str) {
    let (exp, oracle) = (w.path("export.raw"), w.path("oracle.raw"));
    w.export(point, disk, &exp);
    qemu_to_raw(vhdx, &oracle);
    assert!(
        same_content(&exp, &oracle),
        "{what}: restore point {point} differs from qemu-img convert of {}",
        vhdx.display()
    );
}

fn export_vhdx(w: &World, point: &str, disk: &str, out: &Path) {
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        point,
        "--disk",
        disk,
        "--format",
        "vhdx",
        "--vhdx-block-size",
        "1MiB",
        "--out",
        out.to_str().unwrap(),
    ]);
}

fn assert_vhdx_export_good(w: &World, point: &str, disk: &str, source: &Path) {
    let out = w.path("export.vhdx");
    export_vhdx(w, point, disk, &out);
    tool("qemu-img", &["check", "-f", "vhdx", out.to_str().unwrap()]);
    let c = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "vhdx",
            out.to_str().unwrap(),
            source.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&c.stdout).contains("identical"));
}

fn chain_of_incrementals(subformat: &str, block: &str, zero: &str, rounds: usize, seed: u64) {
    let w = World::with_repo("64KiB");
    let size = 24 * MIB;
    let disk = w.path("disk0.vhdx");
    qemu_create(&disk, size, subformat, block, zero);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    random_writes(&disk, &mut rng, size, 12);
    let doc = write_doc(&w, "rct0.json", &rct_doc(size, None, "rct:0", true, &[]));
    let full = backup(
        &w,
        "app",
        &[("disk0", &disk)],
        &[
            "--changes",
            &format!("disk0={doc}"),
            "--consistency",
            "application",
        ],
    );
    assert_eq!(full["disks"][0]["kind"], "full");
    assert_eq!(full["disks"][0]["rct_id"], "rct:0");
    assert_eq!(full["disks"][0]["consistency"], "application");
    assert_eq!(full["disks"][0]["source"]["format"], "vhdx");
    assert_point_matches(&w, &point_id(&full), "disk0", &disk, "full");
    for i in 1..=rounds {
        let n = rng.gen_range(1..6);
        let ranges = random_writes(&disk, &mut rng, size, n);
        let doc = rct_doc(
            size,
            Some(&format!("rct:{}", i - 1)),
            &format!("rct:{i}"),
            false,
            &ranges,
        );
        let doc = write_doc(&w, &format!("rct{i}.json"), &doc);
        let inc = backup(
            &w,
            "app",
            &[("disk0", &disk)],
            &[
                "--changes",
                &format!("disk0={doc}"),
                "--consistency",
                "crash",
            ],
        );
        let d = &inc["disks"][0];
        assert_eq!(d["kind"], "incremental", "round {i}: {inc}");
        assert_eq!(d["rct_id"], format!("rct:{i}"));
        let read = d["stats"]["bytes_read"].as_u64().unwrap();
        let bound = rounded(&ranges, size);
        assert!(
            read <= bound,
            "round {i}: read {read} bytes, the changed ranges round to {bound}"
        );
        assert!(
            read > 0,
            "round {i}: nothing read although {ranges:?} changed"
        );
        assert_point_matches(
            &w,
            &point_id(&inc),
            "disk0",
            &disk,
            &format!("incremental {i}"),
        );
        if i == rounds / 2 || i == rounds {
            assert_vhdx_export_good(&w, &point_id(&inc), "disk0", &disk);
        }
    }
}

#[test]
fn twenty_incrementals_of_a_dynamic_vhdx_match_qemu() {
    chain_of_incrementals("dynamic", "1M", "on", 20, 1);
}

#[test]
fn incrementals_of_a_fixed_vhdx_without_zero_state_match_qemu() {
    chain_of_incrementals("fixed", "8M", "off", 4, 2);
}

#[test]
fn broken_changed_ranges_fall_back_to_full_with_the_reason() {
    let w = World::with_repo("64KiB");
    let size = 8 * MIB;
    let disk = w.path("d.vhdx");
    qemu_create(&disk, size, "dynamic", "1M", "on");
    qemu_io(&disk, &["write -P 7 1M 1M".into()]);
    // Missing parent: the first backup of the VM cannot be an incremental.
    let doc = write_doc(
        &w,
        "a.json",
        &rct_doc(size, Some("rct:0"), "rct:1", false, &[MIB..2 * MIB]),
    );
    let p = backup(
        &w,
        "vm",
        &[("d", &disk)],
        &["--changes", &format!("d={doc}")],
    );
    let reason = |p: &Value| {
        show(&w, &point_id(p))["disks"][0]["full_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(p["disks"][0]["kind"], "full");
    assert!(reason(&p).contains("rule parent"), "{}", reason(&p));
    assert_eq!(show(&w, &point_id(&p))["disks"][0]["rct_id"], "rct:1");

    let cases: Vec<(Value, &str)> = vec![
        (
            rct_doc(size, Some("rct:zzz"), "rct:2", false, &[0..4096]),
            "rule chain",
        ),
        (
            rct_doc(size, Some("rct:1"), "rct:2", true, &[]),
            "full: true",
        ),
        (rct_doc(size, None, "rct:2", false, &[]), "limit_id null"),
        (
            rct_doc(size * 2, Some("rct:1"), "rct:2", false, &[0..4096]),
            "rule disk-size",
        ),
        (
            {
                let mut d = rct_doc(size, Some("rct:1"), "rct:2", false, &[0..4096]);
                d["queries"][0]["changed_byte_lengths"] = json!([]);
                d
            },
            "rule arrays-equal-length",
        ),
        (
            {
                let mut d = rct_doc(size, Some("rct:1"), "rct:2", false, &[0..4096]);
                d["queries"][1]["byte_offset"] = json!(4096);
                d
            },
            "rule processed-tiles-disk",
        ),
        (
            {
                let mut d = rct_doc(size, Some("rct:1"), "rct:2", false, &[]);
                d["queries"][2]["changed_byte_offsets"] = json!([size - 100]);
                d["queries"][2]["changed_byte_lengths"] = json!([4096]);
                d
            },
            "rule range-inside-disk",
        ),
        (
            {
                let mut d = rct_doc(size, Some("rct:1"), "rct:2", false, &[0..4096]);
                d["disk"]["virtual_disk_id"] = json!("{00000000-1111-2222-3333-444444444444}");
                d
            },
            "rule disk-id",
        ),
    ];
    for (i, (doc, rule)) in cases.iter().enumerate() {
        // Each case follows a point whose rct id is rct:1, so only the broken rule differs.
        let good = write_doc(&w, "reset.json", &rct_doc(size, None, "rct:1", true, &[]));
        backup(
            &w,
            "vm",
            &[("d", &disk)],
            &["--changes", &format!("d={good}")],
        );
        let f = write_doc(&w, &format!("case{i}.json"), doc);
        let p = backup(&w, "vm", &[("d", &disk)], &["--changes", &format!("d={f}")]);
        assert_eq!(p["disks"][0]["kind"], "full", "case {rule}");
        let r = reason(&p);
        assert!(r.contains(rule), "case {rule}: reason is {r:?}");
        // A document that parsed gives its new_rct_id to the full; one that did not, or one
        // about another disk (its size or id), nothing.
        let parsed = ["rule chain", "full: true", "limit_id null"].contains(rule);
        let rid = show(&w, &point_id(&p))["disks"][0]["rct_id"].clone();
        assert_eq!(
            rid,
            if parsed { json!("rct:2") } else { Value::Null },
            "case {rule}"
        );
        assert_point_matches(&w, &point_id(&p), "d", &disk, rule);
    }
    // A full taken because the chain broke still records its new_rct_id, and the chain continues
    // from that full.
    let doc = write_doc(
        &w,
        "wrong.json",
        &rct_doc(size, Some("rct:zzz"), "rct:2", false, &[0..4096]),
    );
    let p = backup(
        &w,
        "vm",
        &[("d", &disk)],
        &["--changes", &format!("d={doc}")],
    );
    assert_eq!(p["disks"][0]["kind"], "full");
    assert_eq!(show(&w, &point_id(&p))["disks"][0]["rct_id"], "rct:2");
    let doc = write_doc(
        &w,
        "next.json",
        &rct_doc(size, Some("rct:2"), "rct:3", false, &[0..4096]),
    );
    qemu_io(&disk, &["write -P 9 0 4k".into()]);
    let p = backup(
        &w,
        "vm",
        &[("d", &disk)],
        &["--changes", &format!("d={doc}")],
    );
    assert_eq!(p["disks"][0]["kind"], "incremental", "{p}");
    assert_eq!(p["disks"][0]["stats"]["bytes_read"], CHUNK);
    assert_point_matches(&w, &point_id(&p), "d", &disk, "after fallback");
}

#[test]
fn a_truncated_vhdx_fails_the_whole_point_naming_the_disk() {
    let w = World::with_repo("64KiB");
    let good = w.path("good.vhdx");
    let bad = w.path("bad.vhdx");
    for p in [&good, &bad] {
        qemu_create(p, 16 * MIB, "dynamic", "1M", "on");
        qemu_io(p, &["write -P 3 0 16M".into()]);
    }
    let len = std::fs::metadata(&bad).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(len - 4 * MIB)
        .unwrap();
    let out = w.run(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("os={}", good.display()),
        "--disk",
        &format!("data={}", bad.display()),
    ]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("disk 'data'") && err.contains("bad.vhdx") && err.contains("offset"),
        "{err}"
    );
    assert_eq!(
        w.json(&["points", "list"]),
        json!([]),
        "a failed backup wrote a point"
    );
    // A damaged header region: refused at open with the structure named.
    let mut img = std::fs::read(&good).unwrap();
    img[64 * 1024..72 * 1024].fill(0xAB);
    img[128 * 1024..136 * 1024].fill(0xAB);
    std::fs::write(&bad, img).unwrap();
    let out = w.run(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("os={}", good.display()),
        "--disk",
        &format!("data={}", bad.display()),
    ]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("disk 'data'") && stderr(&out).contains("header"),
        "{}",
        stderr(&out)
    );
    assert_eq!(w.json(&["points", "list"]), json!([]));
}

#[test]
fn config_files_and_several_disks_round_trip() {
    let w = World::with_repo("64KiB");
    let (a, b) = (w.path("os.vhdx"), w.path("data.raw"));
    qemu_create(&a, 8 * MIB, "dynamic", "1M", "on");
    qemu_io(&a, &["write -P 5 2M 3M".into()]);
    make_image(&b, 4 * MIB, 9, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let vmcx: Vec<u8> = (0..300_000).map(|_| rng.gen()).collect();
    std::fs::write(w.path("app.vmcx"), &vmcx).unwrap();
    std::fs::write(w.path("app.vmgs"), b"guest state").unwrap();
    let p = backup(
        &w,
        "app",
        &[("os", &a), ("data", &b)],
        &[
            "--config",
            w.path("app.vmcx").to_str().unwrap(),
            "--config",
            w.path("app.vmgs").to_str().unwrap(),
        ],
    );
    let id = point_id(&p);
    let m = show(&w, &id);
    let names: Vec<&str> = m["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app.vmcx", "app.vmgs"]);
    assert_eq!(m["disks"][1]["source"]["format"], "raw");
    let one = w.path("one.vmcx");
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        &id,
        "--config",
        "app.vmcx",
        "--out",
        one.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&one).unwrap(), vmcx);
    let dir = w.path("cfg");
    w.ok(&[
        "restore",
        "export",
        "--overwrite",
        &id,
        "--configs-to",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(dir.join("app.vmcx")).unwrap(), vmcx);
    assert_eq!(std::fs::read(dir.join("app.vmgs")).unwrap(), b"guest state");
    let out = w.run(&[
        "restore",
        "export",
        "--overwrite",
        &id,
        "--config",
        "nope",
        "--out",
        one.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert_point_matches(&w, &id, "os", &a, "os disk");
    let e = w.path("data.out");
    w.export(&id, "data", &e);
    assert!(same_content(&e, &b));
    assert_vhdx_export_good(&w, &id, "os", &a);
    // A raw disk exports as VHDX too; qemu reads back the same bytes.
    let out = w.path("data.vhdx");
    export_vhdx(&w, &id, "data", &out);
    tool("qemu-img", &["check", "-f", "vhdx", out.to_str().unwrap()]);
    let c = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vhdx",
            b.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&c.stdout).contains("identical"));
}

#[test]
fn exported_vhdx_leaves_zero_chunks_unallocated() {
    let w = World::with_repo("64KiB");
    let disk = w.path("sparse.vhdx");
    qemu_create(&disk, 64 * MIB, "dynamic", "1M", "on");
    qemu_io(
        &disk,
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 40M 512k".into(),
            "write -z 41M 2M".into(),
        ],
    );
    let p = backup(&w, "s", &[("d", &disk)], &[]);
    let out = w.path("out.vhdx");
    export_vhdx(&w, &point_id(&p), "d", &out);
    let info = w.json(&["disk", "info", out.to_str().unwrap()]);
    assert_eq!(info["bat"]["fully_present"], 2, "{info}");
    assert_eq!(info["virtual_size"], 64 * MIB);
    assert!(std::fs::metadata(&out).unwrap().len() < 8 * MIB);
    assert_vhdx_export_good(&w, &point_id(&p), "d", &disk);
}

#[test]
fn disk_info_reports_qemu_images() {
    let w = World::new();
    let disk = w.path("q.vhdx");
    qemu_create(&disk, 48 * MIB, "dynamic", "2M", "on");
    qemu_io(&disk, &["write -P 1 0 3M".into()]);
    let info = w.json(&["disk", "info", disk.to_str().unwrap()]);
    let q: Value = serde_json::from_slice(
        &tool(
            "qemu-img",
            &["info", "--output=json", disk.to_str().unwrap()],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["virtual_size"], q["virtual-size"]);
    assert_eq!(info["block_size"], 2 * MIB);
    assert_eq!(info["logical_sector_size"], 512);
    assert_eq!(info["bat"]["payload_blocks"], 24);
    assert_eq!(info["bat"]["fully_present"], 2);
    assert_eq!(info["has_parent"], false);
    let text = w.ok(&["disk", "info", disk.to_str().unwrap()]);
    assert!(text.contains("block size        2.00 MiB"), "{text}");
    assert!(
        text.contains("24 payload blocks: 2 fully present"),
        "{text}"
    );
    let raw = w.path("r.raw");
    make_image(&raw, 4 * MIB, 3, 2);
    assert_eq!(
        w.json(&["disk", "info", raw.to_str().unwrap()])["format"],
        "raw"
    );
    let junk = w.path("junk.vhdx");
    let mut bytes = b"vhdxfile".to_vec();
    bytes.resize(300 * 1024, 0);
    std::fs::write(&junk, bytes).unwrap();
    let out = w.run(&["disk", "info", junk.to_str().unwrap()]);
    assert_eq!(code(&out), 5);
    assert!(
        stderr(&out).contains("junk.vhdx") && stderr(&out).contains("offset"),
        "{}",
        stderr(&out)
    );
}
