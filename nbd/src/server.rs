//! Listeners, connection admission, export table and graceful shutdown.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::access::Cidr;
use crate::codec::{OptionCodec, RequestCodec};
use crate::conn::{Conn, Plain};
use crate::device::Export;
use crate::error::Error;
use crate::handshake::{self, Outcome, TlsMode};
use crate::proto;
use crate::stats::{ServerStats, SessionGuard};
use crate::tls::TlsConfig;
use crate::transmission::{self, Limits};

/// A connection still negotiating this long may be closed when a new client needs its slot
/// (real clients finish in milliseconds, TLS included).
const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);
/// How long a client admitted by closing an idle connection waits for that slot to free.
const EVICTION_WAIT: Duration = Duration::from_secs(5);

/// Server limits and policies. Memory held for one connection is bounded by
/// `max_bytes_per_connection` plus one WRITE payload (at most 32 MiB) being received.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections served at once; further connections are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Requests being processed or waiting for their reply to be sent, per connection.
    pub max_requests_per_connection: usize,
    /// READ/WRITE payload bytes in flight per connection (at least 32 MiB, so any valid request
    /// fits).
    pub max_bytes_per_connection: usize,
    /// Time a client gets to finish option haggling, TLS handshake included; 0 disables the
    /// limit.
    pub handshake_timeout_secs: u64,
    /// A connection in transmission with no request in flight for this long may be closed
    /// when a new client finds every slot taken (so idle clients cannot lock others out); 0
    /// makes every idle connection eligible at once. Connections are never closed for being
    /// idle while slots are free: a quiet guest must not lose its disk.
    pub idle_timeout_secs: u64,
    /// Closes any connection in transmission that has had no request in flight for this long,
    /// whether or not slots are scarce; 0 (the default) never does. Beware that a guest's disk
    /// then fails when the guest has been quiet that long, unless its client reconnects.
    pub idle_close_secs: u64,
    /// Whether a full server closes idle connections (see `idle_timeout_secs`) to admit new
    /// clients; when false, clients beyond `max_connections` are always turned away.
    pub evict_idle: bool,
    /// On shutdown, time connections get to answer in-flight requests before being cut off.
    pub shutdown_grace_secs: u64,
    /// Whether `NBD_OPT_LIST` reveals the export names.
    pub allow_list: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 32,
            max_requests_per_connection: 64,
            max_bytes_per_connection: 64 << 20,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 60,
            evict_idle: true,
            idle_close_secs: 0,
            shutdown_grace_secs: 30,
            allow_list: true,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        if self.max_connections == 0 {
            return bad("max-connections must be at least 1");
        }
        if self.max_connections > Semaphore::MAX_PERMITS {
            return bad("max-connections is too large");
        }
        if self.max_requests_per_connection == 0 || self.max_requests_per_connection > 65536 {
            return bad("max-requests-per-connection must be between 1 and 65536");
        }
        if self.max_bytes_per_connection < proto::MAX_WRITE_PAYLOAD as usize {
            return bad("max-bytes-per-connection must be at least 32 MiB (33554432)");
        }
        if self.max_bytes_per_connection > Semaphore::MAX_PERMITS {
            return bad("max-bytes-per-connection is too large");
        }
        Ok(())
    }
}

/// The exports a server offers. An empty name selects the export named "" if there is one, or
/// else the first export added (the default export).
#[derive(Default)]
pub(crate) struct ExportTable {
    exports: RwLock<Vec<Arc<Export>>>,
}

impl ExportTable {
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read().unwrap_or_else(PoisonError::into_inner);
        exports
            .iter()
            .find(|e| e.name == name)
            .or_else(|| {
                if name.is_empty() {
                    exports.first()
                } else {
                    None
                }
            })
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Who may connect and how: TLS credentials and client address blocks.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// When set, every client must upgrade with `NBD_OPT_STARTTLS` before anything else
    /// (other options get `NBD_REP_ERR_TLS_REQD`; `NBD_OPT_EXPORT_NAME` closes the connection).
    /// Required for a TCP listener that is not on a loopback address.
    pub tls: Option<TlsConfig>,
    /// TCP clients must come from one of these blocks; empty allows every address. Unix socket
    /// clients are governed by the socket file's permissions instead.
    pub allow_from: Vec<Cidr>,
}

