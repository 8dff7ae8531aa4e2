//! Fixed-newstyle negotiation: greeting, client flags, option haggling, until the client picks
//! an export (GO / EXPORT_NAME) or leaves.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;
use tracing::{debug, trace};

use crate::codec::{
    put_option_reply, ClientOption, CodecError, ExportRequest, HandshakeFrame, MetaContextRequest,
    OptionCodec,
};
use crate::device::{BlockSizes, Export};
use crate::error::Error;
use crate::proto;
use crate::server::ExportTable;

/// What the client agreed on for the transmission phase.
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
    pub flags: u16,
    /// Constraints requests are validated against: the device's when the client asked for them
    /// with `NBD_INFO_BLOCK_SIZE` on `GO`, else the protocol defaults.
    pub sizes: BlockSizes,
    /// Set when the client did not negotiate sizes and the device's are stricter than the
    /// defaults: requests are then adapted to the device (see `unaligned`).
    pub adapt: Option<BlockSizes>,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client asked for TLS and got `ACK`: the caller runs the TLS handshake and then
    /// resumes negotiation over TLS with [`Resume`].
    StartTls(Resume),
    /// The client aborted or hung up, or must be dropped; nothing more to do.
    Closed,
}

/// How TLS applies to a negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// The server offers no TLS: `STARTTLS` gets `ERR_POLICY`.
    Off,
    /// TLS is configured and not yet running: every option but `STARTTLS` and `ABORT` gets
    /// `ERR_TLS_REQD` (the protocol's FORCEDTLS mode).
    Required,
    /// The session runs over TLS.
    Active,
}

/// What survives `STARTTLS`: only the client flags (all other state is discarded, as the
/// protocol asks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resume {
    client_flags: u32,
}

/// Transmission flags for `export`, truthful to what the device and the negotiation allow.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let dev = &export.device;
    let mut flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_CACHE;
    if dev.read_only() {
        flags |= proto::TFLAG_READ_ONLY;
    } else {
        flags |=
            proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_WRITE_ZEROES | proto::TFLAG_SEND_FAST_ZERO;
        if dev.supports_trim() {
            flags |= proto::TFLAG_SEND_TRIM;
        }
    }
    if structured {
        flags |= proto::TFLAG_SEND_DF;
    }
    if dev.can_multi_conn() {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    flags
}

struct State {
    structured: bool,
    no_zeroes: bool,
    /// Export for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_export: Option<Arc<Export>>,
}

struct Handshake<'a> {
    exports: &'a ExportTable,
    allow_list: bool,
    tls: TlsMode,
    client_flags: u32,
    state: State,
    buf: BytesMut,
}

/// Runs the negotiation over `framed`'s stream. A fresh negotiation starts with the greeting
/// and client flags; after `STARTTLS`, `resume` carries on with options (the codec must then
/// start at an option header: `OptionCodec::after_starttls`).
pub(crate) async fn negotiate<S>(
    framed: &mut FramedRead<S, OptionCodec>,
    exports: &ExportTable,
    allow_list: bool,
    tls: TlsMode,
    resume: Option<Resume>,
) -> Result<Outcome, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let client_flags = match resume {
        Some(r) => r.client_flags,
        None => match greet(framed).await? {
            Some(flags) => flags,
            None => return Ok(Outcome::Closed),
        },
    };
    let mut hs = Handshake {
        exports,
        allow_list,
        tls,
        client_flags,
        state: State {
            structured: false,
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
            meta_export: None,
        },
        buf: BytesMut::new(),
    };

    loop {
        let frame = match framed.next().await {
            Some(Ok(frame)) => frame,
            None | Some(Err(CodecError::Truncated)) => return Ok(Outcome::Closed),
            Some(Err(e)) => return Err(e.into()),
        };
        let outcome = match frame {
            HandshakeFrame::Option { code, data } => match ClientOption::parse(code, &data) {
                Ok(option) => hs.handle(option)?,
                Err(err) if code == proto::OPT_EXPORT_NAME => {
                    // EXPORT_NAME cannot carry an error reply: the session must end.
                    return Err(Error::Handshake(format!("bad EXPORT_NAME: {err}")));
                }
                Err(_) if hs.tls == TlsMode::Required && code != proto::OPT_STARTTLS => {
                    hs.tls_required(code);
                    None
                }
                Err(err) => {
                    debug!(code, %err, "malformed option");
                    hs.reply_error(code, proto::REP_ERR_INVALID, &err.to_string());
                    None
                }
            },
            HandshakeFrame::Oversized { code, len } => {
                if code == proto::OPT_EXPORT_NAME {
                    return Err(Error::Handshake(format!(
                        "EXPORT_NAME of {len} bytes is too long"
                    )));
                }
                debug!(code, len, "oversized option skipped");
                hs.reply_error(code, proto::REP_ERR_TOO_BIG, "option payload too large");
                None
            }
            HandshakeFrame::ClientFlags(_) => None,
        };
        hs.send(framed.get_mut()).await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
}

