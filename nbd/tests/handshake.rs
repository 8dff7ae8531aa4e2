//! Byte-level checks of the fixed-newstyle handshake and option haggling.

mod common;

use std::sync::Arc;

use blockvault_nbd::codec::{ClientOption, ExportRequest, MetaContextRequest};
use blockvault_nbd::{proto, BlockSizes, Export, MemoryDevice, ServerConfig};
use bytes::Buf;
use common::raw::RawClient;
use common::*;

async fn server() -> TestServer {
    let rw = Arc::new(MemoryDevice::new(MIB).with_block_sizes(BlockSizes {
        minimum: 512,
        preferred: 65536,
        maximum: 1 << 20,
    }));
    let ro = Arc::new(
        MemoryDevice::new(2 * MIB)
            .with_read_only(true)
            .with_trim(false),
    );
    TestServer::start(
        ServerConfig::default(),
        vec![
            Export::new("rw", rw).with_description("writable disk"),
            Export::new("ro", ro),
        ],
    )
    .await
}

async fn opened(srv: &TestServer, client_flags: u32) -> RawClient {
    let mut c = RawClient::connect(srv.addr).await;
    assert_eq!(
        c.greeting().await,
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    );
    c.client_flags(client_flags).await;
    c
}

const FIXED: u32 = proto::FLAG_C_FIXED_NEWSTYLE;
const FIXED_NZ: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

fn go(name: &str, info: Vec<u16>) -> ClientOption {
    ClientOption::Go(ExportRequest {
        name: name.into(),
        info_requests: info,
    })
}

#[tokio::test]
async fn unknown_client_flags_drop_the_connection() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED | 0x4).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn export_name_with_and_without_zero_padding() {
    let srv = server().await;
    for (flags, pad) in [(FIXED_NZ, 0usize), (FIXED, 124)] {
        let mut c = opened(&srv, flags).await;
        c.option(&ClientOption::ExportName("ro".into())).await;
        let b = c.read_exact(10 + pad).await;
        let mut p = &b[..];
        assert_eq!(p.get_u64(), 2 * MIB);
        let tflags = p.get_u16();
        assert_ne!(tflags & proto::TFLAG_READ_ONLY, 0);
        assert_eq!(
            tflags & proto::TFLAG_SEND_DF,
            0,
            "DF needs structured replies"
        );
        assert!(p.iter().all(|&b| b == 0));
        // Transmission works right away: a simple read reply follows.
        let cookie = c
            .send(blockvault_nbd::codec::Command::Read, 0, 0, 512, &[])
            .await;
        assert_eq!(c.status(cookie).await, 0);
        assert_eq!(c.read_exact(512).await, vec![0u8; 512]);
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::ExportName("nope".into())).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn abort_is_acknowledged() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::Abort).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (proto::OPT_ABORT, proto::REP_ACK));
    assert!(c.closed().await);
}

#[tokio::test]
async fn list_names_every_export() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::List).await;
    let replies = c.opt_replies().await;
    assert_eq!(replies.len(), 3);
    let mut names = Vec::new();
    for r in &replies[..2] {
        assert_eq!(r.kind, proto::REP_SERVER);
        let mut p = &r.data[..];
        let n = p.get_u32() as usize;
        names.push((
            String::from_utf8(p[..n].to_vec()).unwrap(),
            String::from_utf8(p[n..].to_vec()).unwrap(),
        ));
    }
    assert_eq!(
        names,
        vec![
            ("rw".to_string(), "writable disk".to_string()),
            ("ro".to_string(), String::new())
        ]
    );
    assert_eq!(replies[2].kind, proto::REP_ACK);
    // LIST with a payload is invalid, and haggling continues.
    c.raw_option(proto::OPT_LIST, b"junk").await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
}

#[tokio::test]
async fn list_can_be_disabled_by_policy() {
    let config = ServerConfig {
        allow_list: false,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(config, vec![export("x", Arc::new(MemoryDevice::new(MIB)))]).await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::List).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_POLICY);
}

