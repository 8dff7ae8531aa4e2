//! Transmission phase: one reader loop decodes requests and spawns a task per request; one
//! writer task sends replies in completion order.
//!
//! Bounds: a request permit and (for READ/WRITE) one byte permit per payload byte are taken
//! before a request is dispatched and released only once its reply has been written, so at most
//! `max_requests` replies and `max_bytes` payload bytes are held per connection, plus the one
//! WRITE payload (≤ 32 MiB) being received.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedRwLockReadGuard, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn, Instrument};

use crate::codec::{
    put_chunk_header, put_simple_reply, truncate_message, CodecError, Command, Request,
    RequestCodec,
};
use crate::device::{BlockSizes, Export, Extent, ReadSegment};
use crate::error::{DeviceError, Error};
use crate::handshake::Negotiated;
use crate::proto;
use crate::stats::SessionGuard;
use crate::unaligned::Adapter;

/// Static zeroes for holes in simple (unstructured) read replies.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_requests: usize,
    pub max_bytes: usize,
    /// Close the connection after this long with no request in flight (`None`: never).
    pub idle_close: Option<std::time::Duration>,
}

/// What the validator needs to know about the connection; plain data so it can be fuzzed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub size: u64,
    pub flags: u16,
    pub sizes: BlockSizes,
    pub base_allocation: Option<u32>,
    pub fast_zero: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
    Disc,
}

impl Op {
    /// Payload bytes this request holds in memory until its reply is written.
    fn buffered_bytes(&self) -> u32 {
        match self {
            Op::Read { len, .. } => *len,
            Op::Write { data, .. } => data.len() as u32,
            _ => 0,
        }
    }

    fn modifies(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
        )
    }
}

/// An error answer: NBD error value and a short message for structured replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub errno: u32,
    pub message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        message: message.into(),
    }
}

impl From<DeviceError> for Rejection {
    fn from(e: DeviceError) -> Self {
        reject(e.kind().nbd_errno(), e.message())
    }
}

