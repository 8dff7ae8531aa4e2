//! libnbd's command-line clients: nbdinfo (--map, --list, --json) and nbdcopy (multi-conn).

mod common;

use std::sync::Arc;

use blockvault_nbd::{BlockSizes, Export, MemoryDevice, ServerConfig};
use common::*;
use tokio::process::Command;

fn nbdinfo() -> std::path::PathBuf {
    require_tool("nbdinfo", "libnbd-bin")
}

fn nbdcopy() -> std::path::PathBuf {
    require_tool("nbdcopy", "libnbd-bin")
}

/// Expected `nbdinfo --map` lines for a device of `size` with data in `ranges`.
fn expected_map(size: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(off, len) in ranges {
        if off > pos {
            out.push((pos, off - pos, 3));
        }
        out.push((off, len, 0));
        pos = off + len;
    }
    if pos < size {
        out.push((pos, size - pos, 3));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_matches_the_device_holes() {
    let (dev, ranges) = sparse_device(8 * MIB, true);
    let srv = TestServer::start(ServerConfig::default(), vec![export("disk", dev)]).await;
    let out = run_ok(Command::new(nbdinfo()).arg("--map").arg(srv.uri("disk"))).await;
    let mut got = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 4, "unexpected map line {line:?}");
        let t: u32 = f[2].parse().unwrap();
        match t {
            0 => assert_eq!(f[3], "data"),
            3 => assert_eq!(f[3], "hole,zero"),
            _ => panic!("unexpected type in {line:?}"),
        }
        got.push((f[0].parse().unwrap(), f[1].parse().unwrap(), t));
    }
    assert_eq!(got, expected_map(8 * MIB, &ranges), "nbdinfo --map:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_after_writes_zeroes_and_trim() {
    // Allocation changes made over NBD show up in the map.
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(ServerConfig::default(), vec![export("rw", dev.clone())]).await;
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    run_ok(
        Command::new(qemu_io)
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 1 0 64k",
                "-c",
                "discard 16k 16k",
            ])
            .arg(srv.uri("rw")),
    )
    .await;
    let out = run_ok(Command::new(nbdinfo()).arg("--map").arg(srv.uri("rw"))).await;
    let lines: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let got: Vec<(u64, u64, String)> = lines
        .iter()
        .map(|f| (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 16384, "data".to_string()),
            (16384, 16384, "hole,zero".to_string()),
            (32768, 32768, "data".to_string()),
            (65536, MIB - 65536, "hole,zero".to_string()),
        ],
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_shows_every_export() {
    let a = Arc::new(MemoryDevice::new(MIB));
    let b = Arc::new(MemoryDevice::new(2 * MIB).with_read_only(true));
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![
            Export::new("alpha", a).with_description("first disk"),
            Export::new("beta", b).with_description("second disk"),
        ],
    )
    .await;
    let base = format!("nbd://127.0.0.1:{}", srv.addr.port());
    let out = run_ok(Command::new(nbdinfo()).arg("--list").arg(&base)).await;
    assert!(out.contains("export=\"alpha\":"), "{out}");
    assert!(out.contains("export=\"beta\":"), "{out}");
    assert!(out.contains("description: first disk"), "{out}");
    assert!(out.contains("description: second disk"), "{out}");
    assert!(out.contains("export-size: 1048576"), "{out}");
    assert!(out.contains("export-size: 2097152"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_json_reports_truthful_flags() {
    let rw = Arc::new(MemoryDevice::new(4 * MIB).with_block_sizes(BlockSizes {
        minimum: 512,
        preferred: 65536,
        maximum: 4 * 1024 * 1024,
    }));
    let ro = Arc::new(MemoryDevice::new(MIB).with_read_only(true).with_trim(false));
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![export("rw", rw), export("ro", ro)],
    )
    .await;

    let out = run_ok(Command::new(nbdinfo()).arg("--json").arg(srv.uri("rw"))).await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "rw");
    assert_eq!(e["export-size"], 4 * MIB);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["can_cache"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["is_rotational"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 4 * MIB);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));

    let out = run_ok(Command::new(nbdinfo()).arg("--json").arg(srv.uri("ro"))).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["can_fua"], false);
    assert_eq!(e["block_size_preferred"], 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_rejects_unknown_export() {
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![export("only", Arc::new(MemoryDevice::new(MIB)))],
    )
    .await;
    let out = run(Command::new(nbdinfo()).arg(srv.uri("missing"))).await;
    assert!(!out.status.success());
    // The default (empty) name selects the first export.
    let base = format!("nbd://127.0.0.1:{}", srv.addr.port());
    let text = run_ok(Command::new(nbdinfo()).arg("--size").arg(&base)).await;
    assert_eq!(text.trim(), MIB.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_reads_with_four_connections() {
    let (dev, _) = sparse_device(16 * MIB, true);
    dev.write_at(9 * MIB, &pattern(3 * MIB as usize, 77));
    let srv = TestServer::start(ServerConfig::default(), vec![export("disk", dev.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    run_ok(
        Command::new(nbdcopy())
            .arg("--connections=4")
            // nbdcopy uses no more connections than threads, which default to the core count.
            .arg("--threads=4")
            .arg(srv.uri("disk"))
            .arg(&out),
    )
    .await;
    assert!(
        std::fs::read(&out).unwrap() == dev.contents(),
        "nbdcopy output differs"
    );
    let stats = srv.server.stats().snapshot();
    assert!(
        stats.total_connections >= 4,
        "nbdcopy used multi-conn: {stats:?}"
    );
    assert_eq!(stats.active_connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_writes_with_four_connections() {
    let dev = Arc::new(MemoryDevice::new(16 * MIB));
    let srv = TestServer::start(ServerConfig::default(), vec![export("rw", dev.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 16 * MIB as usize];
    data[..5 * MIB as usize].copy_from_slice(&pattern(5 * MIB as usize, 5));
    data[11 * MIB as usize..12 * MIB as usize].copy_from_slice(&pattern(MIB as usize, 6));
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new(nbdcopy())
            .arg("--connections=4")
            // nbdcopy uses no more connections than threads, which default to the core count.
            .arg("--threads=4")
            .arg("--flush")
            .arg(&src)
            .arg(srv.uri("rw")),
    )
    .await;
    assert!(
        dev.contents() == data,
        "device contents differ from the copied file"
    );
    assert!(dev.flush_count() >= 1);
    assert!(srv.server.stats().snapshot().total_connections >= 4);
}