/// A socket the server accepts connections from.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl Listener {
    /// Accepts a connection: the stream, a printable peer and the peer's IP address (TCP).
    async fn accept(&self) -> std::io::Result<(Plain, String, Option<IpAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Replies are batched by the writer; Nagle would only add latency on top.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "could not set TCP_NODELAY");
                }
                Ok((Plain::Tcp(stream), peer.to_string(), Some(peer.ip())))
            }
            Listener::Unix(l) => {
                let (stream, peer) = l.accept().await?;
                let peer = match peer.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix".to_owned(),
                };
                Ok((Plain::Unix(stream), peer, None))
            }
        }
    }

    /// Refuses to serve plaintext TCP beyond the loopback interface. `Server::serve` checks
    /// this too; callers may check earlier to fail before doing other work.
    pub fn check_security(&self, security: &Security) -> Result<(), Error> {
        if let Listener::Tcp(l) = self {
            let addr = l
                .local_addr()
                .map_err(|e| Error::io("reading the listener address", e))?;
            if !addr.ip().is_loopback() && security.tls.is_none() {
                return Err(Error::InvalidConfig(format!(
                    "listening on {addr}, which other hosts can reach, needs TLS \
                     (X.509 certificates or a PSK file); without TLS listen on 127.0.0.1 \
                     or a unix socket"
                )));
            }
        }
        Ok(())
    }
}

struct Inner {
    config: ServerConfig,
    security: Security,
    exports: ExportTable,
    stats: ServerStats,
    slots: Arc<Semaphore>,
}

