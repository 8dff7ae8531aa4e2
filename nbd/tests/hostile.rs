//! Hostile and broken clients: garbage, truncation, huge lengths, connection floods. The server
//! must never panic, must drop only the offending connection, and must keep serving others.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockvault_nbd::codec::Command;
use blockvault_nbd::{proto, MemoryDevice, ServerConfig};
use common::raw::{RawClient, STRUCTURED};
use common::*;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server(config: ServerConfig) -> (TestServer, Arc<MemoryDevice>) {
    let dev = Arc::new(MemoryDevice::new(4 * MIB));
    dev.write_at(0, &pattern(65536, 1));
    let srv = TestServer::start(config, vec![export("disk", dev.clone())]).await;
    (srv, dev)
}

/// A well-behaved client negotiates and reads correct data.
async fn good_client_works(srv: &TestServer, dev: &MemoryDevice) {
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    let (data, _) = c.read_structured(0, 65536, 0).await.unwrap();
    assert_eq!(data, dev.read_vec(0, 65536));
    c.send(Command::Disc, 0, 0, 0, &[]).await;
}

async fn handshaken(srv: &TestServer) -> RawClient {
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_every_stage_closes_only_that_connection() {
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for round in 0..60 {
        let garbage: Vec<u8> = (0..rng.gen_range(1..4096)).map(|_| rng.gen()).collect();
        let mut c = match round % 3 {
            // Instead of client flags.
            0 => {
                let mut c = RawClient::connect(srv.addr).await;
                c.greeting().await;
                c
            }
            // Instead of an option.
            1 => handshaken(&srv).await,
            // Instead of a request.
            _ => RawClient::negotiate(srv.addr, "disk", STRUCTURED).await.0,
        };
        // The server may close before taking everything; a failed write is fine.
        let _ = c.stream.write_all(&garbage).await;
        // Random bytes rarely form a valid frame; either the server closes, or it answered
        // something and waits for more. Both are fine as long as it does not hang or panic.
        let _ = tokio::time::timeout(Duration::from_millis(200), c.closed()).await;
    }
    good_client_works(&srv, &dev).await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_handshakes_and_requests() {
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    // Hang up before, during and after the greeting.
    drop(TcpStream::connect(srv.addr).await.unwrap());
    let mut c = RawClient::connect(srv.addr).await;
    c.read_exact(5).await;
    drop(c);
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.write(&[0, 0]).await;
    drop(c);
    // Partial option header; option payload cut short.
    let mut c = handshaken(&srv).await;
    c.write(&proto::IHAVEOPT.to_be_bytes()[..6]).await;
    drop(c);
    let mut c = handshaken(&srv).await;
    let mut opt = Vec::new();
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&100u32.to_be_bytes());
    opt.extend_from_slice(&[0u8; 10]);
    c.write(&opt).await;
    drop(c);
    // Partial request header; write payload cut short.
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    c.write(&proto::REQUEST_MAGIC.to_be_bytes()).await;
    c.write(&[0u8; 6]).await;
    drop(c);
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    let mut req = bytes::BytesMut::new();
    blockvault_nbd::codec::Request {
        flags: 0,
        command: Command::Write,
        cookie: 9,
        offset: 0,
        length: 4096,
        payload: bytes::Bytes::new(),
    }
    .encode(&mut req);
    c.write(&req).await;
    c.write(&[0xffu8; 100]).await;
    drop(c);
    let stats = srv.server.stats();
    eventually("all broken connections cleaned up", || {
        stats.snapshot().active_connections == 0
    })
    .await;
    assert_eq!(
        dev.read_vec(0, 100),
        pattern(100, 1),
        "partial write not applied"
    );
    good_client_works(&srv, &dev).await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_option_length_is_refused_without_reading_it() {
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    for code in [proto::OPT_GO, proto::OPT_SET_META_CONTEXT, 0xdead] {
        let mut c = handshaken(&srv).await;
        let mut opt = Vec::new();
        opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&code.to_be_bytes());
        opt.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write(&opt).await;
        // The answer comes before any payload byte is sent: nothing is buffered for it.
        let r = c.opt_reply().await;
        assert_eq!((r.option, r.kind), (code, proto::REP_ERR_TOO_BIG));
        c.write(&[0u8; 65536]).await;
    }
    // EXPORT_NAME cannot be answered with an error: the session ends.
    let mut c = handshaken(&srv).await;
    let mut opt = Vec::new();
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write(&opt).await;
    assert!(c.closed().await);
    good_client_works(&srv, &dev).await;
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_write_length_closes_the_connection() {
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    for length in [u32::MAX, proto::MAX_WRITE_PAYLOAD + 1] {
        let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
        let mut req = bytes::BytesMut::new();
        blockvault_nbd::codec::Request {
            flags: 0,
            command: Command::Write,
            cookie: 1,
            offset: 0,
            length,
            payload: bytes::Bytes::new(),
        }
        .encode(&mut req);
        c.write(&req).await;
        assert!(
            c.closed().await,
            "server closes on a {length}-byte write header"
        );
    }
    // Exactly 32 MiB is a legal payload: it is read in full and answered (ENOSPC, as it runs
    // past the 4 MiB export), and the stream stays in sync.
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    let big = vec![1u8; proto::MAX_WRITE_PAYLOAD as usize];
    let cookie = c.send(Command::Write, 0, 0, big.len() as u32, &big).await;
    assert_eq!(c.status(cookie).await, proto::ENOSPC);
    let cookie = c.send(Command::Flush, 0, 0, 0, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
    good_client_works(&srv, &dev).await;
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_beyond_the_cap() {
    count_panics();
    const CAP: usize = 8;
    const FLOOD: usize = 1100;
    let config = ServerConfig {
        max_connections: CAP,
        // The held connections stay in negotiation; making room by closing them is tested in
        // admission.rs.
        evict_idle: false,
        ..ServerConfig::default()
    };
    let (srv, dev) = server(config).await;
    let addr = srv.addr;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        tasks.spawn(async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
            else {
                return (false, false, None);
            };
            let mut g = [0u8; proto::GREETING_LEN];
            match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut g)).await {
                Ok(Ok(_)) => (true, true, Some(s)),
                _ => (true, false, None),
            }
        });
    }
    let (mut connected, mut greeted) = (0, 0);
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (c, ok, stream) = r.unwrap();
        connected += usize::from(c);
        if ok {
            greeted += 1;
            held.push(stream);
        }
    }
    assert_eq!(
        greeted, CAP,
        "exactly the cap is served while connections are held"
    );
    assert!(
        connected > 1000,
        "the flood reached the server: {connected}"
    );
    let stats = srv.server.stats();
    assert_eq!(stats.snapshot().active_connections, CAP as u64);
    eventually("every extra connection rejected", || {
        stats.snapshot().rejected_connections >= (connected - CAP) as u64
    })
    .await;
    drop(held);
    eventually("slots released", || {
        stats.snapshot().active_connections == 0
    })
    .await;
    good_client_works(&srv, &dev).await;
    // A real client too.
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let out = run_ok(
        tokio::process::Command::new(nbdinfo)
            .arg("--size")
            .arg(srv.uri("disk")),
    )
    .await;
    assert_eq!(out.trim(), (4 * MIB).to_string());
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_client_is_unaffected_by_concurrent_bad_ones() {
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    let addr = srv.addr;
    let bad = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let garbage: Vec<u8> = (0..rng.gen_range(1..512)).map(|_| rng.gen()).collect();
            if let Ok(mut s) = TcpStream::connect(addr).await {
                let mut g = [0u8; proto::GREETING_LEN];
                let _ = s.read_exact(&mut g).await;
                let _ = s.write_all(&garbage).await;
            }
        }
    });
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    let expected = dev.read_vec(0, 65536);
    for i in 0..200u64 {
        let (data, _) = c.read_structured(0, 65536, 0).await.unwrap();
        assert_eq!(data, expected, "read {i}");
    }
    bad.await.unwrap();
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_after_a_valid_negotiation() {
    // Well-framed requests with random fields: every one is answered, none kills the session.
    count_panics();
    let (srv, dev) = server(ServerConfig::default()).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "disk", STRUCTURED).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    for i in 0..500u64 {
        let command = Command::from(rng.gen_range(0u16..10));
        if command == Command::Disc {
            continue;
        }
        let flags: u16 = if rng.gen_bool(0.5) {
            rng.gen_range(0..32)
        } else {
            rng.gen()
        };
        let offset: u64 = match rng.gen_range(0..3) {
            0 => rng.gen_range(0..4 * MIB),
            1 => rng.gen(),
            _ => 4 * MIB - rng.gen_range(0..4096),
        };
        let length: u32 = match rng.gen_range(0..3) {
            0 => rng.gen_range(0..65536),
            1 => 0,
            _ => rng.gen(),
        };
        let length = if command == Command::Write {
            length % 100_000
        } else {
            length
        };
        let payload = if command == Command::Write {
            vec![0x33u8; length as usize]
        } else {
            Vec::new()
        };
        c.send_with_cookie(i, command, flags, offset, length, &payload)
            .await;
        // Every request gets exactly one complete reply with its own cookie.
        loop {
            match c.reply().await {
                common::raw::Reply::Chunk(ch) => {
                    assert_eq!(ch.cookie, i);
                    assert!(ch.payload.len() < 64 * 1024 * 1024);
                    if ch.done() {
                        break;
                    }
                }
                common::raw::Reply::Simple { cookie, .. } => {
                    assert_eq!(cookie, i);
                    break;
                }
            }
        }
    }
    good_client_works(&srv, &dev).await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}
