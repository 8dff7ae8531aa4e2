//! Framing of client bytes: the handshake/option stream ([`OptionCodec`], [`ClientOption`]) and
//! transmission requests ([`RequestCodec`], [`Request`]). Everything here reads untrusted input,
//! so it never panics and never allocates more than the protocol's fixed limits.
//!
//! The encoders are the client side of the same formats; tests and fuzz targets use them to check
//! that decoding inverts encoding.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::proto;

/// A framing error: the byte stream cannot be a valid NBD conversation, so the connection ends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("write payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Command types, with unknown values kept so the server can answer them with `NBD_EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Self {
        match v {
            proto::CMD_READ => Command::Read,
            proto::CMD_WRITE => Command::Write,
            proto::CMD_DISC => Command::Disc,
            proto::CMD_FLUSH => Command::Flush,
            proto::CMD_TRIM => Command::Trim,
            proto::CMD_CACHE => Command::Cache,
            proto::CMD_WRITE_ZEROES => Command::WriteZeroes,
            proto::CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        match c {
            Command::Read => proto::CMD_READ,
            Command::Write => proto::CMD_WRITE,
            Command::Disc => proto::CMD_DISC,
            Command::Flush => proto::CMD_FLUSH,
            Command::Trim => proto::CMD_TRIM,
            Command::Cache => proto::CMD_CACHE,
            Command::WriteZeroes => proto::CMD_WRITE_ZEROES,
            Command::BlockStatus => proto::CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }
}

/// One transmission-phase request. `payload` is non-empty only for WRITE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque to the server; echoed in every reply chunk.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    pub payload: Bytes,
}

impl Request {
    /// Appends the wire form (header, then payload for WRITE).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(proto::REQUEST_HEADER_LEN + self.payload.len());
        dst.put_u32(proto::REQUEST_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.command.into());
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u32(self.length);
        dst.put_slice(&self.payload);
    }
}

/// How much to grow the read buffer at a time while a WRITE payload arrives: memory follows the
/// bytes actually received, not the length the header claims.
const PAYLOAD_RESERVE_STEP: usize = 1 << 20;

/// Decodes requests. A WRITE whose header claims more than `max_payload` bytes is a
/// [`CodecError::PayloadTooLarge`]: the payload cannot be skipped safely, so the connection ends.
#[derive(Debug, Clone)]
pub struct RequestCodec {
    max_payload: u32,
}

impl RequestCodec {
    pub fn new(max_payload: u32) -> Self {
        RequestCodec { max_payload }
    }
}

impl Default for RequestCodec {
    fn default() -> Self {
        RequestCodec::new(proto::MAX_WRITE_PAYLOAD)
    }
}

