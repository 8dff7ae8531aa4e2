//! NBD over TLS with real clients: qemu-img (GnuTLS, `tls-creds-x509` / `tls-creds-psk`) and
//! libnbd's nbdinfo/nbdcopy (`nbds://` URIs). Certificates are made here with certtool, keys
//! with psktool; every client must succeed with the right credentials and fail with wrong or
//! missing ones, and a plaintext client is refused before it touches data.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockvault_nbd::codec::{ClientOption, ExportRequest};
use blockvault_nbd::{proto, MemoryDevice, Security, ServerConfig, TlsConfig};
use common::raw::RawClient;
use common::*;
use tokio::process::Command;

const SIZE: u64 = 4 * MIB;

fn certtool() -> PathBuf {
    require_tool("certtool", "gnutls-bin")
}

fn sh(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("running a credential tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn private(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, in qemu's
/// layouts: `server/` (server-cert, server-key, ca-cert) and `client/` (client-cert,
/// client-key, ca-cert). Returns (server dir, client dir).
fn make_pki(root: &Path, name: &str) -> (PathBuf, PathBuf) {
    let tool = certtool();
    let dir = root.join(name);
    let (srv, cli) = (dir.join("server"), dir.join("client"));
    std::fs::create_dir_all(&srv).unwrap();
    std::fs::create_dir_all(&cli).unwrap();
    let ca_key = dir.join("ca-key.pem");
    let ca_cert = dir.join("ca-cert.pem");
    sh(std::process::Command::new(&tool)
        .args(["--generate-privkey", "--outfile"])
        .arg(&ca_key));
    std::fs::write(
        dir.join("ca.info"),
        format!("cn = {name} test CA\nca\ncert_signing_key\nexpiration_days = 30\n"),
    )
    .unwrap();
    sh(std::process::Command::new(&tool)
        .args(["--generate-self-signed", "--load-privkey"])
        .arg(&ca_key)
        .arg("--template")
        .arg(dir.join("ca.info"))
        .arg("--outfile")
        .arg(&ca_cert));
    for (who, out, template) in [
        (
            "server",
            &srv,
            "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n\
             encryption_key\nsigning_key\nexpiration_days = 30\n",
        ),
        (
            "client",
            &cli,
            "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n",
        ),
    ] {
        let key = out.join(format!("{who}-key.pem"));
        sh(std::process::Command::new(&tool)
            .args(["--generate-privkey", "--outfile"])
            .arg(&key));
        private(&key);
        let info = dir.join(format!("{who}.info"));
        std::fs::write(&info, template).unwrap();
        sh(std::process::Command::new(&tool)
            .args(["--generate-certificate", "--load-privkey"])
            .arg(&key)
            .arg("--load-ca-certificate")
            .arg(&ca_cert)
            .arg("--load-ca-privkey")
            .arg(&ca_key)
            .arg("--template")
            .arg(&info)
            .arg("--outfile")
            .arg(out.join(format!("{who}-cert.pem"))));
        std::fs::copy(&ca_cert, out.join("ca-cert.pem")).unwrap();
    }
    (srv, cli)
}

/// A `keys.psk` for `user` made by psktool, in its own directory (qemu's tls-creds-psk layout).
fn make_psk(root: &Path, name: &str, user: &str) -> PathBuf {
    let tool = require_tool("psktool", "gnutls-bin");
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.psk");
    sh(std::process::Command::new(tool)
        .args(["-u", user, "-p"])
        .arg(&file));
    private(&file);
    file
}

async fn device_server(security: Security) -> (TestServer, Vec<u8>) {
    let dev = MemoryDevice::new(SIZE);
    let data = pattern(SIZE as usize, 42);
    dev.write_at(0, &data);
    let srv = TestServer::start_secure(
        ServerConfig::default(),
        security,
        vec![export("d", Arc::new(dev))],
    )
    .await;
    (srv, data)
}

fn tls_security(tls: TlsConfig) -> Security {
    Security {
        tls: Some(tls),
        allow_from: Vec::new(),
    }
}

/// qemu-img with a TLS credentials object; returns the process output.
async fn qemu_img(
    args: &[&str],
    object: Option<&str>,
    port: u16,
    out: Option<&Path>,
) -> std::process::Output {
    let qemu = require_tool("qemu-img", "qemu-utils");
    let mut opts = format!("driver=nbd,host=127.0.0.1,port={port},export=d");
    let mut cmd = Command::new(qemu);
    cmd.args(args);
    if let Some(o) = object {
        cmd.arg("--object").arg(o);
        opts.push_str(",tls-creds=tls0");
    }
    cmd.arg("--image-opts").arg(opts);
    if let Some(o) = out {
        cmd.arg(o);
    }
    run(&mut cmd).await
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A raw client on a TLS-requiring server: options get ERR_TLS_REQD, EXPORT_NAME closes,
/// nothing about the exports leaks.
async fn plaintext_is_refused(srv: &TestServer) {
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .await;
    for opt in [
        ClientOption::List,
        ClientOption::StructuredReply,
        ClientOption::Go(ExportRequest {
            name: "d".into(),
            info_requests: vec![],
        }),
    ] {
        c.option(&opt).await;
        let r = c.opt_reply().await;
        assert_eq!(r.kind, proto::REP_ERR_TLS_REQD, "{opt:?}");
    }
    c.option(&ClientOption::ExportName("d".into())).await;
    assert!(
        c.closed().await,
        "EXPORT_NAME without TLS must end the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_with_qemu_and_libnbd() {
    count_panics();
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let tmp = tempfile::tempdir().unwrap();
    let (srv_dir, cli_dir) = make_pki(tmp.path(), "good");
    let (_, other_cli) = make_pki(tmp.path(), "other");
    let tls = TlsConfig::from_x509_dir(&srv_dir).unwrap();
    assert!(matches!(
        tls.kind(),
        blockvault_nbd::TlsKind::X509 { client_ca: Some(_) }
    ));
    let (srv, data) = device_server(tls_security(tls)).await;
    let port = srv.addr.port();
    let good = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        cli_dir.display()
    );

    // qemu-img: info and a full copy, byte-identical.
    let o = qemu_img(&["info"], Some(&good), port, None).await;
    assert!(o.status.success(), "qemu-img info over TLS: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("4 MiB"));
    let copy = tmp.path().join("copy.raw");
    let o = qemu_img(&["convert", "-O", "raw"], Some(&good), port, Some(&copy)).await;
    assert!(
        o.status.success(),
        "qemu-img convert over TLS: {}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), data);

    // qemu-img with a CA that did not sign the server: refused by the client.
    let wrong = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        other_cli.display()
    );
    let o = qemu_img(&["info"], Some(&wrong), port, None).await;
    assert!(
        !o.status.success(),
        "a client trusting another CA connected"
    );
    // A client that trusts the server but has no certificate of its own: refused by the
    // server (ca-cert.pem in the server directory requires client certificates).
    let anon = tmp.path().join("anon");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(cli_dir.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let o = qemu_img(
        &["info"],
        Some(&format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            anon.display()
        )),
        port,
        None,
    )
    .await;
    assert!(
        !o.status.success(),
        "a client without a certificate connected"
    );
    // qemu-img in plaintext: refused, and told TLS is required.
    let o = qemu_img(&["info"], None, port, None).await;
    assert!(!o.status.success(), "plaintext qemu-img connected");
    assert!(
        stderr(&o).to_lowercase().contains("tls"),
        "qemu names TLS as the reason: {}",
        stderr(&o)
    );

    // libnbd: nbdinfo and nbdcopy with nbds:// and the client directory.
    let uri = format!(
        "nbds://127.0.0.1:{port}/d?tls-certificates={}",
        cli_dir.display()
    );
    let info = run_ok(Command::new(&nbdinfo).arg("--json").arg(&uri)).await;
    assert!(info.contains(&format!("\"export-size\": {SIZE}")), "{info}");
    let copy2 = tmp.path().join("copy2.raw");
    run_ok(Command::new(&nbdcopy).arg(&uri).arg(&copy2)).await;
    assert_eq!(std::fs::read(&copy2).unwrap(), data);
    for bad in [
        format!(
            "nbds://127.0.0.1:{port}/d?tls-certificates={}",
            other_cli.display()
        ),
        format!(
            "nbds://127.0.0.1:{port}/d?tls-certificates={}",
            anon.display()
        ),
        format!("nbd://127.0.0.1:{port}/d"),
    ] {
        let o = run(Command::new(&nbdinfo).arg(&bad)).await;
        assert!(!o.status.success(), "nbdinfo {bad} connected");
    }
    plaintext_is_refused(&srv).await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_without_client_certificates() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let tmp = tempfile::tempdir().unwrap();
    let (srv_dir, cli_dir) = make_pki(tmp.path(), "good");
    std::fs::remove_file(srv_dir.join("ca-cert.pem")).unwrap();
    let tls = TlsConfig::from_x509_dir(&srv_dir).unwrap();
    assert!(matches!(
        tls.kind(),
        blockvault_nbd::TlsKind::X509 { client_ca: None }
    ));
    let (srv, _) = device_server(tls_security(tls)).await;
    let port = srv.addr.port();
    // Only the CA certificate on the client side: enough without client authentication.
    let anon = tmp.path().join("anon");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(cli_dir.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let o = qemu_img(
        &["info"],
        Some(&format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            anon.display()
        )),
        port,
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    run_ok(Command::new(&nbdinfo).arg(format!(
        "nbds://127.0.0.1:{port}/d?tls-certificates={}",
        anon.display()
    )))
    .await;
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_with_qemu_and_libnbd() {
    count_panics();
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let tmp = tempfile::tempdir().unwrap();
    let keys = make_psk(tmp.path(), "server", "alice");
    // A second file with the same user name but another key.
    let wrong = make_psk(tmp.path(), "wrong", "alice");
    let tls = TlsConfig::from_psk_file(&keys).unwrap();
    assert_eq!(
        tls.kind(),
        &blockvault_nbd::TlsKind::Psk {
            identities: vec!["alice".into()]
        }
    );
    let (srv, data) = device_server(tls_security(tls)).await;
    let port = srv.addr.port();
    let dir = keys.parent().unwrap().display().to_string();
    let wrong_dir = wrong.parent().unwrap().display().to_string();

    let obj = |dir: &str, user: &str, extra: &str| {
        format!("tls-creds-psk,id=tls0,dir={dir},username={user},endpoint=client{extra}")
    };
    let o = qemu_img(&["info"], Some(&obj(&dir, "alice", "")), port, None).await;
    assert!(o.status.success(), "qemu-img with the PSK: {}", stderr(&o));
    let copy = tmp.path().join("copy.raw");
    let o = qemu_img(
        &["convert", "-O", "raw"],
        Some(&obj(&dir, "alice", "")),
        port,
        Some(&copy),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    // TLS 1.2 with PSK cipher suites works too (GnuTLS priority string as qemu takes it).
    let o = qemu_img(
        &["info"],
        Some(&obj(
            &dir,
            "alice",
            ",priority=NORMAL:-VERS-ALL:+VERS-TLS1.2:+ECDHE-PSK:+DHE-PSK:+PSK",
        )),
        port,
        None,
    )
    .await;
    assert!(
        o.status.success(),
        "qemu-img over TLS 1.2 PSK: {}",
        stderr(&o)
    );
    // ... and the priority string is honoured: TLS 1.1 only is refused by the server.
    let o = qemu_img(
        &["info"],
        Some(&obj(
            &dir,
            "alice",
            ",priority=NORMAL:-VERS-ALL:+VERS-TLS1.1:+ECDHE-PSK:+DHE-PSK:+PSK",
        )),
        port,
        None,
    )
    .await;
    assert!(!o.status.success(), "TLS 1.1 was accepted");
    for (d, user, why) in [
        (&wrong_dir, "alice", "a wrong key"),
        (&dir, "mallory", "an unknown user"),
    ] {
        let o = qemu_img(&["info"], Some(&obj(d, user, "")), port, None).await;
        assert!(!o.status.success(), "qemu-img connected with {why}");
    }
    let o = qemu_img(&["info"], None, port, None).await;
    assert!(!o.status.success(), "plaintext qemu-img connected");

    let uri = |user: &str, file: &Path| {
        format!(
            "nbds://{user}@127.0.0.1:{port}/d?tls-psk-file={}",
            file.display()
        )
    };
    let info = run_ok(
        Command::new(&nbdinfo)
            .arg("--json")
            .arg(uri("alice", &keys)),
    )
    .await;
    assert!(info.contains(&format!("\"export-size\": {SIZE}")), "{info}");
    let copy2 = tmp.path().join("copy2.raw");
    run_ok(Command::new(&nbdcopy).arg(uri("alice", &keys)).arg(&copy2)).await;
    assert_eq!(std::fs::read(&copy2).unwrap(), data);
    for bad in [
        uri("alice", &wrong),
        uri("bob", &keys),
        format!("nbd://127.0.0.1:{port}/d"),
    ] {
        let o = run(Command::new(&nbdinfo).arg(&bad)).await;
        assert!(!o.status.success(), "nbdinfo {bad} connected");
    }
    plaintext_is_refused(&srv).await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}

#[tokio::test]
async fn credentials_are_checked_without_showing_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    // A world-readable PSK file is refused.
    let keys = make_psk(tmp.path(), "open", "alice");
    let secret = std::fs::read_to_string(&keys).unwrap();
    let hex = secret.trim().split_once(':').unwrap().1.to_owned();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsConfig::from_psk_file(&keys).unwrap_err().to_string();
    assert!(e.contains("readable by every user"), "{e}");
    // A malformed line is reported by number, never echoed.
    private(&keys);
    std::fs::write(&keys, format!("alice={hex}\n")).unwrap();
    let e = TlsConfig::from_psk_file(&keys).unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
    assert!(!e.contains(&hex[..8]), "the error shows key material: {e}");
    // A certificate directory without the key, and a key that does not match.
    let (srv_dir, cli_dir) = make_pki(tmp.path(), "pki");
    let e = TlsConfig::from_x509_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("server-cert.pem"), "{e}");
    std::fs::copy(
        cli_dir.join("client-key.pem"),
        srv_dir.join("server-key.pem"),
    )
    .unwrap();
    let e = TlsConfig::from_x509_dir(&srv_dir).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    let key = std::fs::read_to_string(srv_dir.join("server-key.pem")).unwrap();
    let body: String = key.lines().nth(1).unwrap_or_default().to_owned();
    assert!(!e.contains(&body), "the error shows the key");
}

#[tokio::test]
async fn non_loopback_listener_needs_tls() {
    let server = blockvault_nbd::Server::new(ServerConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = server
        .serve(listener, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs TLS"), "{e}");
    // Loopback is fine without TLS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    server.serve(listener, async {}).await.unwrap();
}

/// Plaintext bytes sent right behind STARTTLS (before the server's ACK could be read), or a
/// client that answers the ACK with garbage instead of a TLS handshake, only lose their own
/// connection; a good client is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_starttls_clients_lose_only_their_connection() {
    use bytes::BytesMut;
    use tokio::io::AsyncWriteExt;
    count_panics();
    let tmp = tempfile::tempdir().unwrap();
    let keys = make_psk(tmp.path(), "server", "alice");
    let (srv, _) = device_server(tls_security(TlsConfig::from_psk_file(&keys).unwrap())).await;
    // STARTTLS with a GO pipelined behind it.
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .await;
    let mut b = BytesMut::new();
    ClientOption::StartTls.encode(&mut b);
    ClientOption::Go(ExportRequest {
        name: "d".into(),
        info_requests: vec![],
    })
    .encode(&mut b);
    c.stream.write_all(&b).await.unwrap();
    assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);
    assert!(c.closed().await, "injected plaintext must end the session");
    // STARTTLS answered with garbage instead of a ClientHello.
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.option(&ClientOption::StartTls).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);
    c.stream.write_all(&pattern(3000, 9)).await.unwrap();
    assert!(c.closed().await, "a failed TLS handshake ends the session");
    // STARTTLS with a payload is malformed: ERR_INVALID, haggling continues.
    let mut c = RawClient::connect(srv.addr).await;
    c.greeting().await;
    c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.raw_option(proto::OPT_STARTTLS, b"x").await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_INVALID);
    c.option(&ClientOption::List).await;
    assert_eq!(c.opt_reply().await.kind, proto::REP_ERR_TLS_REQD);

    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    run_ok(Command::new(nbdinfo).arg(format!(
        "nbds://alice@127.0.0.1:{}/d?tls-psk-file={}",
        srv.addr.port(),
        keys.display()
    )))
    .await;
    srv.stop().await.unwrap();
    assert_eq!(panics(), 0);
}