/// An NBD server: a set of exports, limits and statistics. Cheap to clone; clones share
/// everything, so one server can serve a TCP and a unix listener at once.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    pub fn new(config: ServerConfig) -> Result<Server, Error> {
        Self::with_security(config, Security::default())
    }

    /// A server with TLS and/or client address restrictions.
    pub fn with_security(config: ServerConfig, security: Security) -> Result<Server, Error> {
        config.validate()?;
        Ok(Server {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.max_connections)),
                security,
                config,
                exports: ExportTable::default(),
                stats: ServerStats::default(),
            }),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn security(&self) -> &Security {
        &self.inner.security
    }

    /// Whether a TCP client at `ip` may connect.
    fn allowed(&self, ip: IpAddr) -> bool {
        let allow = &self.inner.security.allow_from;
        allow.is_empty() || allow.iter().any(|c| c.contains(ip))
    }

    /// With every slot taken, closes the longest-idle connection (a client still negotiating
    /// after `HANDSHAKE_GRACE`, or one in transmission with nothing in flight for
    /// `idle_timeout_secs`); false when every connection is busy.
    fn make_room(&self) -> bool {
        if !self.inner.config.evict_idle {
            return false;
        }
        let idle = Duration::from_secs(self.inner.config.idle_timeout_secs);
        self.inner.stats.evict_idle(HANDSHAKE_GRACE, idle)
    }

    /// Waits for the slot a closed idle connection gives back.
    async fn wait_for_slot(&self) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(EVICTION_WAIT, self.inner.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// A free slot, or one made by closing an idle connection.
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.inner.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if self.make_room() => self.wait_for_slot().await,
            Err(_) => None,
        }
    }

    /// Adds an export; clients connecting from now on can select it.
    pub fn add_export(&self, export: Export) -> Result<(), Error> {
        export.validate().map_err(|reason| Error::InvalidExport {
            name: export.name.clone(),
            reason,
        })?;
        let mut exports = self
            .inner
            .exports
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if exports.iter().any(|e| e.name == export.name) {
            return Err(Error::DuplicateExport(export.name));
        }
        exports.push(Arc::new(export));
        Ok(())
    }

    /// Removes an export from the table. Connections already using it keep it until they end.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = self
            .inner
            .exports
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let i = exports.iter().position(|e| e.name == name)?;
        Some(exports.remove(i))
    }

    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.inner.exports.all()
    }

    pub fn stats(&self) -> ServerStats {
        self.inner.stats.clone()
    }

    /// Accepts connections until `shutdown` completes, then stops accepting, lets every
    /// connection answer the requests it has received (within `shutdown_grace_secs`), flushes
    /// every writable export and returns. Errors of single connections are logged, not returned;
    /// the error returned is a failed final flush.
    pub async fn serve(
        &self,
        listener: impl Into<Listener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let listener = listener.into();
        listener.check_security(&self.inner.security)?;
        let token = CancellationToken::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        info!("NBD server accepting connections");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer, ip) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Usually fd exhaustion; back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if let Some(ip) = ip.filter(|&ip| !self.allowed(ip)) {
                        info!(%peer, %ip, "client address is not allowed, closing");
                        self.inner.stats.denied();
                        continue;
                    }
                    let slot = match self.inner.slots.clone().try_acquire_owned() {
                        Ok(slot) => Some(slot),
                        Err(_) if self.make_room() => None,
                        Err(_) => {
                            debug!(%peer, "connection limit reached, closing");
                            self.inner.stats.rejected();
                            continue;
                        }
                    };
                    let server = self.clone();
                    let token = token.child_token();
                    connections.spawn(async move {
                        // A full server makes room by closing an idle connection; the wait for
                        // its slot runs here, not in the accept loop.
                        let slot = match slot {
                            Some(slot) => slot,
                            None => match server.wait_for_slot().await {
                                Some(slot) => slot,
                                None => {
                                    debug!(%peer, "connection limit reached, closing");
                                    server.inner.stats.rejected();
                                    return;
                                }
                            },
                        };
                        let _ = server.connection(stream, peer, slot, token).await;
                    });
                }
            }
        }
        drop(listener);
        info!(
            connections = connections.len(),
            "shutting down: finishing in-flight requests"
        );
        token.cancel();
        let grace = Duration::from_secs(self.inner.config.shutdown_grace_secs);
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                remaining = connections.len(),
                "connections did not finish in time, closing them"
            );
            connections.shutdown().await;
        }
        self.flush_all().await
    }

    /// Serves one already-accepted connection (e.g. a socket-activated or in-process stream)
    /// until the client leaves or `shutdown` completes. It counts against `max_connections`.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        peer: impl Into<String>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(slot) = self.admit().await else {
            self.inner.stats.rejected();
            return Err(Error::ConnectionLimit(self.inner.config.max_connections));
        };
        let token = CancellationToken::new();
        let stream = Plain::Other(Box::new(stream));
        let conn = self.connection(stream, peer.into(), slot, token.clone());
        tokio::pin!(conn);
        tokio::pin!(shutdown);
        tokio::select! {
            r = &mut conn => r,
            _ = &mut shutdown => {
                token.cancel();
                conn.await
            }
        }
    }

    async fn connection(
        &self,
        stream: Plain,
        peer: String,
        slot: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let session = Arc::new(
            self.inner
                .stats
                .open_session(peer.clone(), shutdown.clone()),
        );
        let result = self.run_connection(stream, &peer, session, shutdown).await;
        drop(slot);
        result
    }

    #[instrument(
        name = "nbd_conn",
        skip_all,
        fields(id = session.id(), peer = %peer, export = tracing::field::Empty)
    )]
    async fn run_connection(
        &self,
        stream: Plain,
        peer: &str,
        session: Arc<SessionGuard>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let result = self.negotiate_and_transmit(stream, session, shutdown).await;
        match &result {
            Ok(()) => debug!("connection closed"),
            // Client misbehaviour is routine on a network service: info, not warn.
            Err(e) => info!(error = %e, "connection ended with an error"),
        }
        result
    }

    async fn negotiate_and_transmit(
        &self,
        stream: Plain,
        session: Arc<SessionGuard>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let config = &self.inner.config;
        let negotiation = self.negotiate(stream);
        let timeout = Duration::from_secs(config.handshake_timeout_secs);
        let (framed, neg) = tokio::select! {
            r = async {
                if config.handshake_timeout_secs == 0 {
                    Ok(negotiation.await)
                } else {
                    tokio::time::timeout(timeout, negotiation).await
                }
            } => match r {
                Ok(result) => match result? {
                    Some(done) => done,
                    None => return Ok(()),
                },
                Err(_) => return Err(Error::HandshakeTimeout(timeout)),
            },
            _ = shutdown.cancelled() => {
                if session.was_evicted() {
                    debug!("closed while negotiating to make room for a new client");
                }
                return Ok(());
            }
        };
        tracing::Span::current().record("export", neg.export.name.as_str());
        session.set_export(&neg.export.name);
        // The read buffer may already hold pipelined requests: it moves to the request decoder.
        let parts = framed.into_parts();
        let (r, w) = parts.io.into_split();
        let mut framed = FramedRead::new(r, RequestCodec::default());
        framed.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let out = BufWriter::with_capacity(256 * 1024, w);
        let limits = Limits {
            max_requests: config.max_requests_per_connection,
            max_bytes: config.max_bytes_per_connection,
            idle_close: (config.idle_close_secs > 0)
                .then_some(Duration::from_secs(config.idle_close_secs)),
        };
        transmission::run(framed, out, neg, limits, session, shutdown).await
    }

    /// Option haggling, with the TLS upgrade when the client asks for it; `None` when the
    /// client left without choosing an export.
    async fn negotiate(
        &self,
        stream: Plain,
    ) -> Result<Option<(FramedRead<Conn, OptionCodec>, handshake::Negotiated)>, Error> {
        let security = &self.inner.security;
        let allow_list = self.inner.config.allow_list;
        let mut mode = match security.tls {
            Some(_) => TlsMode::Required,
            None => TlsMode::Off,
        };
        let mut framed = FramedRead::new(Conn::Plain(stream), OptionCodec::default());
        let mut resume = None;
        loop {
            let outcome =
                handshake::negotiate(&mut framed, &self.inner.exports, allow_list, mode, resume)
                    .await?;
            match outcome {
                Outcome::Transmission(neg) => return Ok(Some((framed, neg))),
                Outcome::Closed => return Ok(None),
                Outcome::StartTls(r) => {
                    let Some(tls) = &security.tls else {
                        return Err(Error::Handshake("STARTTLS without TLS configured".into()));
                    };
                    // The client must wait for the ACK before starting TLS; bytes already
                    // buffered would be plaintext injected into the secure session.
                    if !framed.read_buffer().is_empty() {
                        return Err(Error::Handshake(
                            "client sent data between STARTTLS and the TLS handshake".into(),
                        ));
                    }
                    let Conn::Plain(plain) = framed.into_inner() else {
                        return Err(Error::Handshake("STARTTLS twice".into()));
                    };
                    let secured = tls.accept(plain).await?;
                    debug!("TLS established");
                    framed = FramedRead::new(
                        Conn::Tls(Box::new(secured)),
                        OptionCodec::after_starttls(),
                    );
                    mode = TlsMode::Active;
                    resume = Some(r);
                }
            }
        }
    }

    async fn flush_all(&self) -> Result<(), Error> {
        let mut first_error = None;
        for export in self.inner.exports.all() {
            if export.device.read_only() {
                continue;
            }
            if let Err(e) = export.device.flush().await {
                warn!(export = %export.name, error = %e, "final flush failed");
                first_error.get_or_insert(Error::Flush {
                    export: export.name.clone(),
                    source: e,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
