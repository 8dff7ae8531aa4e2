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
