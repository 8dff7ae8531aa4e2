//! libnbd's Python bindings in relaxed strict mode send invalid requests; the server must answer
//! each with the right error and keep the connection (script: tests/scripts/nbd_errors.py).

mod common;

use std::sync::Arc;

use blockvault_nbd::{BlockSizes, MemoryDevice, ServerConfig};
use common::*;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_error_paths() {
    let python = require_python_nbd();
    count_panics();
    let rw = MemoryDevice::new(4 * MIB).with_block_sizes(BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: MIB as u32,
    });
    rw.write_at(0, &pattern(4096, 1));
    let ro = MemoryDevice::new(MIB).with_read_only(true);
    let mut nofast = ProbeDevice::new(MemoryDevice::new(MIB));
    nofast.fast_zero = false;
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![
            export("rw", Arc::new(rw)),
            export("ro", Arc::new(ro)),
            export("nofast", Arc::new(nofast)),
        ],
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbd_errors.py");
    let out = run(Command::new(python)
        .arg(script)
        .arg(srv.uri("rw"))
        .arg(srv.uri("ro"))
        .arg(srv.uri("nofast")))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python libnbd checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    let passed: usize = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(
        passed >= 60,
        "expected every check to run, got {passed}:\n{stdout}"
    );
    let stats = srv.server.stats().snapshot();
    assert!(stats.errors >= 25, "errors were counted: {stats:?}");
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0, "the server panicked");
}

/// Clients that negotiate no block size (EXPORT_NAME, or GO without INFO_BLOCK_SIZE) are
/// served the protocol defaults on a 4 KiB-block device: 512-byte and byte-granular reads,
/// writes and zeroes at odd offsets, checked against an oracle; then qemu-io (which negotiates
/// and honours the 4 KiB minimum) writes at odd offsets too, and nbdcopy reads it all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_without_block_sizes_get_the_protocol_defaults() {
    let python = require_python_nbd();
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    count_panics();
    // A multiple of 4 KiB: qemu will not open a writable export whose size is not a multiple of
    // the minimum block (the short last block is covered by the unit tests).
    let size = 4 * MIB + 3 * 4096;
    let mem = MemoryDevice::new(size);
    let init: Vec<u8> = (0..size).map(|i| ((i * 7 + 3) % 251) as u8).collect();
    mem.write_at(0, &init);
    let dev = Arc::new(StrictDevice::new(
        mem,
        BlockSizes {
            minimum: 4096,
            preferred: 65536,
            maximum: MIB as u32,
        },
    ));
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let oracle_path = dir.path().join("oracle");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/nbd_default_sizes.py"
    );
    let out = run(Command::new(&python)
        .arg(script)
        .arg(srv.uri("d"))
        .arg(size.to_string())
        .arg("11")
        .arg(&oracle_path))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "default-size checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    let mut oracle = std::fs::read(&oracle_path).unwrap();
    assert_eq!(dev.inner.contents(), oracle, "device equals the oracle");

    // qemu negotiates the 4 KiB minimum and does its own read-modify-write.
    for (off, len, pat) in [(1536u64, 2560u64, 0x5a_u8), (5 * 4096 + 512, 7 * 512, 0xc3)] {
        run_ok(Command::new(&qemu_io).args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pat} {off} {len}"),
            "-c",
            &format!("read -P {pat} {off} {len}"),
            &srv.uri("d"),
        ]))
        .await;
        oracle[off as usize..(off + len) as usize].fill(pat);
    }
    let copy = dir.path().join("copy.raw");
    run_ok(Command::new(&nbdcopy).arg(srv.uri("d")).arg(&copy)).await;
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        oracle,
        "nbdcopy equals the oracle"
    );
    assert_eq!(dev.inner.contents(), oracle);
    assert_eq!(
        dev.violations.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server passed a request breaking the device constraints"
    );
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0, "the server panicked");
}