#[tokio::test]
async fn starttls_unknown_and_extended_headers_are_refused_and_haggling_continues() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::StartTls).await;
    let r = c.opt_reply().await;
    assert_eq!(
        (r.option, r.kind),
        (proto::OPT_STARTTLS, proto::REP_ERR_POLICY)
    );
    c.raw_option(4242, b"whatever payload").await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (4242, proto::REP_ERR_UNSUP));
    assert!(r.data.len() < 1000);
    c.option(&ClientOption::ExtendedHeaders).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_UNSUP);
    c.option(&ClientOption::StructuredReply).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);
    c.raw_option(proto::OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
    c.option(&go("rw", vec![])).await;
    assert_eq!(c.opt_replies().await.last().unwrap().kind, proto::REP_ACK);
}

#[tokio::test]
async fn info_returns_requested_items_and_go_enters_transmission() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&ClientOption::Info(ExportRequest {
        name: "rw".into(),
        info_requests: vec![
            proto::INFO_NAME,
            proto::INFO_DESCRIPTION,
            proto::INFO_BLOCK_SIZE,
            999,
        ],
    }))
    .await;
    let replies = c.opt_replies().await;
    assert_eq!(replies.last().unwrap().kind, proto::REP_ACK);
    let infos: Vec<&[u8]> = replies[..replies.len() - 1]
        .iter()
        .map(|r| {
            assert_eq!((r.option, r.kind), (proto::OPT_INFO, proto::REP_INFO));
            &r.data[..]
        })
        .collect();
    assert_eq!(infos.len(), 4, "export, name, description, block size");
    let mut export = infos[0];
    assert_eq!(export.get_u16(), proto::INFO_EXPORT);
    assert_eq!(export.get_u64(), MIB);
    let flags = export.get_u16();
    assert_eq!(
        flags,
        proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_CACHE
            | proto::TFLAG_SEND_FAST_ZERO
            | proto::TFLAG_CAN_MULTI_CONN
    );
    assert_eq!(infos[1], [&[0u8, 1][..], b"rw"].concat());
    assert_eq!(infos[2], [&[0u8, 2][..], b"writable disk"].concat());
    let mut bs = infos[3];
    assert_eq!(bs.get_u16(), proto::INFO_BLOCK_SIZE);
    assert_eq!(
        (bs.get_u32(), bs.get_u32(), bs.get_u32()),
        (512, 65536, 1 << 20)
    );

    // INFO leaves haggling open; GO after STRUCTURED_REPLY adds SEND_DF.
    c.option(&ClientOption::StructuredReply).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);
    // A client that does not ask for block sizes is served the protocol defaults, so nothing
    // stricter is announced to it.
    c.option(&go("rw", vec![])).await;
    let replies = c.opt_replies().await;
    assert_eq!(replies.len(), 2, "INFO_EXPORT, ACK: {replies:?}");
    let mut e = &replies[0].data[..];
    e.advance(10);
    assert_eq!(e.get_u16(), flags | proto::TFLAG_SEND_DF);
    // ... and its unaligned 512-byte requests on the 512-byte-minimum device are served.
    let data = pattern(700, 3);
    let cookie = c
        .send(blockvault_nbd::codec::Command::Write, 0, 100, 700, &data)
        .await;
    assert_eq!(c.status(cookie).await, 0);
    let (got, _) = c.read_structured(100, 700, 0).await.unwrap();
    assert_eq!(got, data);
}

#[tokio::test]
async fn go_to_unknown_export_then_known_export() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.option(&go("missing", vec![proto::INFO_BLOCK_SIZE])).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (proto::OPT_GO, proto::REP_ERR_UNKNOWN));
    // Default constraints: no unrequested block size item.
    c.option(&ClientOption::Info(ExportRequest {
        name: "ro".into(),
        info_requests: vec![],
    }))
    .await;
    assert_eq!(c.opt_replies().await.len(), 2);
    c.option(&go("ro", vec![proto::INFO_BLOCK_SIZE])).await;
    let replies = c.opt_replies().await;
    assert_eq!(replies.last().unwrap().kind, proto::REP_ACK);
    let bs = replies
        .iter()
        .find(|r| r.data[..2] == [0, 3])
        .expect("block size info");
    let mut p = &bs.data[2..];
    assert_eq!((p.get_u32(), p.get_u32(), p.get_u32()), (1, 4096, 1 << 25));
    // No zero padding after GO's ACK: a request gets an immediate simple reply.
    let cookie = c
        .send(blockvault_nbd::codec::Command::Flush, 0, 0, 0, &[])
        .await;
    assert_eq!(c.status(cookie).await, 0);
}

