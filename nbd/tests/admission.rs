//! Who gets a connection slot: `allow_from` address blocks, the connection cap, and idle
//! clients (negotiating or in transmission) making room for a new one when the server is full.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockvault_nbd::codec::Command;
use blockvault_nbd::{MemoryDevice, Security, ServerConfig};
use common::raw::{RawClient, STRUCTURED};
use common::*;
use tokio::net::TcpStream;
use tokio::process::Command as Process;

const CAP: usize = 32;

fn config(idle_secs: u64) -> ServerConfig {
    ServerConfig {
        max_connections: CAP,
        idle_timeout_secs: idle_secs,
        ..ServerConfig::default()
    }
}

async fn nbdinfo_size(srv: &TestServer) -> std::process::Output {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    run(Process::new(nbdinfo).arg("--size").arg(srv.uri("d"))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_from_limits_client_addresses() {
    let dev = Arc::new(MemoryDevice::new(MIB));
    let deny = Security {
        tls: None,
        allow_from: vec!["10.99.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
    };
    let srv = TestServer::start_secure(
        ServerConfig::default(),
        deny,
        vec![export("d", dev.clone())],
    )
    .await;
    let o = nbdinfo_size(&srv).await;
    assert!(
        !o.status.success(),
        "a client outside --allow-from connected"
    );
    let s = srv.server.stats().snapshot();
    assert!(s.denied_connections >= 1, "{s:?}");
    assert_eq!(
        s.total_connections, 0,
        "the refused client never got a session"
    );
    srv.stop().await.unwrap();

    let allow = Security {
        tls: None,
        allow_from: vec![
            "10.99.0.0/16".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ],
    };
    let srv =
        TestServer::start_secure(ServerConfig::default(), allow, vec![export("d", dev)]).await;
    let o = nbdinfo_size(&srv).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), MIB.to_string());
    srv.stop().await.unwrap();
}

/// 32 clients that connect and then say nothing cannot lock out a 33rd: once they have been
/// negotiating longer than the grace period, the oldest is closed to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_silent_clients_do_not_lock_out_a_33rd() {
    count_panics();
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(config(60), vec![export("d", dev)]).await;
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    let stats = srv.server.stats();
    eventually("all slots taken", || {
        stats.snapshot().active_connections == CAP as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let o = nbdinfo_size(&srv).await;
    assert!(
        o.status.success(),
        "the 33rd client was locked out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = stats.snapshot();
    assert!(s.evicted_connections >= 1, "{s:?}");
    assert_eq!(s.rejected_connections, 0, "{s:?}");
    drop(idle);
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

/// 32 clients in transmission, idle past `idle_timeout_secs`, make room for a 33rd; while slots
/// are free an idle client is never closed, and a client with a request in flight never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transmission_clients_make_room_but_busy_ones_do_not() {
    count_panics();
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(config(1), vec![export("d", dev.clone())]).await;
    let mut clients = Vec::new();
    for _ in 0..CAP {
        clients.push(RawClient::negotiate(srv.addr, "d", STRUCTURED).await.0);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Idle past the timeout but nobody needs the slot: still served.
    let (data, _) = clients[0].read_structured(0, 4096, 0).await.unwrap();
    assert_eq!(data, vec![0u8; 4096]);
    assert_eq!(srv.server.stats().snapshot().evicted_connections, 0);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let o = nbdinfo_size(&srv).await;
    assert!(
        o.status.success(),
        "the 33rd client was locked out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = srv.server.stats().snapshot();
    assert_eq!(s.evicted_connections, 1, "{s:?}");
    // The one closed was idle longest, not the one that just read.
    let (data, _) = clients[0].read_structured(0, 4096, 0).await.unwrap();
    assert_eq!(data, vec![0u8; 4096]);
    drop(clients);
    srv.stop().await.unwrap();

    // Busy clients: each has a read in flight on a gated device; nobody can be closed.
    let probe = Arc::new(ProbeDevice::new(MemoryDevice::new(MIB)));
    probe.gate_offset(8192);
    let srv = TestServer::start(config(0), vec![export("d", probe.clone())]).await;
    let mut busy = Vec::new();
    for _ in 0..CAP {
        let (mut c, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
        let cookie = c.send(Command::Read, 0, 8192, 512, &[]).await;
        busy.push((c, cookie));
    }
    let stats = srv.server.stats();
    eventually("every read in flight", || {
        probe
            .events()
            .iter()
            .filter(|e| e.starts_with("read-start"))
            .count()
            == CAP
    })
    .await;
    let o = nbdinfo_size(&srv).await;
    assert!(!o.status.success(), "a busy client was closed to make room");
    let s = stats.snapshot();
    assert_eq!(s.evicted_connections, 0, "{s:?}");
    assert!(s.rejected_connections >= 1, "{s:?}");
    probe.open_gate();
    for (c, cookie) in &mut busy {
        let chunks = c.chunks(*cookie).await;
        assert!(chunks.iter().all(|ch| ch.error().is_none()), "{chunks:?}");
    }
    drop(busy);
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

/// With `idle_close_secs`, a connection with nothing in flight for that long is closed even
/// when slots are free; one that keeps working is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_close_drops_quiet_connections_only() {
    count_panics();
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(
        ServerConfig {
            idle_close_secs: 1,
            ..ServerConfig::default()
        },
        vec![export("d", dev)],
    )
    .await;
    let (mut quiet, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    let (mut busy, _, _) = RawClient::negotiate(srv.addr, "d", STRUCTURED).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (data, _) = busy.read_structured(0, 4096, 0).await.unwrap();
        assert_eq!(data.len(), 4096);
    }
    assert!(quiet.closed().await, "the quiet connection was closed");
    let (data, _) = busy.read_structured(0, 4096, 0).await.unwrap();
    assert_eq!(data.len(), 4096);
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

/// With slots to make, a client still negotiating (past the grace period) is closed before any
/// quiet client in transmission, even one quiet for longer: a newcomer that has shown no
/// credentials yet must not cut a guest off while an unauthenticated connection can go instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negotiating_client_makes_room_before_a_quiet_guest() {
    count_panics();
    let dev = Arc::new(MemoryDevice::new(MIB));
    let srv = TestServer::start(config(1), vec![export("d", dev)]).await;
    let mut guests = Vec::new();
    for _ in 0..CAP - 1 {
        guests.push(RawClient::negotiate(srv.addr, "d", STRUCTURED).await.0);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let silent = TcpStream::connect(srv.addr).await.unwrap();
    let stats = srv.server.stats();
    eventually("all slots taken", || {
        stats.snapshot().active_connections == CAP as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let o = nbdinfo_size(&srv).await;
    assert!(
        o.status.success(),
        "the 33rd client was locked out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stats.snapshot().evicted_connections, 1);
    for g in &mut guests {
        let (data, _) = g.read_structured(0, 4096, 0).await.unwrap();
        assert_eq!(data, vec![0u8; 4096]);
    }
    drop(silent);
    drop(guests);
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}
