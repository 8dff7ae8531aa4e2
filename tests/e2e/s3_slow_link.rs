//! Slow links: a pack that takes longer to send than the request timeout still uploads (the
//! timeout measures progress, not the whole request), and `--limit-upload` paces the bytes as they
//! are sent instead of bursting whole packs at line rate.

use std::time::{Duration, Instant};

use crate::common::{make_random_image, same_content};
use crate::s3_support::*;

/// The case scaled down: a 16 MiB pack over 1 Mbit/s (128 KiB/s) takes 128 s against a
/// 60 s request timeout (2.1 times). Here a 4 MiB pack crosses a 384 KiB/s link in about 11 s
/// against a 5 s request timeout: a whole-request deadline of 5 s would fail every try.
#[test]
fn s3_pack_slower_than_the_request_timeout_still_uploads() {
    let server = S3Server::start();
    let direct = S3World::new(&server.endpoint(), "slowlink");
    direct.init();
    let link = SlowProxy::start(server.port, Some(384 << 10));
    // Another client (same password) whose only way to the server is the slow link.
    let w = S3World::new(&link.endpoint(), "slowlink");
    let img = w.path("disk.img");
    make_random_image(&img, 4 << 20, 8);
    let disk = format!("d0={}", img.display());
    let a = [
        "backup",
        "--vm",
        "vm1",
        "--pack-size",
        "4MiB",
        "--disk",
        &disk,
        "--json",
    ];
    let t = Instant::now();
    let mut c = w.cmd_in("cache", &a);
    c.env("BLOCKVAULT_S3_REQUEST_TIMEOUT_SECS", "5");
    let o = c.output().unwrap();
    let took = t.elapsed();
    assert_no_secret(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // The link really was that slow: about 4 MiB went through it at 384 KiB/s.
    assert!(link.total() >= 4 << 20, "{} bytes", link.total());
    assert!(took >= Duration::from_secs(9), "took {took:?}");
    // And nothing timed out on the way (no try was abandoned and repeated).
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert!(
        link.total() < (4 << 20) + (512 << 10),
        "{} bytes",
        link.total()
    );
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let point = b["point"].as_str().unwrap();
    let out = direct.path("out.img");
    direct.ok(&[
        "restore",
        "export",
        point,
        "--disk",
        "d0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(same_content(&img, &out));
}

/// The largest number of bytes the proxy received within any `window`.
fn peak(received: &[(Instant, usize)], window: Duration) -> usize {
    let mut best = 0;
    let mut sum = 0;
    let mut lo = 0;
    for hi in 0..received.len() {
        sum += received[hi].1;
        while received[hi].0 - received[lo].0 > window {
            sum -= received[lo].1;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

#[test]
fn s3_upload_limit_paces_the_bytes_as_they_are_sent() {
    let server = S3Server::start();
    let direct = S3World::new(&server.endpoint(), "paced");
    direct.init();
    // No bandwidth limit in the proxy: it only records when the bytes arrive.
    let tap = SlowProxy::start(server.port, None);
    let w = S3World::new(&tap.endpoint(), "paced");
    let img = w.path("disk.img");
    make_random_image(&img, 2 << 20, 9);
    let args = S3World::backup_args(&img);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    w.ok(&[a.as_slice(), &["--limit-upload", "512KiB/s"]].concat());
    let took = t.elapsed();
    let received = tap.received.lock().unwrap().clone();
    let total: usize = received.iter().map(|r| r.1).sum();
    assert!(total >= 2 << 20, "{total}");
    // 2 MiB at 512 KiB/s: 4 s, less the quarter-second burst allowance.
    assert!(took >= Duration::from_millis(3500), "took {took:?}");
    // No 1 MiB pack arrives in one burst (as it did when a put waited for its share and then
    // went at line rate): in any half second about half a second's worth of the limit (256 KiB)
    // plus the burst allowance (128 KiB), pieces in flight and what the sockets coalesce.
    let half = peak(&received, Duration::from_millis(500));
    assert!(
        half <= 640 << 10,
        "{half} bytes arrived within half a second at a 512 KiB/s limit"
    );
}
