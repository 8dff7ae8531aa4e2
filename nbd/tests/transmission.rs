//! Byte-level checks of the transmission phase: reply formats, pipelining, ordering of FLUSH,
//! limits, device failures, graceful shutdown and statistics.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use blockvault_nbd::codec::Command;
use blockvault_nbd::{
    async_trait, proto, BlockDevice, BlockSizes, DeviceError, Export, MemoryDevice, ReadSegment,
    Server, ServerConfig,
};
use bytes::{Buf, Bytes};
use common::raw::{RawClient, Reply, SIMPLE, STRUCTURED};
use common::*;

fn data_device() -> Arc<MemoryDevice> {
    let dev = MemoryDevice::new(MIB);
    dev.write_at(4096, &pattern(4096, 3));
    Arc::new(dev)
}

#[tokio::test]
async fn structured_read_sends_holes_as_hole_chunks() {
    let dev = data_device();
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev.clone())]).await;
    let (mut c, size, flags) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    assert_eq!(size, MIB);
    assert_ne!(flags & proto::TFLAG_SEND_DF, 0);
    let (data, chunks) = c.read_structured(0, 16384, 0).await.unwrap();
    assert_eq!(data, dev.read_vec(0, 16384));
    let kinds: Vec<(u16, u16)> = chunks.iter().map(|c| (c.kind, c.flags)).collect();
    assert_eq!(
        kinds,
        vec![
            (proto::REPLY_TYPE_OFFSET_HOLE, 0),
            (proto::REPLY_TYPE_OFFSET_DATA, 0),
            (proto::REPLY_TYPE_OFFSET_HOLE, proto::REPLY_FLAG_DONE),
        ]
    );
    let mut hole = &chunks[2].payload[..];
    assert_eq!((hole.get_u64(), hole.get_u32()), (8192, 8192));
}

#[tokio::test]
async fn df_read_is_a_single_content_chunk() {
    let dev = data_device();
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    let (data, chunks) = c
        .read_structured(0, 16384, proto::CMD_FLAG_DF)
        .await
        .unwrap();
    assert_eq!(data, dev.read_vec(0, 16384));
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, proto::REPLY_TYPE_OFFSET_DATA);
    assert!(chunks[0].done());
    // An all-hole range may be one hole chunk even with DF.
    let (_, chunks) = c
        .read_structured(65536, 65536, proto::CMD_FLAG_DF)
        .await
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, proto::REPLY_TYPE_OFFSET_HOLE);
}

#[tokio::test]
async fn zero_length_requests_are_answered() {
    let dev = data_device();
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    let cookie = c.send(Command::Read, 0, 100, 0, &[]).await;
    let chunks = c.chunks(cookie).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, proto::REPLY_TYPE_NONE);
    for cmd in [
        Command::Write,
        Command::WriteZeroes,
        Command::Trim,
        Command::Cache,
    ] {
        let cookie = c.send(cmd, 0, MIB, 0, &[]).await;
        assert_eq!(c.status(cookie).await, 0, "{cmd:?}");
    }
    let cookie = c.send(Command::BlockStatus, 0, 0, 0, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EINVAL);
    let (data, _) = c.read_structured(4096, 4096, 0).await.unwrap();
    assert_eq!(data, dev.read_vec(4096, 4096));

    let (mut s, _, _) = RawClient::negotiate(srv.addr, "d", SIMPLE).await;
    let cookie = s.send(Command::Read, 0, 0, 0, &[]).await;
    assert_eq!(s.status(cookie).await, 0);
    let cookie = s.send(Command::Flush, 0, 0, 0, &[]).await;
    assert_eq!(
        s.status(cookie).await,
        0,
        "no stray payload after the empty read"
    );
}

#[tokio::test]
async fn simple_replies_without_structured_negotiation() {
    let dev = data_device();
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev.clone())]).await;
    let (mut c, _, flags) = RawClient::negotiate(srv.addr, "d", SIMPLE).await;
    assert_eq!(flags & proto::TFLAG_SEND_DF, 0);
    let cookie = c.send(Command::Read, 0, 0, 16384, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
    assert_eq!(c.read_exact(16384).await, dev.read_vec(0, 16384));
    // Errors carry no payload in simple mode, and the stream stays in sync.
    let cookie = c.send(Command::Read, 0, MIB, 512, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EINVAL);
    let cookie = c.send(Command::Read, proto::CMD_FLAG_DF, 0, 512, &[]).await;
    assert_eq!(
        c.status(cookie).await,
        proto::EINVAL,
        "DF not advertised without structured"
    );
    let cookie = c.send(Command::Write, 0, 0, 3, b"abc").await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c.send(Command::Read, 0, 0, 3, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
    assert_eq!(c.read_exact(3).await, b"abc");
}

#[tokio::test]
async fn unknown_command_and_bad_flags_are_einval_with_short_messages() {
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", data_device())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    for (cmd, flags) in [
        (Command::Unknown(99), 0),
        (Command::Read, 0x100),
        (Command::Flush, proto::CMD_FLAG_NO_HOLE),
        (Command::BlockStatus, proto::CMD_FLAG_DF),
    ] {
        let cookie = c.send(cmd, flags, 0, 512, &[]).await;
        let chunks = c.chunks(cookie).await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].kind, proto::REPLY_TYPE_ERROR);
        assert_eq!(chunks[0].error(), Some(proto::EINVAL));
        assert!(!chunks[0].error_message().is_empty());
        assert!(chunks[0].payload.len() < 1000);
    }
    let cookie = c.send(Command::Cache, 0, 0, 4096, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
}