#[tokio::test]
async fn malformed_go_is_invalid_not_fatal() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    // Name length larger than the payload.
    c.raw_option(proto::OPT_GO, &[0, 0, 1, 0, b'r', b'w']).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
    // Invalid UTF-8 name.
    c.raw_option(proto::OPT_INFO, &[0, 0, 0, 1, 0xff, 0, 0])
        .await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
    c.option(&go("rw", vec![])).await;
    assert_eq!(c.opt_replies().await.last().unwrap().kind, proto::REP_ACK);
}

#[tokio::test]
async fn meta_context_listing_and_selection() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    let meta = |export: &str, queries: &[&str]| MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|s| s.to_string()).collect(),
    };
    // SET before STRUCTURED_REPLY is invalid.
    c.option(&ClientOption::SetMetaContext(meta(
        "rw",
        &["base:allocation"],
    )))
    .await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
    c.option(&ClientOption::StructuredReply).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);

    for queries in [&[][..], &["base:"][..], &["base:allocation"][..]] {
        c.option(&ClientOption::ListMetaContext(meta("rw", queries)))
            .await;
        let r = c.opt_replies().await;
        assert_eq!(r.len(), 2, "{queries:?}: {r:?}");
        assert_eq!(r[0].kind, proto::REP_META_CONTEXT);
        assert_eq!(
            r[0].data,
            [&[0u8, 0, 0, 0][..], b"base:allocation"].concat()
        );
    }
    // Unknown namespaces and leaves are ignored, not errors.
    c.option(&ClientOption::ListMetaContext(meta(
        "rw",
        &["qemu:dirty-bitmap:x", "base:nope"],
    )))
    .await;
    let r = c.opt_replies().await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, proto::REP_ACK);
    c.option(&ClientOption::ListMetaContext(meta("missing", &[])))
        .await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_UNKNOWN);

    // SET with "base:" selects nothing; with base:allocation returns a nonzero id.
    c.option(&ClientOption::SetMetaContext(meta("rw", &["base:"])))
        .await;
    assert_eq!(c.opt_replies().await.len(), 1);
    c.option(&ClientOption::SetMetaContext(meta(
        "rw",
        &["x-foo:bar", "base:allocation"],
    )))
    .await;
    let r = c.opt_replies().await;
    assert_eq!(r.len(), 2);
    let mut p = &r[0].data[..];
    assert_eq!(p.get_u32(), proto::BASE_ALLOCATION_ID);
    assert_eq!(p, b"base:allocation");

    // The selection was for "rw"; going to "ro" leaves no context, so BLOCK_STATUS is EINVAL.
    c.option(&go("ro", vec![])).await;
    assert_eq!(c.opt_replies().await.last().unwrap().kind, proto::REP_ACK);
    let cookie = c
        .send(blockvault_nbd::codec::Command::BlockStatus, 0, 0, 4096, &[])
        .await;
    assert_eq!(c.status(cookie).await, proto::EINVAL);
}

#[tokio::test]
async fn oversized_option_gets_too_big_and_haggling_continues() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    let big = vec![0x5au8; 100_000];
    c.raw_option(proto::OPT_GO, &big).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (proto::OPT_GO, proto::REP_ERR_TOO_BIG));
    c.option(&go("rw", vec![])).await;
    assert_eq!(c.opt_replies().await.last().unwrap().kind, proto::REP_ACK);
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let srv = server().await;
    let mut c = opened(&srv, FIXED_NZ).await;
    c.write(&[0u8; 16]).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn handshake_timeout_closes_idle_clients() {
    let config = ServerConfig {
        handshake_timeout_secs: 1,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(config, vec![export("x", Arc::new(MemoryDevice::new(MIB)))]).await;
    let mut c = opened(&srv, FIXED_NZ).await;
    let t = std::time::Instant::now();
    assert!(c.closed().await);
    assert!(t.elapsed() >= std::time::Duration::from_millis(900));
    let stats = srv.server.stats();
    eventually("session released", || {
        stats.snapshot().active_connections == 0
    })
    .await;
}
