//! Real qemu clients (qemu-img, qemu-io) against the server, over TCP and a unix socket.

mod common;

use std::sync::Arc;

use blockvault_nbd::{BlockSizes, Export, MemoryDevice, Server, ServerConfig};
use common::*;
use tokio::process::Command;

fn qemu_img() -> std::path::PathBuf {
    require_tool("qemu-img", "qemu-utils")
}

fn qemu_io() -> std::path::PathBuf {
    require_tool("qemu-io", "qemu-utils")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_every_byte() {
    let (dev, _) = sparse_device(8 * MIB, true);
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![Export::new("disk", dev.clone()).with_description("sparse test disk")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new(qemu_img())
            .args(["convert", "-O", "raw"])
            .arg(srv.uri("disk"))
            .arg(&out),
    )
    .await;
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied.len() as u64, 8 * MIB);
    assert!(
        copied == dev.contents(),
        "converted image differs from the export"
    );
    let stats = srv.server.stats().snapshot();
    assert!(stats.bytes_read > 0 && stats.requests > 0, "{stats:?}");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_reports_the_holes() {
    let (dev, ranges) = sparse_device(8 * MIB, true);
    let srv = TestServer::start(ServerConfig::default(), vec![export("disk", dev)]).await;
    let out = run_ok(
        Command::new(qemu_img())
            .args(["map", "--output=json", "-f", "raw"])
            .arg(srv.uri("disk")),
    )
    .await;
    let map: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut data = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"].as_bool().unwrap() {
            data.push((e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()));
        } else {
            assert!(e["zero"].as_bool().unwrap(), "holes read as zero: {e}");
        }
    }
    // qemu merges adjacent entries; the data ranges must be exactly the written ones
    // (page-aligned already).
    assert_eq!(data, ranges, "qemu-img map: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_then_read_back_on_a_second_connection() {
    let dev = Arc::new(MemoryDevice::new(4 * MIB));
    let srv = TestServer::start(ServerConfig::default(), vec![export("rw", dev.clone())]).await;
    let uri = srv.uri("rw");
    let out = run_ok(
        Command::new(qemu_io())
            .args(["-f", "raw", "-c", "write -P 0xab 4096 64k", "-c", "flush"])
            .arg(&uri),
    )
    .await;
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    let out = run_ok(
        Command::new(qemu_io())
            .args([
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0xab 4096 64k",
                "-c",
                "read -P 0 0 4096",
                "-c",
                "read -P 0 69632 4096",
            ])
            .arg(&uri),
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    assert_eq!(dev.read_vec(4096, 65536), vec![0xab; 65536]);
    assert_eq!(dev.read_vec(0, 4096), vec![0; 4096]);
    assert!(dev.flush_count() >= 1, "qemu-io flush reached the device");

    // Zeroing and discarding through qemu-io go through WRITE_ZEROES and TRIM.
    run_ok(
        Command::new(qemu_io())
            .args([
                "-f",
                "raw",
                "-c",
                "write -z 4096 4k",
                "-c",
                "discard 8192 4k",
            ])
            .arg(&uri),
    )
    .await;
    assert_eq!(dev.read_vec(4096, 4096), vec![0; 4096]);
    let stats = srv.server.stats().snapshot();
    assert!(stats.bytes_written >= 65536, "{stats:?}");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_to_read_only_export_fails() {
    let dev = Arc::new(MemoryDevice::new(MIB).with_read_only(true));
    let srv = TestServer::start(ServerConfig::default(), vec![export("ro", dev.clone())]).await;
    let out = run(Command::new(qemu_io())
        .args(["-f", "raw", "-c", "write -P 0xcd 0 4k"])
        .arg(srv.uri("ro")))
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote 4096/4096"),
        "write must not succeed: {text}"
    );
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    let lower = text.to_lowercase();
    assert!(
        lower.contains("permission denied")
            || lower.contains("read-only")
            || lower.contains("not permitted"),
        "{text}"
    );
    assert_eq!(dev.read_vec(0, 4096), vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_over_unix_socket_with_aligned_block_size() {
    let dev = MemoryDevice::new(2 * MIB).with_block_sizes(BlockSizes {
        minimum: 512,
        preferred: 65536,
        maximum: 1 << 20,
    });
    dev.write_at(512 * 3, &pattern(100_000, 9));
    let dev = Arc::new(dev);
    let server = Server::new(ServerConfig::default()).unwrap();
    server.add_export(export("u", dev.clone())).unwrap();
    let unix = UnixTestServer::start(server).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("u.raw");
    let uri = format!("nbd+unix:///u?socket={}", unix.path.display());
    run_ok(
        Command::new(qemu_img())
            .args(["convert", "-O", "raw", &uri])
            .arg(&out),
    )
    .await;
    assert!(std::fs::read(&out).unwrap() == dev.contents());
    // qemu-img info sees the size.
    let info = run_ok(Command::new(qemu_img()).args(["info", "--output=json", &uri])).await;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(2 * MIB));
    unix.stop().await.unwrap();
    assert!(
        dev.flush_count() >= 1,
        "writable export flushed at shutdown"
    );
}