impl Decoder for RequestCodec {
    type Item = Request;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        if src.len() < proto::REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut h = &src[..proto::REQUEST_HEADER_LEN];
        let magic = h.get_u32();
        if magic != proto::REQUEST_MAGIC {
            return Err(CodecError::BadMagic {
                what: "request",
                found: u64::from(magic),
            });
        }
        let flags = h.get_u16();
        let command = Command::from(h.get_u16());
        let cookie = h.get_u64();
        let offset = h.get_u64();
        let length = h.get_u32();
        let payload_len = if command == Command::Write {
            if length > self.max_payload {
                return Err(CodecError::PayloadTooLarge {
                    len: length,
                    max: self.max_payload,
                });
            }
            length as usize
        } else {
            0
        };
        let total = proto::REQUEST_HEADER_LEN + payload_len;
        if src.len() < total {
            let missing = total - src.len();
            src.reserve(missing.min(PAYLOAD_RESERVE_STEP));
            return Ok(None);
        }
        src.advance(proto::REQUEST_HEADER_LEN);
        // Copied out rather than split off: a split shares the read buffer's allocation, which
        // a 32 MiB write grows to 64 MiB, and a 1-byte write waiting on a slow fetch would then
        // pin all of it while the byte budget counts one byte.
        let payload = Bytes::copy_from_slice(&src[..payload_len]);
        src.advance(payload_len);
        Ok(Some(Request {
            flags,
            command,
            cookie,
            offset,
            length,
            payload,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        match self.decode(src)? {
            Some(r) => Ok(Some(r)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

/// A frame of the handshake phase as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFrame {
    /// The 32-bit client flags that follow the server greeting.
    ClientFlags(u32),
    /// An option whose payload fits the limit.
    Option { code: u32, data: Bytes },
    /// An option whose announced payload is larger than the limit. The codec skips its bytes
    /// without storing them; the server answers `NBD_REP_ERR_TOO_BIG`.
    Oversized { code: u32, len: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptionState {
    ClientFlags,
    Header,
    Skipping(u64),
}

/// Decodes the client side of the handshake: client flags, then options.
#[derive(Debug, Clone)]
pub struct OptionCodec {
    state: OptionState,
    max_option_len: u32,
}

impl OptionCodec {
    pub fn new(max_option_len: u32) -> Self {
        OptionCodec {
            state: OptionState::ClientFlags,
            max_option_len,
        }
    }
}

impl OptionCodec {
    /// A decoder for the options that follow a TLS upgrade (no client flags come again).
    pub fn after_starttls() -> Self {
        OptionCodec {
            state: OptionState::Header,
            max_option_len: proto::MAX_OPTION_LEN,
        }
    }
}

impl Default for OptionCodec {
    fn default() -> Self {
        OptionCodec::new(proto::MAX_OPTION_LEN)
    }
}

impl Decoder for OptionCodec {
    type Item = HandshakeFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<HandshakeFrame>, CodecError> {
        loop {
            match self.state {
                OptionState::ClientFlags => {
                    if src.len() < 4 {
                        return Ok(None);
                    }
                    self.state = OptionState::Header;
                    return Ok(Some(HandshakeFrame::ClientFlags(src.get_u32())));
                }
                OptionState::Skipping(remaining) => {
                    let n = remaining.min(src.len() as u64);
                    src.advance(n as usize);
                    if n < remaining {
                        self.state = OptionState::Skipping(remaining - n);
                        return Ok(None);
                    }
                    self.state = OptionState::Header;
                }
                OptionState::Header => {
                    if src.len() < proto::OPTION_HEADER_LEN {
                        return Ok(None);
                    }
                    let mut h = &src[..proto::OPTION_HEADER_LEN];
                    let magic = h.get_u64();
                    if magic != proto::IHAVEOPT {
                        return Err(CodecError::BadMagic {
                            what: "option",
                            found: magic,
                        });
                    }
                    let code = h.get_u32();
                    let len = h.get_u32();
                    if len > self.max_option_len {
                        src.advance(proto::OPTION_HEADER_LEN);
                        self.state = OptionState::Skipping(u64::from(len));
                        return Ok(Some(HandshakeFrame::Oversized { code, len }));
                    }
                    let total = proto::OPTION_HEADER_LEN + len as usize;
                    if src.len() < total {
                        src.reserve(total - src.len());
                        return Ok(None);
                    }
                    src.advance(proto::OPTION_HEADER_LEN);
                    let data = src.split_to(len as usize).freeze();
                    return Ok(Some(HandshakeFrame::Option { code, data }));
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<HandshakeFrame>, CodecError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() && !matches!(self.state, OptionState::Skipping(_)) => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

/// Why an option's payload is malformed; answered with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    #[error("option payload ends early")]
    Truncated,
    #[error("option payload has {0} unexpected trailing bytes")]
    TrailingData(usize),
    #[error("option takes no payload")]
    UnexpectedData,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    #[error("string contains a NUL byte")]
    Nul,
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(ExportRequest),
    Go(ExportRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    Unknown(u32),
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u16(&mut self) -> Result<u16, OptionError> {
        if self.0.len() < 2 {
            return Err(OptionError::Truncated);
        }
        Ok(self.0.get_u16())
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        if self.0.len() < 4 {
            return Err(OptionError::Truncated);
        }
        Ok(self.0.get_u32())
    }

    fn string(&mut self, len: usize) -> Result<String, OptionError> {
        if len > self.0.len() {
            return Err(OptionError::Truncated);
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        to_string(s)
    }

    fn finish(&self) -> Result<(), OptionError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(OptionError::TrailingData(n)),
        }
    }
}

fn to_string(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > proto::MAX_STRING_LEN {
        return Err(OptionError::StringTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(OptionError::Nul);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionError::InvalidUtf8)
}

fn no_payload(data: &[u8], option: ClientOption) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError::UnexpectedData)
    }
}

fn parse_export_request(data: &[u8]) -> Result<ExportRequest, OptionError> {
    let mut r = Reader(data);
    let name_len = r.u32()? as usize;
    let name = r.string(name_len)?;
    let count = r.u16()? as usize;
    // The count is checked against the bytes present before anything is allocated for it.
    if r.0.len() < count * 2 {
        return Err(OptionError::Truncated);
    }
    let mut info_requests = Vec::with_capacity(count);
    for _ in 0..count {
        info_requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(ExportRequest {
        name,
        info_requests,
    })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut r = Reader(data);
    let name_len = r.u32()? as usize;
    let export = r.string(name_len)?;
    let count = r.u32()? as usize;
    if r.0.len() / 4 < count {
        return Err(OptionError::Truncated);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()? as usize;
        queries.push(r.string(len)?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

impl ClientOption {
    /// Parses the payload of option `code`.
    pub fn parse(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
        match code {
            proto::OPT_EXPORT_NAME => Ok(ClientOption::ExportName(to_string(data)?)),
            // The protocol asks servers to ignore any payload sent with ABORT.
            proto::OPT_ABORT => Ok(ClientOption::Abort),
            proto::OPT_LIST => no_payload(data, ClientOption::List),
            proto::OPT_STARTTLS => no_payload(data, ClientOption::StartTls),
            proto::OPT_INFO => Ok(ClientOption::Info(parse_export_request(data)?)),
            proto::OPT_GO => Ok(ClientOption::Go(parse_export_request(data)?)),
            proto::OPT_STRUCTURED_REPLY => no_payload(data, ClientOption::StructuredReply),
            proto::OPT_LIST_META_CONTEXT => {
                Ok(ClientOption::ListMetaContext(parse_meta_request(data)?))
            }
            proto::OPT_SET_META_CONTEXT => {
                Ok(ClientOption::SetMetaContext(parse_meta_request(data)?))
            }
            proto::OPT_EXTENDED_HEADERS => no_payload(data, ClientOption::ExtendedHeaders),
            other => Ok(ClientOption::Unknown(other)),
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => proto::OPT_EXPORT_NAME,
            ClientOption::Abort => proto::OPT_ABORT,
            ClientOption::List => proto::OPT_LIST,
            ClientOption::StartTls => proto::OPT_STARTTLS,
            ClientOption::Info(_) => proto::OPT_INFO,
            ClientOption::Go(_) => proto::OPT_GO,
            ClientOption::StructuredReply => proto::OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => proto::OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => proto::OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => proto::OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
        }
    }

    /// The option's payload as a client sends it.
    pub fn payload(&self) -> BytesMut {
        let mut b = BytesMut::new();
        match self {
            ClientOption::ExportName(name) => b.put_slice(name.as_bytes()),
            ClientOption::Info(r) | ClientOption::Go(r) => {
                b.put_u32(r.name.len() as u32);
                b.put_slice(r.name.as_bytes());
                b.put_u16(r.info_requests.len() as u16);
                for i in &r.info_requests {
                    b.put_u16(*i);
                }
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                b.put_u32(m.export.len() as u32);
                b.put_slice(m.export.as_bytes());
                b.put_u32(m.queries.len() as u32);
                for q in &m.queries {
                    b.put_u32(q.len() as u32);
                    b.put_slice(q.as_bytes());
                }
            }
            _ => {}
        }
        b
    }

    /// Appends the full option (IHAVEOPT, code, length, payload).
    pub fn encode(&self, dst: &mut BytesMut) {
        let payload = self.payload();
        dst.put_u64(proto::IHAVEOPT);
        dst.put_u32(self.code());
        dst.put_u32(payload.len() as u32);
        dst.put_slice(&payload);
    }
}

// ---- server-side encoders (replies) ----

pub(crate) fn put_option_reply(dst: &mut BytesMut, option: u32, reply: u32, payload: &[u8]) {
    dst.put_u64(proto::OPTION_REPLY_MAGIC);
    dst.put_u32(option);
    dst.put_u32(reply);
    dst.put_u32(payload.len() as u32);
    dst.put_slice(payload);
}

pub(crate) fn put_simple_reply(dst: &mut BytesMut, error: u32, cookie: u64) {
    dst.put_u32(proto::SIMPLE_REPLY_MAGIC);
    dst.put_u32(error);
    dst.put_u64(cookie);
}

pub(crate) fn put_chunk_header(dst: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    dst.put_u32(proto::STRUCTURED_REPLY_MAGIC);
    dst.put_u16(flags);
    dst.put_u16(kind);
    dst.put_u64(cookie);
    dst.put_u32(len);
}

/// Cuts `message` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_message(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from)
    }

    prop_compose! {
        fn arb_request()(flags in any::<u16>(), command in arb_command(), cookie in any::<u64>(),
                         offset in any::<u64>(), len in 0u32..2048,
                         fill in any::<u8>(), big_len in any::<u32>()) -> Request {
            if command == Command::Write {
                Request { flags, command, cookie, offset, length: len,
                          payload: Bytes::from(vec![fill; len as usize]) }
            } else {
                Request { flags, command, cookie, offset, length: big_len, payload: Bytes::new() }
            }
        }
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/_. -]{0,40}"
    }

    fn arb_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            arb_string().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            Just(ClientOption::StructuredReply),
            Just(ClientOption::ExtendedHeaders),
            (arb_string(), prop::collection::vec(any::<u16>(), 0..8)).prop_map(
                |(name, info_requests)| {
                    ClientOption::Go(ExportRequest {
                        name,
                        info_requests,
                    })
                }
            ),
            (arb_string(), prop::collection::vec(any::<u16>(), 0..8)).prop_map(
                |(name, info_requests)| {
                    ClientOption::Info(ExportRequest {
                        name,
                        info_requests,
                    })
                }
            ),
            (arb_string(), prop::collection::vec(arb_string(), 0..6)).prop_map(
                |(export, queries)| ClientOption::SetMetaContext(MetaContextRequest {
                    export,
                    queries
                })
            ),
            (arb_string(), prop::collection::vec(arb_string(), 0..6)).prop_map(
                |(export, queries)| ClientOption::ListMetaContext(MetaContextRequest {
                    export,
                    queries
                })
            ),
            (12u32..).prop_map(ClientOption::Unknown),
        ]
    }

    fn decode_all<D: Decoder>(
        codec: &mut D,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<D::Item>, D::Error> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(item) = codec.decode(&mut buf)? {
                out.push(item);
            }
        }
        if let Some(item) = codec.decode_eof(&mut buf)? {
            out.push(item);
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn requests_round_trip(reqs in prop::collection::vec(arb_request(), 1..8), chunk in 1usize..100) {
            let mut wire = BytesMut::new();
            for r in &reqs {
                r.encode(&mut wire);
            }
            let decoded = decode_all(&mut RequestCodec::default(), &wire, chunk).unwrap();
            prop_assert_eq!(decoded, reqs);
        }

        #[test]
        fn truncated_requests_wait_then_fail_at_eof(req in arb_request(), cut in 1usize..28) {
            let mut wire = BytesMut::new();
            req.encode(&mut wire);
            let keep = wire.len() - cut.min(wire.len() - 1);
            let mut buf = BytesMut::from(&wire[..keep]);
            let mut codec = RequestCodec::default();
            prop_assert!(codec.decode(&mut buf).unwrap().is_none());
            prop_assert!(matches!(codec.decode_eof(&mut buf), Err(CodecError::Truncated)));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let _ = decode_all(&mut RequestCodec::default(), &bytes, chunk);
            let _ = decode_all(&mut OptionCodec::default(), &bytes, chunk);
            if bytes.len() >= 4 {
                let code = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let _ = ClientOption::parse(code, &bytes[4..]);
                let _ = ClientOption::parse(code % 16, &bytes[4..]);
            }
        }

        #[test]
        fn options_round_trip(opts in prop::collection::vec(arb_option(), 1..6), flags in any::<u32>(), chunk in 1usize..50) {
            let mut wire = BytesMut::new();
            wire.put_u32(flags);
            for o in &opts {
                o.encode(&mut wire);
            }
            let frames = decode_all(&mut OptionCodec::default(), &wire, chunk).unwrap();
            prop_assert_eq!(&frames[0], &HandshakeFrame::ClientFlags(flags));
            prop_assert_eq!(frames.len(), opts.len() + 1);
            for (frame, opt) in frames[1..].iter().zip(&opts) {
                let HandshakeFrame::Option { code, data } = frame else {
                    return Err(TestCaseError::fail("expected option frame"));
                };
                prop_assert_eq!(&ClientOption::parse(*code, data).unwrap(), opt);
            }
        }
    }

    #[test]
    fn huge_write_header_is_rejected_before_any_payload() {
        let mut wire = BytesMut::new();
        Request {
            flags: 0,
            command: Command::Write,
            cookie: 1,
            offset: 0,
            length: u32::MAX,
            payload: Bytes::new(),
        }
        .encode(&mut wire);
        let err = RequestCodec::default().decode(&mut wire).unwrap_err();
        assert!(matches!(
            err,
            CodecError::PayloadTooLarge { len: u32::MAX, .. }
        ));
    }

    #[test]
    fn big_write_reserves_in_steps() {
        let mut wire = BytesMut::new();
        Request {
            flags: 0,
            command: Command::Write,
            cookie: 1,
            offset: 0,
            length: proto::MAX_WRITE_PAYLOAD,
            payload: Bytes::new(),
        }
        .encode(&mut wire);
        assert!(RequestCodec::default().decode(&mut wire).unwrap().is_none());
        assert!(wire.capacity() <= proto::REQUEST_HEADER_LEN + 2 * PAYLOAD_RESERVE_STEP);
    }

    #[test]
    fn oversized_option_is_skipped_without_storing_it() {
        let mut codec = OptionCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_u64(proto::IHAVEOPT);
        buf.put_u32(99);
        buf.put_u32(u32::MAX);
        buf.extend_from_slice(&[0xAA; 1000]);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(HandshakeFrame::ClientFlags(3))
        );
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(HandshakeFrame::Oversized {
                code: 99,
                len: u32::MAX
            })
        );
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        assert_eq!(
            codec.state,
            OptionState::Skipping(u64::from(u32::MAX) - 1000)
        );

        // A small oversized option is skipped and the next one decodes normally.
        let mut codec = OptionCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        buf.put_u64(proto::IHAVEOPT);
        buf.put_u32(99);
        buf.put_u32(20);
        buf.extend_from_slice(&[1u8; 20]);
        ClientOption::List.encode(&mut buf);
        let frames = decode_all(&mut codec, &buf, 7).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[2],
            HandshakeFrame::Option {
                code: proto::OPT_LIST,
                data: Bytes::new()
            }
        );
    }

    #[test]
    fn malformed_option_payloads() {
        assert_eq!(
            ClientOption::parse(proto::OPT_LIST, b"x"),
            Err(OptionError::UnexpectedData)
        );
        assert_eq!(
            ClientOption::parse(proto::OPT_GO, &[0, 0, 0, 9, b'a']),
            Err(OptionError::Truncated)
        );
        // name "a", one info request promised, none present
        assert_eq!(
            ClientOption::parse(proto::OPT_GO, &[0, 0, 0, 1, b'a', 0, 1]),
            Err(OptionError::Truncated)
        );
        assert_eq!(
            ClientOption::parse(proto::OPT_GO, &[0, 0, 0, 1, b'a', 0, 0, 9]),
            Err(OptionError::TrailingData(1))
        );
        // a query count of 2^32-1 with no queries is rejected before allocating
        assert_eq!(
            ClientOption::parse(
                proto::OPT_SET_META_CONTEXT,
                &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
            ),
            Err(OptionError::Truncated)
        );
        assert_eq!(
            ClientOption::parse(proto::OPT_EXPORT_NAME, &[0xff]),
            Err(OptionError::InvalidUtf8)
        );
        assert_eq!(
            ClientOption::parse(proto::OPT_EXPORT_NAME, b"a\0"),
            Err(OptionError::Nul)
        );
        assert_eq!(
            ClientOption::parse(proto::OPT_ABORT, b"ignored"),
            Ok(ClientOption::Abort)
        );
    }

    #[test]
    fn message_truncation_respects_char_boundaries() {
        assert_eq!(truncate_message("héllo", 2), "h");
        assert_eq!(truncate_message("abc", 10), "abc");
    }
}
