//! `restore mount` reached safely: clients without block-size negotiation on a writable mount,
//! TLS with a PSK file, owner-only unix sockets, `--allow-from`, and plaintext beyond loopback
//! refused. Real clients: libnbd (Python, nbdinfo), qemu-img.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};

use crate::common::*;
use crate::mount::{ok, run, setup, Mount};

/// libnbd with handshake flags 0 (EXPORT_NAME) and without the block-size request writes and
/// reads at odd 512-byte offsets through the 4 KiB overlay; everything matches an oracle that
/// starts as the backed-up image, also for qemu-img reading it afterwards.
#[test]
fn writable_mount_serves_clients_that_negotiate_no_block_size() {
    let (w, img, point) = setup(51);
    let overlay = w.path("overlay");
    let mut m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--listen",
            "127.0.0.1:0",
            "--writable",
            "--overlay",
            overlay.to_str().unwrap(),
        ],
        1,
    );
    let uri = m.uris[0].clone();
    let oracle = w.path("oracle.raw");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nbd/tests/scripts/nbd_default_sizes.py"
    );
    let size = std::fs::metadata(&img).unwrap().len().to_string();
    let o = Command::new("/usr/bin/python3")
        .args([script, &uri, &size, "5", oracle.to_str().unwrap()])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .expect("running python3 (apt-get install python3-libnbd)");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && stdout.contains(" passed, 0 failed"),
        "{stdout}\n{}\nmount log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        m.log()
    );
    let copy = w.path("copy.raw");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri, copy.to_str().unwrap()],
    );
    assert!(same_content(&copy, &oracle), "qemu-img sees the oracle");
    assert!(m.sigterm(), "clean stop; log:\n{}", m.log());
}

fn psk_file(w: &World, user: &str) -> std::path::PathBuf {
    let dir = w.path(&format!("psk-{user}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.psk");
    ok("psktool", &["-u", user, "-p", file.to_str().unwrap()]);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

#[test]
fn tls_psk_mount_refuses_plaintext_and_wrong_keys() {
    let (w, img, point) = setup(52);
    let keys = psk_file(&w, "alice");
    let other = psk_file(&w, "alice2");

    // Reachable from other hosts without TLS: refused before anything is served.
    let o = w.run(&[
        "restore",
        "mount",
        &point,
        "--disk",
        "sys",
        "--listen",
        "0.0.0.0:0",
    ]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("needs TLS"), "{}", stderr(&o));

    let mut m = Mount::start(
        &w,
        &[
            &point,
            "--disk",
            "sys",
            "--listen",
            "0.0.0.0:0",
            "--tls-psk",
            keys.to_str().unwrap(),
            "--allow-from",
            "127.0.0.0/8",
        ],
        1,
    );
    let uri = m.uris[0].clone();
    assert!(uri.starts_with("nbds://"), "{uri}");
    let port = uri
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let good = format!(
        "nbds://alice@127.0.0.1:{port}/sys?tls-psk-file={}",
        keys.display()
    );
    let out = ok("nbdinfo", &["--size", &good]);
    assert_eq!(
        out.trim(),
        std::fs::metadata(&img).unwrap().len().to_string()
    );
    let copy = w.path("copy.raw");
    ok("nbdcopy", &[&good, copy.to_str().unwrap()]);
    assert!(same_content(&copy, &img));
    let qcopy = w.path("qcopy.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!(
                "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
                keys.parent().unwrap().display()
            ),
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=sys,tls-creds=tls0"),
            "-O",
            "raw",
            qcopy.to_str().unwrap(),
        ],
    );
    assert!(same_content(&qcopy, &img));
    for bad in [
        format!("nbd://127.0.0.1:{port}/sys"),
        format!(
            "nbds://alice2@127.0.0.1:{port}/sys?tls-psk-file={}",
            other.display()
        ),
    ] {
        let o = run("nbdinfo", &[&bad]);
        assert!(!o.status.success(), "{bad} connected");
    }
    let log = m.log();
    let secret = std::fs::read_to_string(&keys).unwrap();
    let key_hex = secret.trim().split_once(':').unwrap().1;
    assert!(!log.contains(key_hex), "the key reached the log");
    assert!(m.sigterm(), "clean stop; log:\n{}", m.log());

    // Bad credentials are refused up front, naming the file but not the key.
    std::fs::write(&keys, format!("alice={key_hex}\n")).unwrap();
    let o = w.run(&[
        "restore",
        "mount",
        &point,
        "--disk",
        "sys",
        "--tls-psk",
        keys.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("line 1"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(&key_hex[..16]), "{}", stderr(&o));
}

#[test]
fn unix_socket_is_owner_only() {
    let (w, img, point) = setup(53);
    let sock = w.path("bv.sock");
    let o = w.run(&[
        "restore",
        "mount",
        &point,
        "--disk",
        "sys",
        "--socket",
        sock.to_str().unwrap(),
        "--allow-from",
        "10.0.0.0/8",
    ]);
    assert_eq!(code(&o), 5, "--allow-from with a socket: {}", stderr(&o));
    assert!(!sock.exists());
    let mut m = Mount::start(
        &w,
        &[&point, "--disk", "sys", "--socket", sock.to_str().unwrap()],
        1,
    );
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let out = ok("nbdinfo", &["--size", &m.uris[0]]);
    assert_eq!(
        out.trim(),
        std::fs::metadata(&img).unwrap().len().to_string()
    );
    assert!(m.sigterm(), "clean stop; log:\n{}", m.log());
    assert!(!sock.exists(), "the socket is removed at exit");
}
