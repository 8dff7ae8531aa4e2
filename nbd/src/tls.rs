//! TLS for NBD (`NBD_OPT_STARTTLS`), with X.509 certificates or pre-shared keys, in the file
//! layouts qemu's `tls-creds-x509` / `tls-creds-psk` objects and libnbd use, so one set of
//! credentials serves both sides.
//!
//! OpenSSL is used because it offers both kinds: TLS-PSK (TLS 1.2 PSK cipher suites and TLS 1.3
//! external PSKs, which GnuTLS clients such as qemu and libnbd use) as well as certificates.
//! Key material is read into zeroed-on-drop buffers and never appears in an error or a log line:
//! errors name the file and, for PSK files, the line number only.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslVerifyMode,
    SslVersion,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;
use zeroize::Zeroizing;

use crate::error::Error;

/// File names inside a `--tls-certs` directory (qemu's `tls-creds-x509,endpoint=server` layout).
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";

/// TLS 1.2 suites offered with certificates: forward secrecy and AEAD only.
const X509_CIPHERS: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL";
/// TLS 1.2 PSK suites; GnuTLS's `+ECDHE-PSK:+DHE-PSK:+PSK` priorities meet these.
const PSK_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:\
ECDHE-PSK-AES128-CBC-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:\
PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";

/// Server-side TLS credentials. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    ctx: SslContext,
    kind: TlsKind,
}

/// What kind of credentials a [`TlsConfig`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsKind {
    /// A server certificate; `client_ca` is set when clients must present a certificate
    /// signed by that CA.
    X509 { client_ca: Option<PathBuf> },
    /// Pre-shared keys for these identities (user names).
    Psk { identities: Vec<String> },
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn tls_err(msg: String) -> Error {
    Error::Tls(msg)
}

/// Refuses a secret file that other users can read (or that is not a regular file).
fn check_private(path: &Path, what: &str) -> Result<(), Error> {
    let meta = std::fs::metadata(path)
        .map_err(|e| tls_err(format!("cannot read {what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(tls_err(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(tls_err(format!(
            "{what} {} is readable by every user; restrict it (chmod 600) first",
            path.display()
        )));
    }
    Ok(())
}

fn base_builder() -> Result<SslContextBuilder, Error> {
    let mut b = SslContext::builder(SslMethod::tls_server())
        .map_err(|e| tls_err(format!("initialising OpenSSL: {e}")))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| tls_err(format!("setting the minimum TLS version: {e}")))?;
    // No session tickets and no session cache, in TLS 1.2 (`NO_TICKET`, the cache mode) as in
    // 1.3 (`set_num_tickets(0)`): every connection authenticates afresh, and the server keeps
    // no ticket keys.
    b.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::NO_TICKET,
    );
    b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
    b.set_num_tickets(0)
        .map_err(|e| tls_err(format!("disabling session tickets: {e}")))?;
    Ok(b)
}

impl TlsConfig {
    /// Loads `server-cert.pem` and `server-key.pem` from `dir`, and `ca-cert.pem` if present:
    /// then every client must present a certificate signed by that CA (as qemu's
    /// `verify-peer=on` does).
    pub fn from_x509_dir(dir: &Path) -> Result<TlsConfig, Error> {
        let cert = dir.join(SERVER_CERT);
        let key = dir.join(SERVER_KEY);
        let ca = dir.join(CA_CERT);
        if !cert.is_file() {
            return Err(tls_err(format!(
                "{} is missing: the directory must hold {SERVER_CERT} and {SERVER_KEY} \
                 (and {CA_CERT} to require client certificates)",
                cert.display()
            )));
        }
        check_private(&key, "server key")?;
        let mut b = base_builder()?;
        b.set_cipher_list(X509_CIPHERS)
            .map_err(|e| tls_err(format!("setting cipher suites: {e}")))?;
        b.set_certificate_chain_file(&cert)
            .map_err(|e| tls_err(format!("loading {}: {e}", cert.display())))?;
        let mismatch = || {
            tls_err(format!(
                "the key {} does not match the certificate {}",
                key.display(),
                cert.display()
            ))
        };
        b.set_private_key_file(&key, SslFiletype::PEM)
            .map_err(|e| {
                if e.errors()
                    .iter()
                    .any(|x| x.reason().is_some_and(|r| r.contains("mismatch")))
                {
                    mismatch()
                } else {
                    tls_err(format!("loading the key {}: {e}", key.display()))
                }
            })?;
        b.check_private_key().map_err(|_| mismatch())?;
        let client_ca = if ca.is_file() {
            b.set_ca_file(&ca)
                .map_err(|e| tls_err(format!("loading {}: {e}", ca.display())))?;
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            b.set_session_id_context(b"blockvault-nbd")
                .map_err(|e| tls_err(format!("setting the session context: {e}")))?;
            Some(ca)
        } else {
            b.set_verify(SslVerifyMode::NONE);
            None
        };
        Ok(TlsConfig {
            ctx: b.build(),
            kind: TlsKind::X509 { client_ca },
        })
    }