struct NoisyFailingDevice;

#[async_trait]
impl BlockDevice for NoisyFailingDevice {
    fn size(&self) -> u64 {
        MIB
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, _: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        if len == 512 {
            // Wrong length: a device bug the server must not pass on.
            return Ok(vec![ReadSegment::Data(Bytes::from_static(b"short"))]);
        }
        Err(DeviceError::io("é".repeat(5000)))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::no_space("store is full"))
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::not_supported("no"))
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Err(DeviceError::io("flush failed"))
    }
}

#[tokio::test]
async fn device_errors_map_to_nbd_errors() {
    let srv = TestServer::start(
        ServerConfig::default(),
        vec![export("f", Arc::new(NoisyFailingDevice))],
    )
    .await;
    let (mut c, _, flags) = RawClient::negotiate(srv.addr, "f", STRUCTURED).await;
    assert_eq!(
        flags & proto::TFLAG_SEND_TRIM,
        0,
        "trim not advertised by default"
    );
    assert_eq!(
        flags & proto::TFLAG_CAN_MULTI_CONN,
        0,
        "writable device: no multi-conn by default"
    );
    let cookie = c.send(Command::Read, 0, 0, 4096, &[]).await;
    let chunks = c.chunks(cookie).await;
    assert_eq!(chunks[0].error(), Some(proto::EIO));
    assert!(
        chunks[0].payload.len() < 1000,
        "long device messages are cut"
    );
    assert!(String::from_utf8(chunks[0].error_message().into_bytes()).is_ok());
    let cookie = c.send(Command::Read, 0, 0, 512, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EIO);
    let cookie = c.send(Command::Write, 0, 0, 4, b"data").await;
    assert_eq!(c.status(cookie).await, proto::ENOSPC);
    let cookie = c.send(Command::WriteZeroes, 0, 0, 4, &[]).await;
    assert_eq!(c.status(cookie).await, proto::ENOTSUP);
    let cookie = c.send(Command::Trim, 0, 0, 4096, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EINVAL, "unadvertised TRIM");
    let cookie = c.send(Command::Flush, 0, 0, 0, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EIO);
    // The default block_status reports everything allocated.
    let cookie = c.send(Command::BlockStatus, 0, 0, 4096, &[]).await;
    let chunks = c.chunks(cookie).await;
    assert_eq!(chunks[0].kind, proto::REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(&chunks[0].payload[4..], &[0, 0, 16, 0, 0, 0, 0, 0]);
    drop(c);
    // The final flush failure is reported by serve.
    assert!(srv.stop().await.is_err());
}

#[tokio::test]
async fn replies_come_in_completion_order_with_exact_cookies() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(0);
    let srv = TestServer::start(ServerConfig::default(), vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    c.send_with_cookie(u64::MAX, Command::Read, 0, 0, 4096, &[])
        .await;
    c.send_with_cookie(0, Command::Read, 0, 4096, 4096, &[])
        .await;
    c.send_with_cookie(0x0123_4567_89ab_cdef, Command::Flush, 0, 0, 0, &[])
        .await;
    let mut first = Vec::new();
    for _ in 0..2 {
        first.push(c.reply().await.cookie());
    }
    first.sort();
    assert_eq!(
        first,
        vec![0, 0x0123_4567_89ab_cdef],
        "unblocked requests answered first"
    );
    probe.open_gate();
    assert_eq!(c.reply().await.cookie(), u64::MAX);
}

#[tokio::test]
async fn flush_waits_for_writes_received_before_it() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(0);
    let srv = TestServer::start(ServerConfig::default(), vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    let w = c.send(Command::Write, 0, 0, 512, &[1u8; 512]).await;
    let f = c.send(Command::Flush, 0, 0, 0, &[]).await;
    eventually("write started", || {
        probe.events().contains(&"write-start 0".into())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !probe.events().contains(&"flush".into()),
        "flush must wait for the earlier write: {:?}",
        probe.events()
    );
    probe.open_gate();
    let order = [c.reply().await.cookie(), c.reply().await.cookie()];
    assert_eq!(order, [w, f]);
    let ev = probe.events();
    let end = ev.iter().position(|e| e == "write-end 0").unwrap();
    let flush = ev.iter().position(|e| e == "flush").unwrap();
    assert!(end < flush, "{ev:?}");
}

#[tokio::test]
async fn fua_reaches_the_device() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    let srv = TestServer::start(ServerConfig::default(), vec![export("p", probe.clone())]).await;
    let (mut c, _, flags) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
    let cookie = c
        .send(Command::Write, proto::CMD_FLAG_FUA, 8192, 4, b"fua!")
        .await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c
        .send(Command::Trim, proto::CMD_FLAG_FUA, 0, 4096, &[])
        .await;
    assert_eq!(c.status(cookie).await, 0);
    // FUA on a read is accepted (and has nothing to persist).
    let cookie = c.send(Command::Read, proto::CMD_FLAG_FUA, 0, 4, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
    let ev = probe.events();
    assert!(ev.contains(&"write-fua-end 8192".into()), "{ev:?}");
    let trim = ev.iter().position(|e| e == "trim 0").unwrap();
    assert_eq!(
        ev[trim + 1],
        "flush",
        "TRIM+FUA is followed by a flush: {ev:?}"
    );
}

#[tokio::test]
async fn requests_in_flight_are_bounded() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(0);
    let config = ServerConfig {
        max_requests_per_connection: 2,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(config, vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    for _ in 0..6 {
        c.send(Command::Read, 0, 0, 512, &[]).await;
    }
    eventually("two reads started", || probe.events().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        probe
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    probe.open_gate();
    let mut cookies = Vec::new();
    for _ in 0..6 {
        let r = c.reply().await;
        cookies.push(r.cookie());
        if let Reply::Chunk(ch) = r {
            assert!(ch.done());
        }
    }
    cookies.sort();
    assert_eq!(cookies, vec![1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn a_panicking_device_answers_eio_and_the_connection_survives() {
    let mut probe = ProbeDevice::new(MemoryDevice::new(MIB));
    probe.panic_offset = Some(8192);
    let probe = Arc::new(probe);
    let srv = TestServer::start(ServerConfig::default(), vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    assert_eq!(
        c.read_structured(8192, 512, 0).await.unwrap_err(),
        proto::EIO
    );
    assert!(c.read_structured(0, 512, 0).await.is_ok());
}

#[tokio::test]
async fn write_over_maximum_payload_is_einval_and_stream_stays_in_sync() {
    let dev = Arc::new(MemoryDevice::new(MIB).with_block_sizes(BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: 65536,
    }));
    let srv = TestServer::start(ServerConfig::default(), vec![export("m", dev.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "m", STRUCTURED).await;
    let big = vec![7u8; 131072];
    let cookie = c.send(Command::Write, 0, 0, big.len() as u32, &big).await;
    assert_eq!(c.status(cookie).await, proto::EINVAL);
    assert_eq!(dev.read_vec(0, 16), vec![0u8; 16]);
    let cookie = c.send(Command::Write, 0, 0, 4, b"good").await;
    assert_eq!(c.status(cookie).await, 0);
    assert_eq!(dev.read_vec(0, 4), b"good");
}

#[tokio::test]
async fn write_zeroes_and_trim_update_block_status() {
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(ServerConfig::default(), vec![export("z", dev.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "z", STRUCTURED).await;
    let cookie = c.send(Command::Write, 0, 0, 16384, &[9u8; 16384]).await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c
        .send(Command::WriteZeroes, proto::CMD_FLAG_NO_HOLE, 0, 4096, &[])
        .await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c
        .send(
            Command::WriteZeroes,
            proto::CMD_FLAG_FAST_ZERO,
            4096,
            4096,
            &[],
        )
        .await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c.send(Command::Trim, 0, 8192, 4096, &[]).await;
    assert_eq!(c.status(cookie).await, 0);
    let ext = c.block_status(0, 65536, 0).await.unwrap();
    assert_eq!(
        ext,
        vec![(4096, 2), (8192, 3), (4096, 0), (65536 - 16384, 3)]
    );
    assert_eq!(
        c.block_status(0, 65536, proto::CMD_FLAG_REQ_ONE)
            .await
            .unwrap(),
        vec![(4096, 2)]
    );
    assert_eq!(
        c.block_status(MIB - 100, 200, 0).await.unwrap_err(),
        proto::EINVAL
    );
    assert_eq!(dev.read_vec(0, 12288), vec![0u8; 12288]);
}

#[tokio::test]
async fn disc_answers_in_flight_requests_then_closes() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(0);
    let srv = TestServer::start(ServerConfig::default(), vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    let w = c.send(Command::Write, 0, 0, 512, &[5u8; 512]).await;
    c.send(Command::Disc, 0, 0, 0, &[]).await;
    eventually("write started", || probe.events().len() == 1).await;
    probe.open_gate();
    assert_eq!(c.status(w).await, 0);
    assert!(c.closed().await);
    assert_eq!(probe.inner.read_vec(0, 512), vec![5u8; 512]);
    eventually("flush at disconnect", || {
        probe.events().contains(&"flush".into())
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_answers_in_flight_requests_and_flushes() {
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(0);
    let config = ServerConfig {
        max_requests_per_connection: 1,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(config, vec![export("p", probe.clone())]).await;
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "p", STRUCTURED).await;
    // One write occupies the only request slot; the reads queue behind it. Send all at once so
    // they sit in the server's read buffer.
    let mut wire = bytes::BytesMut::new();
    let req = |cookie, command, length, payload: &'static [u8]| blockvault_nbd::codec::Request {
        flags: 0,
        command,
        cookie,
        offset: 0,
        length,
        payload: Bytes::from_static(payload),
    };
    req(1, Command::Write, 512, &[6u8; 512]).encode(&mut wire);
    for cookie in 2..5 {
        req(cookie, Command::Read, 512, b"").encode(&mut wire);
    }
    c.write(&wire).await;
    eventually("write started", || probe.events().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let stopping = tokio::spawn(srv.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the in-flight write"
    );
    probe.open_gate();

    let mut status = HashMap::new();
    for _ in 0..4 {
        let r = c.reply().await;
        let cookie = r.cookie();
        let err = match r {
            Reply::Chunk(ch) => {
                let mut chunks = vec![ch.clone()];
                if !ch.done() {
                    chunks.extend(c.chunks(cookie).await);
                }
                chunks.iter().find_map(|c| c.error()).unwrap_or(0)
            }
            Reply::Simple { error, .. } => error,
        };
        status.insert(cookie, err);
    }
    assert_eq!(status[&1], 0, "in-flight write answered: {status:?}");
    assert_eq!(status[&2], 0, "decoded read answered: {status:?}");
    assert_eq!(status[&3], proto::ESHUTDOWN, "{status:?}");
    assert_eq!(status[&4], proto::ESHUTDOWN, "{status:?}");
    assert!(c.closed().await);
    stopping.await.unwrap().unwrap();
    let ev = probe.events();
    assert_eq!(ev.last().map(String::as_str), Some("flush"), "{ev:?}");
    assert_eq!(probe.inner.read_vec(0, 512), vec![6u8; 512]);
}

#[tokio::test]
async fn stats_show_sessions_and_byte_counts() {
    let dev = data_device();
    let srv = TestServer::start(ServerConfig::default(), vec![export("d", dev)]).await;
    let stats = srv.server.stats();
    let (mut c, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    c.read_structured(0, 8192, 0).await.unwrap();
    let cookie = c.send(Command::Write, 0, 0, 100, &[1u8; 100]).await;
    assert_eq!(c.status(cookie).await, 0);
    let cookie = c.send(Command::Read, 0, MIB, 1, &[]).await;
    assert_eq!(c.status(cookie).await, proto::EINVAL);
    let snap = stats.snapshot();
    assert_eq!(snap.active_connections, 1);
    assert_eq!(snap.sessions.len(), 1);
    let s = &snap.sessions[0];
    assert_eq!(s.export.as_deref(), Some("d"));
    assert!(s.peer.starts_with("127.0.0.1:"));
    assert_eq!(
        (s.bytes_read, s.bytes_written, s.requests, s.errors),
        (8192, 100, 3, 1)
    );
    assert_eq!((snap.bytes_read, snap.bytes_written), (8192, 100));
    drop(c);
    eventually("session gone", || stats.snapshot().sessions.is_empty()).await;
}

#[tokio::test]
async fn serve_stream_runs_one_connection() {
    let server = Server::new(ServerConfig::default()).unwrap();
    server.add_export(Export::new("s", data_device())).unwrap();
    assert!(
        server.add_export(Export::new("s", data_device())).is_err(),
        "duplicate name"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    let task = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        s.serve_stream(stream, peer.to_string(), std::future::pending())
            .await
    });
    let (mut c, size, _) = RawClient::negotiate(addr, "s", STRUCTURED).await;
    assert_eq!(size, MIB);
    assert!(c.read_structured(0, 4096, 0).await.is_ok());
    c.send(Command::Disc, 0, 0, 0, &[]).await;
    task.await.unwrap().unwrap();
    assert!(server.remove_export("s").is_some());
    assert!(server.exports().is_empty());
}