/// Sends the greeting and reads the client flags; `None` if the client left.
async fn greet<S>(framed: &mut FramedRead<S, OptionCodec>) -> Result<Option<u32>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(proto::GREETING_LEN);
    greeting.put_u64(proto::NBDMAGIC);
    greeting.put_u64(proto::IHAVEOPT);
    greeting.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    let out = framed.get_mut();
    out.write_all(&greeting)
        .await
        .map_err(|e| Error::io("sending greeting", e))?;
    out.flush()
        .await
        .map_err(|e| Error::io("sending greeting", e))?;

    let client_flags = match framed.next().await {
        Some(Ok(HandshakeFrame::ClientFlags(f))) => f,
        None => return Ok(None),
        Some(Err(CodecError::Truncated)) => return Ok(None),
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(_)) => return Err(Error::Handshake("expected client flags".into())),
    };
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        // The protocol requires dropping the connection on unknown client flags.
        return Err(Error::Handshake(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    trace!(client_flags, "client flags");
    Ok(Some(client_flags))
}

impl Handshake<'_> {
    async fn send<W: AsyncWrite + Unpin>(&mut self, out: &mut W) -> Result<(), Error> {
        if !self.buf.is_empty() {
            out.write_all(&self.buf)
                .await
                .map_err(|e| Error::io("sending option reply", e))?;
            out.flush()
                .await
                .map_err(|e| Error::io("sending option reply", e))?;
            self.buf.clear();
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        put_option_reply(&mut self.buf, option, reply, payload);
    }

    fn reply_error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(option, reply, message.as_bytes());
    }

    fn tls_required(&mut self, code: u32) {
        self.reply_error(
            code,
            proto::REP_ERR_TLS_REQD,
            "TLS is required: send NBD_OPT_STARTTLS first",
        );
    }

    /// Handles one option, queueing replies in `buf`; returns an outcome when negotiation ends.
    fn handle(&mut self, option: ClientOption) -> Result<Option<Outcome>, Error> {
        let code = option.code();
        debug!(?option, "option");
        if self.tls == TlsMode::Required {
            match option {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    // No error reply is possible here; the protocol says to end the session.
                    return Err(Error::Handshake(
                        "EXPORT_NAME before STARTTLS on a server that requires TLS".into(),
                    ));
                }
                _ => {
                    self.tls_required(code);
                    return Ok(None);
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                let Some(export) = self.exports.find(&name) else {
                    return Err(Error::Handshake(format!("unknown export {name:?}")));
                };
                let negotiated = self.finish(export, false);
                self.buf.put_u64(negotiated.export.device.size());
                self.buf.put_u16(negotiated.flags);
                if !self.state.no_zeroes {
                    self.buf.put_bytes(0, 124);
                }
                return Ok(Some(Outcome::Transmission(negotiated)));
            }
            ClientOption::Abort => {
                self.reply(code, proto::REP_ACK, &[]);
                return Ok(Some(Outcome::Closed));
            }
            ClientOption::List => {
                if !self.allow_list {
                    self.reply_error(code, proto::REP_ERR_POLICY, "listing exports is disabled");
                    return Ok(None);
                }
                for export in self.exports.all() {
                    let mut p = BytesMut::new();
                    p.put_u32(export.name.len() as u32);
                    p.put_slice(export.name.as_bytes());
                    p.put_slice(export.description.as_bytes());
                    self.reply(code, proto::REP_SERVER, &p);
                }
                self.reply(code, proto::REP_ACK, &[]);
            }
            ClientOption::StartTls => match self.tls {
                TlsMode::Off => self.reply_error(
                    code,
                    proto::REP_ERR_POLICY,
                    "TLS is not offered by this server",
                ),
                TlsMode::Active => {
                    self.reply_error(code, proto::REP_ERR_INVALID, "TLS is already running")
                }
                TlsMode::Required => {
                    self.reply(code, proto::REP_ACK, &[]);
                    return Ok(Some(Outcome::StartTls(Resume {
                        client_flags: self.client_flags,
                    })));
                }
            },
            ClientOption::Info(req) => {
                self.info(code, &req);
            }
            ClientOption::Go(req) => {
                if let Some(export) = self.info(code, &req) {
                    let sizes_requested = req.info_requests.contains(&proto::INFO_BLOCK_SIZE);
                    let negotiated = self.finish(export, sizes_requested);
                    return Ok(Some(Outcome::Transmission(negotiated)));
                }
            }
            ClientOption::StructuredReply => {
                self.state.structured = true;
                self.reply(code, proto::REP_ACK, &[]);
            }
            ClientOption::ListMetaContext(req) => self.meta_context(code, &req, false),
            ClientOption::SetMetaContext(req) => self.meta_context(code, &req, true),
            ClientOption::ExtendedHeaders => {
                self.reply_error(
                    code,
                    proto::REP_ERR_UNSUP,
                    "extended headers are not supported",
                );
            }
            _ => {
                self.reply_error(code, proto::REP_ERR_UNSUP, "unknown option");
            }
        }
        Ok(None)
    }

    /// Ends negotiation on `export`. A client that asked for block sizes with `GO` must honour
    /// them; any other client is served the protocol's defaults (minimum 1, maximum payload
    /// 32 MiB), and the server adapts its requests to a stricter device.
    fn finish(&self, export: Arc<Export>, sizes_requested: bool) -> Negotiated {
        let device_sizes = export.device.block_sizes().effective();
        let (sizes, adapt) = if sizes_requested {
            (device_sizes, None)
        } else {
            let defaults = BlockSizes {
                minimum: 1,
                preferred: device_sizes.preferred,
                maximum: proto::MAX_WRITE_PAYLOAD,
            };
            let stricter = device_sizes.minimum > 1 || device_sizes.maximum < defaults.maximum;
            (defaults, stricter.then_some(device_sizes))
        };
        let base_allocation = match &self.state.meta_export {
            Some(e) if self.state.structured && Arc::ptr_eq(e, &export) => {
                Some(proto::BASE_ALLOCATION_ID)
            }
            _ => None,
        };
        Negotiated {
            flags: transmission_flags(&export, self.state.structured),
            sizes,
            adapt,
            structured: self.state.structured,
            base_allocation,
            export,
        }
    }

    /// Replies to INFO/GO; returns the export when the reply ended with ACK.
    fn info(&mut self, code: u32, req: &ExportRequest) -> Option<Arc<Export>> {
        let Some(export) = self.exports.find(&req.name) else {
            self.reply_error(code, proto::REP_ERR_UNKNOWN, "no such export");
            return None;
        };
        let dev = &export.device;
        let mut p = BytesMut::new();
        p.put_u16(proto::INFO_EXPORT);
        p.put_u64(dev.size());
        p.put_u16(transmission_flags(&export, self.state.structured));
        self.reply(code, proto::REP_INFO, &p);
        let sizes = dev.block_sizes().effective();
        let mut wanted: Vec<u16> = Vec::new();
        for &info in &req.info_requests {
            if !wanted.contains(&info) {
                wanted.push(info);
            }
        }
        // Block sizes go only to a client that asks: one that does not is served the protocol's
        // defaults (see `finish`), so for it there are no stricter constraints to announce.
        for info in wanted {
            let mut p = BytesMut::new();
            match info {
                proto::INFO_NAME => {
                    p.put_u16(proto::INFO_NAME);
                    p.put_slice(export.name.as_bytes());
                }
                proto::INFO_DESCRIPTION if !export.description.is_empty() => {
                    p.put_u16(proto::INFO_DESCRIPTION);
                    p.put_slice(export.description.as_bytes());
                }
                proto::INFO_BLOCK_SIZE => {
                    p.put_u16(proto::INFO_BLOCK_SIZE);
                    p.put_u32(sizes.minimum);
                    p.put_u32(sizes.preferred);
                    p.put_u32(sizes.maximum);
                }
                // INFO_EXPORT was sent above; unknown types are ignored as the protocol asks.
                _ => continue,
            }
            self.reply(code, proto::REP_INFO, &p);
        }
        self.reply(code, proto::REP_ACK, &[]);
        Some(export)
    }

    fn meta_context(&mut self, code: u32, req: &MetaContextRequest, set: bool) {
        if set {
            // SET replaces the selection even when it fails.
            self.state.meta_export = None;
            if !self.state.structured {
                self.reply_error(
                    code,
                    proto::REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                );
                return;
            }
        }
        let Some(export) = self.exports.find(&req.export) else {
            self.reply_error(code, proto::REP_ERR_UNKNOWN, "no such export");
            return;
        };
        let selected = if set {
            req.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
        } else {
            // LIST: no query lists everything; "base:" is the namespace wildcard.
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == proto::BASE_ALLOCATION || q == "base:")
        };
        if selected {
            let mut p = BytesMut::new();
            // The protocol reserves id 0 for LIST replies.
            p.put_u32(if set { proto::BASE_ALLOCATION_ID } else { 0 });
            p.put_slice(proto::BASE_ALLOCATION.as_bytes());
            self.reply(code, proto::REP_META_CONTEXT, &p);
            if set {
                self.state.meta_export = Some(export);
            }
        }
        self.reply(code, proto::REP_ACK, &[]);
    }
}