    /// Loads pre-shared keys from a file in the `psktool` format (`identity:hexkey` per line),
    /// the format of qemu's `tls-creds-psk` `keys.psk` and libnbd's `tls-psk-file`.
    pub fn from_psk_file(path: &Path) -> Result<TlsConfig, Error> {
        check_private(path, "PSK file")?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| tls_err(format!("cannot read PSK file {}: {e}", path.display())))?,
        );
        let keys = parse_psk(&text).map_err(|m| tls_err(format!("{}: {m}", path.display())))?;
        let mut identities: Vec<String> = keys.keys().cloned().collect();
        identities.sort();
        let keys = Arc::new(keys);
        let mut b = base_builder()?;
        b.set_cipher_list(PSK_CIPHERS)
            .map_err(|e| tls_err(format!("setting PSK cipher suites: {e}")))?;
        b.set_psk_server_callback(move |_ssl, identity, out| {
            // An unknown identity yields no key, which fails the handshake.
            let Some(key) = identity
                .and_then(|id| std::str::from_utf8(id).ok())
                .and_then(|id| keys.get(id))
            else {
                return Ok(0);
            };
            if key.len() > out.len() {
                return Ok(0);
            }
            out[..key.len()].copy_from_slice(key);
            Ok(key.len())
        });
        Ok(TlsConfig {
            ctx: b.build(),
            kind: TlsKind::Psk { identities },
        })
    }

    pub fn kind(&self) -> &TlsKind {
        &self.kind
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub(crate) async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = Ssl::new(&self.ctx).map_err(|e| Error::TlsHandshake(e.to_string()))?;
        let mut s = SslStream::new(ssl, stream).map_err(|e| Error::TlsHandshake(e.to_string()))?;
        Pin::new(&mut s)
            .accept()
            .await
            .map_err(|e| Error::TlsHandshake(handshake_reason(&e)))?;
        Ok(s)
    }
}

/// A short reason for a failed handshake (OpenSSL's error stack, which holds no key material).
fn handshake_reason(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error() {
        let reasons: Vec<String> = stack
            .errors()
            .iter()
            .map(|x| x.reason().unwrap_or("unknown").to_owned())
            .collect();
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
    }
    match e.io_error() {
        Some(io) => format!("connection error: {io}"),
        None => format!("{:?}", e.code()),
    }
}

/// Parses `identity:hexkey` lines; blank lines and `#` comments are skipped. Messages name the
/// line number, never its content.
fn parse_psk(text: &str) -> Result<HashMap<String, Zeroizing<Vec<u8>>>, String> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, hex)) = line.split_once(':') else {
            return Err(format!("line {n} is not `identity:hexkey`"));
        };
        if id.is_empty() {
            return Err(format!("line {n} has an empty identity"));
        }
        if hex.len() % 2 != 0 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "line {n}: the key is not an even number of hex digits"
            ));
        }
        let key: Zeroizing<Vec<u8>> = Zeroizing::new(
            (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap_or(0))
                .collect(),
        );
        if key.len() < 16 {
            return Err(format!(
                "line {n}: the key has {} bytes; at least 16 are required",
                key.len()
            ));
        }
        if key.len() > 256 {
            return Err(format!("line {n}: the key is longer than 256 bytes"));
        }
        if keys.insert(id.to_owned(), key).is_some() {
            return Err(format!("identity {id:?} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("holds no keys".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_and_errors_hide_keys() {
        let k = parse_psk("# comment\nalice:00112233445566778899aabbccddeeff\n\nbob:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n").unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k["alice"][..2], [0x00, 0x11]);
        assert_eq!(k["bob"].len(), 32);
        for bad in [
            "alice:0011zz33445566778899aabbccddeeff",
            "alice 00112233445566778899aabbccddeeff",
            ":00112233445566778899aabbccddeeff",
            "alice:001122",
            "alice:00112233445566778899aabbccddeef",
            "",
        ] {
            let e = parse_psk(bad).unwrap_err();
            assert!(!e.contains("0011"), "error shows key material: {e}");
        }
        let dup = "a:00112233445566778899aabbccddeeff\na:00112233445566778899aabbccddeeff";
        assert!(parse_psk(dup).unwrap_err().contains("twice"));
    }
}