/// Checks a request against the negotiated export, in the order: unknown command, read-only,
/// flags, unadvertised command, payload size, bounds, alignment.
pub(crate) fn validate(req: &Request, p: &Params) -> Result<Op, Rejection> {
    use proto::*;
    let cmd = req.command;
    if let Command::Unknown(c) = cmd {
        return Err(reject(EINVAL, format!("unknown command {c}")));
    }
    if cmd == Command::Disc {
        return Ok(Op::Disc);
    }
    let advertised = |flag: u16| p.flags & flag != 0;
    if advertised(TFLAG_READ_ONLY)
        && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes)
    {
        return Err(reject(EPERM, "export is read-only"));
    }
    let flags = req.flags;
    if flags & !KNOWN_CMD_FLAGS != 0 {
        return Err(reject(EINVAL, format!("unknown command flags {flags:#x}")));
    }
    let mut allowed = 0;
    if advertised(TFLAG_SEND_FUA) {
        allowed |= CMD_FLAG_FUA;
    }
    match cmd {
        Command::Read if advertised(TFLAG_SEND_DF) => allowed |= CMD_FLAG_DF,
        Command::WriteZeroes => {
            allowed |= CMD_FLAG_NO_HOLE;
            if advertised(TFLAG_SEND_FAST_ZERO) {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if flags & !allowed != 0 {
        return Err(reject(
            EINVAL,
            format!("command flags {flags:#x} are not valid for {cmd:?}"),
        ));
    }
    let unadvertised = match cmd {
        Command::Flush => !advertised(TFLAG_SEND_FLUSH),
        Command::Trim => !advertised(TFLAG_SEND_TRIM),
        Command::WriteZeroes => !advertised(TFLAG_SEND_WRITE_ZEROES),
        Command::Cache => !advertised(TFLAG_SEND_CACHE),
        _ => false,
    };
    if unadvertised {
        return Err(reject(
            EINVAL,
            format!("{cmd:?} is not supported by this export"),
        ));
    }
    let context = match (cmd, p.base_allocation) {
        (Command::BlockStatus, None) => {
            return Err(reject(EINVAL, "no metadata context was negotiated"));
        }
        (_, ctx) => ctx.unwrap_or(0),
    };
    if cmd == Command::Flush {
        return Ok(Op::Flush);
    }

    let (offset, len) = (req.offset, req.length);
    if matches!(cmd, Command::Read | Command::Write) && len > p.sizes.maximum {
        return Err(reject(
            EINVAL,
            format!(
                "request of {len} bytes exceeds the maximum payload of {}",
                p.sizes.maximum
            ),
        ));
    }
    let end = offset.checked_add(u64::from(len));
    if end.is_none_or(|end| end > p.size) {
        let errno = match cmd {
            Command::Write | Command::WriteZeroes => ENOSPC,
            _ => EINVAL,
        };
        return Err(reject(
            errno,
            format!("range {offset}+{len} is beyond the export size {}", p.size),
        ));
    }
    let min = u64::from(p.sizes.minimum);
    if min > 1 {
        let tail_ok = end == Some(p.size);
        let misaligned = offset % min != 0
            || (cmd != Command::BlockStatus && u64::from(len) % min != 0 && !tail_ok);
        if misaligned {
            return Err(reject(
                EINVAL,
                format!("range {offset}+{len} is not aligned to the {min}-byte block size"),
            ));
        }
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    Ok(match cmd {
        Command::Read => Op::Read {
            offset,
            len,
            df: flags & CMD_FLAG_DF != 0,
        },
        Command::Write => Op::Write {
            offset,
            data: req.payload.clone(),
            fua,
        },
        Command::Trim => Op::Trim { offset, len, fua },
        Command::WriteZeroes => {
            if flags & CMD_FLAG_FAST_ZERO != 0 && !p.fast_zero {
                return Err(reject(ENOTSUP, "fast zeroing is not available"));
            }
            Op::WriteZeroes {
                offset,
                len,
                fua,
                may_trim: flags & CMD_FLAG_NO_HOLE == 0,
            }
        }
        Command::Cache => Op::Cache { offset, len },
        Command::BlockStatus => {
            if len == 0 {
                // A successful reply needs at least one extent of nonzero length.
                return Err(reject(EINVAL, "block status of zero length"));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
                context,
            }
        }
        Command::Flush | Command::Disc | Command::Unknown(_) => {
            return Err(reject(EINVAL, "unreachable command"));
        }
    })
}

/// Checks a device's read result and puts it in sending form: empty pieces dropped, adjacent
/// holes merged, and everything in one data piece when the client asked not to fragment.
pub(crate) fn normalize_read(
    segments: Vec<ReadSegment>,
    len: u32,
    df: bool,
) -> Result<Vec<ReadSegment>, Rejection> {
    let total: u64 = segments.iter().map(ReadSegment::len).sum();
    if total != u64::from(len) {
        return Err(reject(
            proto::EIO,
            format!("device returned {total} bytes for a read of {len}"),
        ));
    }
    let mut out: Vec<ReadSegment> = Vec::with_capacity(segments.len());
    for seg in segments {
        if seg.is_empty() {
            continue;
        }
        match (out.last_mut(), seg) {
            (Some(ReadSegment::Zero(prev)), ReadSegment::Zero(n)) => *prev += n,
            (_, seg) => out.push(seg),
        }
    }
    if df && out.len() > 1 {
        let mut buf = BytesMut::with_capacity(len as usize);
        for seg in out {
            match seg {
                ReadSegment::Data(d) => buf.extend_from_slice(&d),
                ReadSegment::Zero(n) => buf.put_bytes(0, n as usize),
            }
        }
        out = vec![ReadSegment::Data(buf.freeze())];
    }
    Ok(out)
}

/// Clips a device's extents to the request: nonzero lengths, no more than `len` in total, at
/// most 2^20 extents, exactly one with REQ_ONE, adjacent equal states merged.
pub(crate) fn normalize_extents(
    extents: Vec<Extent>,
    len: u32,
    req_one: bool,
) -> Result<Vec<Extent>, Rejection> {
    let len = u64::from(len);
    let mut out: Vec<Extent> = Vec::new();
    let mut sum = 0u64;
    for e in extents {
        if sum >= len || out.len() >= proto::MAX_EXTENTS_PER_CHUNK {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let take = u64::from(e.length).min(len - sum) as u32;
        let flags = e.flags & (proto::STATE_HOLE | proto::STATE_ZERO);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += take,
            _ => out.push(Extent {
                length: take,
                flags,
            }),
        }
        sum += u64::from(take);
    }
    if out.is_empty() {
        return Err(reject(proto::EIO, "device returned no extents"));
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}

/// Permits travelling with a reply; dropping them admits the next requests.
#[derive(Default)]
struct Permits {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Body {
    Ok,
    Error(Rejection),
    Read {
        offset: u64,
        segments: Vec<ReadSegment>,
    },
    BlockStatus {
        context: u32,
        extents: Vec<Extent>,
    },
}

struct Reply {
    cookie: u64,
    body: Body,
    _permits: Permits,
}

struct Ctx {
    export: Arc<Export>,
    session: Arc<SessionGuard>,
    /// Writes hold a read guard from before dispatch until the device finished them; FLUSH takes
    /// the write side, so it waits for every write that was received before it.
    barrier: Arc<RwLock<()>>,
    modified: AtomicBool,
    /// Set when this client was promised the protocol's default block sizes but the device
    /// has stricter ones.
    adapter: Option<Adapter>,
    /// Whether changes must take the export's write order (the device has blocks larger than
    /// a byte, so some connection may be running read-modify-write cycles).
    ordered: bool,
}

/// Runs the transmission phase until the client disconnects, a framing error, or shutdown.
pub(crate) async fn run<R, W>(
    mut framed: FramedRead<R, RequestCodec>,
    out: BufWriter<W>,
    neg: Negotiated,
    limits: Limits,
    session: Arc<SessionGuard>,
    shutdown: CancellationToken,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let params = Params {
        size: neg.export.device.size(),
        flags: neg.flags,
        sizes: neg.sizes,
        base_allocation: neg.base_allocation,
        fast_zero: neg.export.device.supports_fast_zero(),
    };
    debug!(
        size = params.size,
        flags = format_args!("{:#x}", params.flags),
        structured = neg.structured,
        "transmission"
    );
    let ctx = Arc::new(Ctx {
        session,
        barrier: Arc::new(RwLock::new(())),
        modified: AtomicBool::new(false),
        adapter: neg.adapt.map(|sizes| Adapter::new(sizes, params.size)),
        ordered: neg.export.device.block_sizes().minimum > 1,
        export: neg.export,
    });
    let max_requests = limits.max_requests.clamp(1, Semaphore::MAX_PERMITS);
    let requests = Arc::new(Semaphore::new(max_requests));
    let bytes = Arc::new(Semaphore::new(
        limits
            .max_bytes
            .clamp(proto::MAX_WRITE_PAYLOAD as usize, Semaphore::MAX_PERMITS),
    ));
    let (tx, rx) = mpsc::channel::<Reply>(max_requests + 16);
    let writer_failed = CancellationToken::new();
    let writer = tokio::spawn(
        write_replies(out, rx, neg.structured, writer_failed.clone()).in_current_span(),
    );

    let mut result = Ok(());
    let mut shutting_down = false;
    let idle_close = limits.idle_close;
    let idle_timer = tokio::time::sleep(idle_close.unwrap_or(std::time::Duration::MAX / 4));
    tokio::pin!(idle_timer);
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                shutting_down = true;
                break;
            }
            _ = writer_failed.cancelled() => break,
            _ = &mut idle_timer, if idle_close.is_some() => {
                let limit = idle_close.unwrap_or_default();
                match ctx.session.idle_for() {
                    Some(idle) if idle >= limit => {
                        info!(idle_secs = idle.as_secs(), "closing a connection idle for too long");
                        break;
                    }
                    // Busy, or idle for less: look again when the limit could be reached.
                    idle => {
                        let wait = limit.saturating_sub(idle.unwrap_or_default());
                        idle_timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + wait.max(std::time::Duration::from_millis(10)));
                        continue;
                    }
                }
            }
            next = framed.next() => next,
        };
        let req = match next {
            None => {
                debug!("client closed the connection");
                break;
            }
            Some(Err(CodecError::Truncated)) => {
                debug!("client closed the connection mid-request");
                break;
            }
            Some(Err(e)) => {
                debug!(error = %e, "framing error, closing");
                result = Err(e.into());
                break;
            }
            Some(Ok(req)) => req,
        };
        trace!(
            cookie = req.cookie,
            command = ?req.command,
            offset = req.offset,
            length = req.length,
            flags = req.flags,
            "request"
        );
        let op = match validate(&req, &params) {
            Ok(Op::Disc) => {
                debug!("client sent DISC");
                break;
            }
            Ok(op) => op,
            Err(rej) => {
                debug!(cookie = req.cookie, errno = rej.errno, message = %rej.message, "rejected");
                ctx.session.record(0, 0, true);
                ctx.session.request_started();
                let reply = Reply {
                    cookie: req.cookie,
                    body: Body::Error(rej),
                    _permits: Permits::default(),
                };
                let sent = tx.send(reply).await;
                ctx.session.request_finished();
                if sent.is_err() {
                    break;
                }
                continue;
            }
        };
        let cookie = req.cookie;
        drop(req);
        // Semaphores are never closed, so acquiring can only fail if that invariant breaks.
        let Ok(request_permit) = requests.clone().acquire_owned().await else {
            break;
        };
        let n = op.buffered_bytes();
        let byte_permit = if n > 0 {
            let Ok(p) = bytes.clone().acquire_many_owned(n).await else {
                break;
            };
            Some(p)
        } else {
            None
        };
        let guard = if op.modifies() {
            Some(ctx.barrier.clone().read_owned().await)
        } else {
            None
        };
        let permits = Permits {
            _request: Some(request_permit),
            _bytes: byte_permit,
        };
        ctx.session.request_started();
        let task = execute(ctx.clone(), tx.clone(), cookie, op, guard, permits);
        tokio::spawn(task.in_current_span());
    }

    if shutting_down {
        // Requests the client already sent are answered rather than silently dropped.
        // The request decoder is stateless, so a fresh one can read what is buffered.
        let mut decoder = RequestCodec::default();
        let buffered = framed.read_buffer_mut();
        while let Ok(Some(req)) = decoder.decode(buffered) {
            if req.command == Command::Disc {
                break;
            }
            let reply = Reply {
                cookie: req.cookie,
                body: Body::Error(reject(proto::ESHUTDOWN, "server is shutting down")),
                _permits: Permits::default(),
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
    }
    drop(framed);

    // Every request permit comes back once its reply is written (or dropped by a dead writer).
    let _all = requests.acquire_many(max_requests as u32).await;
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
        Err(e) => warn!(error = %e, "reply writer task failed"),
    }
    if ctx.modified.load(Ordering::Acquire) {
        // Data a client wrote should not depend on it remembering to flush before leaving.
        if let Err(e) = ctx.export.device.flush().await {
            warn!(error = %e, "flush at disconnect failed");
        }
    }
    result
}

async fn execute(
    ctx: Arc<Ctx>,
    tx: mpsc::Sender<Reply>,
    cookie: u64,
    op: Op,
    guard: Option<OwnedRwLockReadGuard<()>>,
    permits: Permits,
) {
    let modifies = op.modifies();
    // A panicking device must not leave the client waiting forever for this cookie.
    let (body, read_bytes, written_bytes) = match AssertUnwindSafe(perform(&ctx, op, guard))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            warn!(cookie, "device panicked while handling a request");
            (
                Body::Error(reject(proto::EIO, "internal error in device")),
                0,
                0,
            )
        }
    };
    let failed = matches!(body, Body::Error(_));
    if modifies && !failed {
        ctx.modified.store(true, Ordering::Release);
    }
    if let Body::Error(rej) = &body {
        debug!(cookie, errno = rej.errno, message = %rej.message, "request failed");
    }
    ctx.session.record(read_bytes, written_bytes, failed);
    let reply = Reply {
        cookie,
        body,
        _permits: permits,
    };
    // A closed channel means the connection is going away; the reply has nowhere to go.
    let _ = tx.send(reply).await;
    ctx.session.request_finished();
}

