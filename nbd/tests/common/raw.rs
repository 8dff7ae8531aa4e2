//! A minimal NBD client speaking raw bytes, to check the server's wire behaviour exactly and to
//! send what well-behaved clients never would.

use std::net::SocketAddr;
use std::time::Duration;

use blockvault_nbd::codec::{ClientOption, Command, ExportRequest, MetaContextRequest, Request};
use blockvault_nbd::proto;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & proto::REPLY_FLAG_DONE != 0
    }

    /// Error value of an error chunk.
    pub fn error(&self) -> Option<u32> {
        (self.kind & 0x8000 != 0).then(|| (&self.payload[..4]).get_u32())
    }

    pub fn error_message(&self) -> String {
        let n = (&self.payload[4..6]).get_u16() as usize;
        String::from_utf8_lossy(&self.payload[6..6 + n]).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk(Chunk),
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Chunk(c) => c.cookie,
        }
    }
}

pub struct RawClient {
    pub stream: TcpStream,
    next_cookie: u64,
}

/// What `negotiate` should ask for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub structured: bool,
    pub meta: bool,
}

pub const STRUCTURED: Ask = Ask {
    structured: true,
    meta: true,
};
pub const SIMPLE: Ask = Ask {
    structured: false,
    meta: false,
};

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            next_cookie: 1,
        }
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(TIMEOUT, self.stream.read_exact(&mut buf))
            .await
            .expect("timed out reading from server")
            .expect("server closed the connection");
        buf
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to server");
    }

    /// Reads the greeting and returns the handshake flags.
    pub async fn greeting(&mut self) -> u16 {
        let g = self.read_exact(proto::GREETING_LEN).await;
        let mut g = &g[..];
        assert_eq!(g.get_u64(), proto::NBDMAGIC);
        assert_eq!(g.get_u64(), proto::IHAVEOPT);
        g.get_u16()
    }

    pub async fn client_flags(&mut self, flags: u32) {
        self.write(&flags.to_be_bytes()).await;
    }

    pub async fn option(&mut self, opt: &ClientOption) {
        let mut b = BytesMut::new();
        opt.encode(&mut b);
        self.write(&b).await;
    }

    pub async fn raw_option(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b).await;
    }

    pub async fn opt_reply(&mut self) -> OptReply {
        let h = self.read_exact(proto::OPTION_REPLY_HEADER_LEN).await;
        let mut h = &h[..];
        assert_eq!(h.get_u64(), proto::OPTION_REPLY_MAGIC, "option reply magic");
        let option = h.get_u32();
        let kind = h.get_u32();
        let len = h.get_u32() as usize;
        let data = self.read_exact(len).await;
        OptReply { option, kind, data }
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    pub async fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            let last = r.kind == proto::REP_ACK || r.kind & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Full negotiation with GO; returns the client, export size and transmission flags.
    pub async fn negotiate(addr: SocketAddr, export: &str, ask: Ask) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(addr).await;
        let flags = c.greeting().await;
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        c.client_flags(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .await;
        if ask.structured {
            c.option(&ClientOption::StructuredReply).await;
            assert_eq!(c.opt_reply().await.kind, proto::REP_ACK);
        }
        if ask.meta {
            c.option(&ClientOption::SetMetaContext(MetaContextRequest {
                export: export.into(),
                queries: vec![proto::BASE_ALLOCATION.into()],
            }))
            .await;
            let replies = c.opt_replies().await;
            assert_eq!(replies.last().unwrap().kind, proto::REP_ACK, "{replies:?}");
            assert_eq!(replies.len(), 2, "one context selected: {replies:?}");
        }
        c.option(&ClientOption::Go(ExportRequest {
            name: export.into(),
            info_requests: vec![proto::INFO_BLOCK_SIZE],
        }))
        .await;
        let replies = c.opt_replies().await;
        assert_eq!(replies.last().unwrap().kind, proto::REP_ACK, "{replies:?}");
        let info = replies
            .iter()
            .find(|r| r.kind == proto::REP_INFO && r.data[..2] == [0, 0])
            .expect("INFO_EXPORT");
        let mut d = &info.data[2..];
        let size = d.get_u64();
        let tflags = d.get_u16();
        (c, size, tflags)
    }

    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Sends a request with a fresh cookie; returns the cookie.
    pub async fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.cookie();
        self.send_with_cookie(cookie, command, flags, offset, length, payload)
            .await;
        cookie
    }

    pub async fn send_with_cookie(
        &mut self,
        cookie: u64,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = BytesMut::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
            payload: Bytes::copy_from_slice(payload),
        }
        .encode(&mut b);
        self.write(&b).await;
    }

    /// Reads one reply header (and a chunk payload). A simple READ reply's data is left unread.
    pub async fn reply(&mut self) -> Reply {
        let m = self.read_exact(4).await;
        let magic = (&m[..]).get_u32();
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let h = self.read_exact(12).await;
                let mut h = &h[..];
                Reply::Simple {
                    error: h.get_u32(),
                    cookie: h.get_u64(),
                }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let h = self.read_exact(16).await;
                let mut h = &h[..];
                let flags = h.get_u16();
                let kind = h.get_u16();
                let cookie = h.get_u64();
                let len = h.get_u32() as usize;
                let payload = self.read_exact(len).await;
                Reply::Chunk(Chunk {
                    flags,
                    kind,
                    cookie,
                    payload,
                })
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads chunks of one structured reply until DONE; all must carry `cookie`.
    pub async fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            match self.reply().await {
                Reply::Chunk(c) => {
                    assert_eq!(c.cookie, cookie, "unexpected cookie");
                    let done = c.done();
                    out.push(c);
                    if done {
                        return out;
                    }
                }
                r => panic!("expected a structured chunk, got {r:?}"),
            }
        }
    }

    /// Error value of a one-part reply (simple reply, or a structured reply ending in error).
    pub async fn status(&mut self, cookie: u64) -> u32 {
        match self.reply().await {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie);
                error
            }
            Reply::Chunk(first) => {
                assert_eq!(first.cookie, cookie);
                let mut chunks = vec![first.clone()];
                if !first.done() {
                    chunks.extend(self.chunks(cookie).await);
                }
                chunks.iter().find_map(Chunk::error).unwrap_or(0)
            }
        }
    }

    /// A structured READ: reassembles data and holes, or returns the error value.
    pub async fn read_structured(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<(Vec<u8>, Vec<Chunk>), u32> {
        let cookie = self.send(Command::Read, flags, offset, len, &[]).await;
        let chunks = self.chunks(cookie).await;
        if let Some(e) = chunks.iter().find_map(Chunk::error) {
            return Err(e);
        }
        let mut buf = vec![0xEEu8; len as usize];
        let mut covered = 0u64;
        for c in &chunks {
            let mut p = &c.payload[..];
            match c.kind {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let off = p.get_u64();
                    let rel = (off - offset) as usize;
                    buf[rel..rel + p.len()].copy_from_slice(p);
                    covered += p.len() as u64;
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let off = p.get_u64();
                    let n = p.get_u32() as usize;
                    assert!(n > 0, "empty hole chunk");
                    let rel = (off - offset) as usize;
                    buf[rel..rel + n].fill(0);
                    covered += n as u64;
                }
                proto::REPLY_TYPE_NONE => assert!(c.payload.is_empty()),
                k => panic!("unexpected chunk type {k}"),
            }
        }
        assert_eq!(
            covered,
            u64::from(len),
            "chunks must cover the read exactly"
        );
        Ok((buf, chunks))
    }

    /// A BLOCK_STATUS request; returns (length, flags) extents or the error value.
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<Vec<(u32, u32)>, u32> {
        let cookie = self
            .send(Command::BlockStatus, flags, offset, len, &[])
            .await;
        let chunks = self.chunks(cookie).await;
        if let Some(e) = chunks.iter().find_map(Chunk::error) {
            return Err(e);
        }
        let bs: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| c.kind == proto::REPLY_TYPE_BLOCK_STATUS)
            .collect();
        assert_eq!(bs.len(), 1, "one chunk per context");
        let mut p = &bs[0].payload[..];
        assert_eq!(p.get_u32(), proto::BASE_ALLOCATION_ID);
        let mut out = Vec::new();
        while p.has_remaining() {
            out.push((p.get_u32(), p.get_u32()));
        }
        Ok(out)
    }

    /// True when the server closed the connection (EOF or reset) within a few seconds.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
