//! Listeners, connection admission, export table and graceful shutdown.

use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::codec::{OptionCodec, RequestCodec};
use crate::device::Export;
use crate::error::Error;
use crate::handshake::{self, Outcome};
use crate::proto;
use crate::stats::{ServerStats, SessionGuard};
use crate::transmission::{self, Limits};

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
    /// Time a client gets to finish option haggling; 0 disables the limit.
    pub handshake_timeout_secs: u64,
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
            handshake_timeout_secs: 30,
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

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl Listener {
    async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Replies are batched by the writer; Nagle would only add latency on top.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "could not set TCP_NODELAY");
                }
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (stream, peer) = l.accept().await?;
                let peer = match peer.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix".to_owned(),
                };
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), peer))
            }
        }
    }
}

struct Inner {
    config: ServerConfig,
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
        config.validate()?;
        Ok(Server {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.max_connections)),
                config,
                exports: ExportTable::default(),
                stats: ServerStats::default(),
            }),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
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
        let token = CancellationToken::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        info!("NBD server accepting connections");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (r, w, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Usually fd exhaustion; back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = self.inner.slots.clone().try_acquire_owned() else {
                        debug!(%peer, "connection limit reached, closing");
                        self.inner.stats.rejected();
                        continue;
                    };
                    let server = self.clone();
                    let token = token.child_token();
                    connections.spawn(async move {
                        let _ = server.connection(r, w, peer, slot, token).await;
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
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Ok(slot) = self.inner.slots.clone().try_acquire_owned() else {
            self.inner.stats.rejected();
            return Err(Error::ConnectionLimit(self.inner.config.max_connections));
        };
        let (r, w) = tokio::io::split(stream);
        let token = CancellationToken::new();
        let conn = self.connection(Box::new(r), Box::new(w), peer.into(), slot, token.clone());
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
        r: BoxRead,
        w: BoxWrite,
        peer: String,
        slot: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let session = Arc::new(self.inner.stats.open_session(peer.clone()));
        let result = self.run_connection(r, w, &peer, session, shutdown).await;
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
        r: BoxRead,
        w: BoxWrite,
        peer: &str,
        session: Arc<SessionGuard>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let result = self.negotiate_and_transmit(r, w, session, shutdown).await;
        match &result {
            Ok(()) => debug!("connection closed"),
            // Client misbehaviour is routine on a network service: info, not warn.
            Err(e) => info!(error = %e, "connection ended with an error"),
        }
        result
    }

    async fn negotiate_and_transmit(
        &self,
        r: BoxRead,
        w: BoxWrite,
        session: Arc<SessionGuard>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let config = &self.inner.config;
        let mut framed = FramedRead::new(r, OptionCodec::default());
        let mut out = BufWriter::with_capacity(256 * 1024, w);
        let negotiation = handshake::negotiate(
            &mut framed,
            &mut out,
            &self.inner.exports,
            config.allow_list,
        );
        let timeout = Duration::from_secs(config.handshake_timeout_secs);
        let outcome = tokio::select! {
            r = async {
                if config.handshake_timeout_secs == 0 {
                    Ok(negotiation.await)
                } else {
                    tokio::time::timeout(timeout, negotiation).await
                }
            } => match r {
                Ok(outcome) => outcome?,
                Err(_) => return Err(Error::HandshakeTimeout(timeout)),
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Outcome::Transmission(neg) = outcome else {
            return Ok(());
        };
        tracing::Span::current().record("export", neg.export.name.as_str());
        session.set_export(&neg.export.name);
        let framed = framed.map_decoder(|_| RequestCodec::default());
        let limits = Limits {
            max_requests: config.max_requests_per_connection,
            max_bytes: config.max_bytes_per_connection,
        };
        transmission::run(framed, out, neg, limits, session, shutdown).await
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