/// Runs one validated request against the device; returns the reply body and the bytes read
/// and written for the statistics.
async fn perform(ctx: &Ctx, op: Op, guard: Option<OwnedRwLockReadGuard<()>>) -> (Body, u64, u64) {
    let dev = &*ctx.export.device;
    let done = |r: Result<(), DeviceError>| match r {
        Ok(()) => Body::Ok,
        Err(e) => Body::Error(e.into()),
    };
    // Changes take the export's write order when read-modify-write cycles may be running:
    // exclusively for a cycle of this connection, shared otherwise (see `unaligned`).
    let rmw = match (&op, &ctx.adapter) {
        (Op::Write { offset, data, .. }, Some(a)) => a.needs_rmw(*offset, data.len() as u64),
        (Op::WriteZeroes { offset, len, .. }, Some(a)) => a.needs_rmw(*offset, u64::from(*len)),
        _ => false,
    };
    let order = &ctx.export.write_order;
    let (_shared, _exclusive) = match (ctx.ordered && op.modifies(), rmw) {
        (false, _) => (None, None),
        (true, false) => (Some(order.read().await), None),
        (true, true) => (None, Some(order.write().await)),
    };
    match op {
        Op::Read { offset, len, df } => {
            if len == 0 {
                return (
                    Body::Read {
                        offset,
                        segments: Vec::new(),
                    },
                    0,
                    0,
                );
            }
            let result = match &ctx.adapter {
                Some(a) => a.read(dev, offset, len).await,
                None => dev.read(offset, len).await,
            }
            .map_err(Rejection::from)
            .and_then(|segs| normalize_read(segs, len, df));
            match result {
                Ok(segments) => (Body::Read { offset, segments }, u64::from(len), 0),
                Err(rej) => (Body::Error(rej), 0, 0),
            }
        }
        Op::Write { offset, data, fua } => {
            let n = data.len() as u64;
            if n == 0 {
                return (Body::Ok, 0, 0);
            }
            let r = match &ctx.adapter {
                Some(a) => a.write(dev, offset, data, fua).await,
                None => dev.write(offset, data, fua).await,
            };
            let body = done(r);
            drop(guard);
            let written = if matches!(body, Body::Ok) { n } else { 0 };
            (body, 0, written)
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => {
            if len == 0 {
                return (Body::Ok, 0, 0);
            }
            let r = match &ctx.adapter {
                Some(a) => a.write_zeroes(dev, offset, len, fua, may_trim).await,
                None => dev.write_zeroes(offset, len, fua, may_trim).await,
            };
            let body = done(r);
            drop(guard);
            (body, 0, 0)
        }
        Op::Trim { offset, len, fua } => {
            if len == 0 {
                return (Body::Ok, 0, 0);
            }
            let mut r = match &ctx.adapter {
                Some(a) => a.trim(dev, offset, len).await,
                None => dev.trim(offset, len).await,
            };
            if r.is_ok() && fua {
                // The trait's trim has no FUA parameter; a flush gives the same guarantee.
                r = dev.flush().await;
            }
            drop(guard);
            (done(r), 0, 0)
        }
        Op::Flush => {
            // Wait for every write received before this FLUSH to finish, then make all of them
            // durable. The lock is released before flushing so later writes are not held up.
            drop(ctx.barrier.write().await);
            (done(dev.flush().await), 0, 0)
        }
        Op::Cache { offset, len } => {
            if len == 0 {
                return (Body::Ok, 0, 0);
            }
            let r = match &ctx.adapter {
                Some(a) => a.cache(dev, offset, len).await,
                None => dev.cache(offset, len).await,
            };
            (done(r), 0, 0)
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => {
            let result = match &ctx.adapter {
                Some(a) => a.block_status(dev, offset, len).await,
                None => dev.block_status(offset, len).await,
            }
            .map_err(Rejection::from)
            .and_then(|ext| normalize_extents(ext, len, req_one));
            match result {
                Ok(extents) => (Body::BlockStatus { context, extents }, 0, 0),
                Err(rej) => (Body::Error(rej), 0, 0),
            }
        }
        Op::Disc => (Body::Ok, 0, 0),
    }
}

/// Sends replies as they complete. Small headers are batched in the buffered writer; large data
/// payloads bypass its buffer, and the writer flushes whenever no more replies are queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut out: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    failed: CancellationToken,
) -> std::io::Result<()> {
    let mut scratch = BytesMut::with_capacity(256);
    let result = async {
        while let Some(reply) = rx.recv().await {
            write_reply(&mut out, &mut scratch, reply, structured).await?;
            while let Ok(reply) = rx.try_recv() {
                write_reply(&mut out, &mut scratch, reply, structured).await?;
            }
            out.flush().await?;
        }
        out.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    result
}

async fn write_reply<W: AsyncWrite + Unpin>(
    out: &mut BufWriter<W>,
    scratch: &mut BytesMut,
    reply: Reply,
    structured: bool,
) -> std::io::Result<()> {
    scratch.clear();
    let cookie = reply.cookie;
    match reply.body {
        Body::Ok => put_simple_reply(scratch, 0, cookie),
        Body::Error(rej) if structured => {
            let msg = truncate_message(&rej.message, proto::MAX_ERROR_MESSAGE_LEN);
            let len = 6 + msg.len() as u32;
            put_chunk_header(
                scratch,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                cookie,
                len,
            );
            scratch.put_u32(rej.errno);
            scratch.put_u16(msg.len() as u16);
            scratch.put_slice(msg.as_bytes());
        }
        Body::Error(rej) => put_simple_reply(scratch, rej.errno, cookie),
        Body::Read { offset, segments } if structured => {
            if segments.is_empty() {
                put_chunk_header(
                    scratch,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    cookie,
                    0,
                );
            }
            let last = segments.len().saturating_sub(1);
            let mut pos = offset;
            for (i, seg) in segments.into_iter().enumerate() {
                let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
                match seg {
                    ReadSegment::Data(data) => {
                        let n = data.len() as u64;
                        put_chunk_header(
                            scratch,
                            flags,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + data.len() as u32,
                        );
                        scratch.put_u64(pos);
                        // Header and payload in one vectored write: a large payload bypasses the
                        // buffer without first sending its 28-byte header as a packet of its own.
                        out.write_all_buf(&mut (&scratch[..]).chain(&data[..]))
                            .await?;
                        scratch.clear();
                        pos += n;
                    }
                    ReadSegment::Zero(n) => {
                        put_chunk_header(scratch, flags, proto::REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                        scratch.put_u64(pos);
                        scratch.put_u32(n);
                        pos += u64::from(n);
                    }
                }
            }
        }
        Body::Read { segments, .. } => {
            put_simple_reply(scratch, 0, cookie);
            out.write_all(scratch).await?;
            scratch.clear();
            for seg in segments {
                match seg {
                    ReadSegment::Data(data) => out.write_all(&data).await?,
                    ReadSegment::Zero(mut n) => {
                        while n > 0 {
                            let k = (n as usize).min(ZEROES.len());
                            out.write_all(&ZEROES[..k]).await?;
                            n -= k as u32;
                        }
                    }
                }
            }
        }
        Body::BlockStatus { context, extents } => {
            let len = 4 + 8 * extents.len() as u32;
            put_chunk_header(
                scratch,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len,
            );
            scratch.put_u32(context);
            for e in &extents {
                scratch.put_u32(e.length);
                scratch.put_u32(e.flags);
            }
        }
    }
    if !scratch.is_empty() {
        out.write_all(scratch).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::*;

    fn params() -> Params {
        Params {
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
                | TFLAG_SEND_DF
                | TFLAG_SEND_CACHE
                | TFLAG_SEND_FAST_ZERO,
            sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 65536,
            },
            base_allocation: Some(BASE_ALLOCATION_ID),
            fast_zero: false,
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
            payload: if command == Command::Write {
                Bytes::from(vec![0u8; length as usize])
            } else {
                Bytes::new()
            },
        }
    }

    fn errno(r: Result<Op, Rejection>) -> u32 {
        r.map(|_| 0).unwrap_or_else(|e| e.errno)
    }

    #[test]
    fn validation_errors() {
        let p = params();
        assert_eq!(
            errno(validate(&req(Command::Unknown(42), 0, 0, 0), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, 0x40, 0, 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, CMD_FLAG_REQ_ONE, 0, 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, CMD_FLAG_DF, 0, 512), &p)),
            0
        );
        assert_eq!(errno(validate(&req(Command::Read, 0, 1, 512), &p)), EINVAL);
        assert_eq!(errno(validate(&req(Command::Read, 0, 0, 100), &p)), EINVAL);
        assert_eq!(
            errno(validate(&req(Command::Read, 0, 1 << 20, 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, 0, u64::MAX, 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, 0, 0, 65536 + 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Write, 0, (1 << 20) - 512, 1024), &p)),
            ENOSPC
        );
        assert_eq!(
            errno(validate(&req(Command::WriteZeroes, 0, 1 << 20, 512), &p)),
            ENOSPC
        );
        assert_eq!(
            errno(validate(&req(Command::Trim, 0, 1 << 20, 512), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(
                &req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512),
                &p
            )),
            ENOTSUP
        );
        assert_eq!(
            errno(validate(
                &req(
                    Command::WriteZeroes,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                    0,
                    512
                ),
                &p
            )),
            0
        );
        assert_eq!(
            errno(validate(&req(Command::BlockStatus, 0, 0, 0), &p)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::BlockStatus, 0, 0, 100), &p)),
            0
        );
        // Zero-length requests are fine; the server answers them.
        assert_eq!(errno(validate(&req(Command::Read, 0, 0, 0), &p)), 0);
        assert_eq!(errno(validate(&req(Command::Write, 0, 1 << 20, 0), &p)), 0);
        assert_eq!(
            validate(&req(Command::Disc, 0xffff, 5, 5), &p),
            Ok(Op::Disc)
        );

        let mut ro = p;
        ro.flags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH;
        ro.base_allocation = None;
        assert_eq!(errno(validate(&req(Command::Write, 0, 0, 512), &ro)), EPERM);
        assert_eq!(errno(validate(&req(Command::Trim, 0, 0, 512), &ro)), EPERM);
        assert_eq!(
            errno(validate(&req(Command::WriteZeroes, 0, 0, 512), &ro)),
            EPERM
        );
        assert_eq!(
            errno(validate(&req(Command::Read, CMD_FLAG_FUA, 0, 512), &ro)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Read, CMD_FLAG_DF, 0, 512), &ro)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::BlockStatus, 0, 0, 512), &ro)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(Command::Cache, 0, 0, 512), &ro)),
            EINVAL
        );
        assert_eq!(errno(validate(&req(Command::Flush, 0, 0, 0), &ro)), 0);
    }

    #[test]
    fn unaligned_tail_is_allowed() {
        let mut p = params();
        p.size = 1000;
        assert_eq!(errno(validate(&req(Command::Read, 0, 512, 488), &p)), 0);
        assert_eq!(
            errno(validate(&req(Command::Read, 0, 512, 400), &p)),
            EINVAL
        );
    }

    #[test]
    fn read_normalization() {
        let d = |n: usize| ReadSegment::Data(Bytes::from(vec![1u8; n]));
        let segs = vec![
            ReadSegment::Zero(0),
            ReadSegment::Zero(10),
            ReadSegment::Zero(5),
            d(0),
            d(3),
        ];
        assert_eq!(
            normalize_read(segs.clone(), 18, false).unwrap(),
            vec![ReadSegment::Zero(15), d(3)]
        );
        let df = normalize_read(segs.clone(), 18, true).unwrap();
        assert_eq!(df.len(), 1);
        let ReadSegment::Data(bytes) = &df[0] else {
            panic!()
        };
        assert_eq!(&bytes[..], &[&[0u8; 15][..], &[1u8; 3][..]].concat()[..]);
        assert_eq!(normalize_read(segs, 19, false).unwrap_err().errno, EIO);
    }

    #[test]
    fn extent_normalization() {
        let e = vec![
            Extent::data(0),
            Extent::hole(100),
            Extent::hole(100),
            Extent::data(1000),
        ];
        assert_eq!(
            normalize_extents(e.clone(), 500, false).unwrap(),
            vec![Extent::hole(200), Extent::data(300)]
        );
        assert_eq!(
            normalize_extents(e.clone(), 500, true).unwrap(),
            vec![Extent::hole(200)]
        );
        assert_eq!(
            normalize_extents(e, 50, true).unwrap(),
            vec![Extent::hole(50)]
        );
        assert_eq!(normalize_extents(vec![], 50, false).unwrap_err().errno, EIO);
        let odd = vec![Extent {
            length: 10,
            flags: 0xff,
        }];
        assert_eq!(
            normalize_extents(odd, 10, false).unwrap(),
            vec![Extent {
                length: 10,
                flags: 3
            }]
        );
    }
}
