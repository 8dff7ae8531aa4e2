//! Entry points shared by the fuzz targets (`nbd/fuzz`) and the corpus replay test, so the
//! committed corpus exercises exactly what the fuzzer does. They panic only when an invariant of
//! this crate is broken, never because the input is malformed.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::codec::{ClientOption, HandshakeFrame, OptionCodec, Request, RequestCodec};
use crate::device::{BlockSizes, Extent, ReadSegment};
use crate::proto;
use crate::transmission::{normalize_extents, normalize_read, validate, Op, Params};

/// Feeds `data` to `decoder` in pieces of `chunk` bytes, like a socket would.
fn decode_stream<D: Decoder>(decoder: &mut D, data: &[u8], chunk: usize) -> Vec<D::Item> {
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(_) => return items,
            }
        }
    }
    if let Ok(Some(item)) = decoder.decode_eof(&mut buf) {
        items.push(item);
    }
    items
}

fn params_variants() -> [Params; 3] {
    let rw = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
        | proto::TFLAG_SEND_DF
        | proto::TFLAG_SEND_CACHE
        | proto::TFLAG_SEND_FAST_ZERO;
    [
        Params {
            size: 1 << 30,
            flags: rw,
            sizes: BlockSizes::default(),
            base_allocation: Some(proto::BASE_ALLOCATION_ID),
            fast_zero: true,
        },
        Params {
            size: 1_000_000,
            flags: rw & !proto::TFLAG_SEND_DF,
            sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 65536,
            },
            base_allocation: None,
            fast_zero: false,
        },
        Params {
            size: u64::MAX,
            flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY | proto::TFLAG_SEND_FLUSH,
            sizes: BlockSizes::default(),
            base_allocation: None,
            fast_zero: false,
        },
    ]
}

fn check_op(req: &Request, op: &Op, p: &Params) {
    let within = |offset: u64, len: u32| {
        let end = offset.checked_add(u64::from(len));
        assert!(
            end.is_some_and(|e| e <= p.size),
            "accepted out-of-range request {req:?}"
        );
    };
    let read_only = p.flags & proto::TFLAG_READ_ONLY != 0;
    match op {
        Op::Read { offset, len, .. } => {
            within(*offset, *len);
            assert!(*len <= p.sizes.maximum);
        }
        Op::Write { offset, data, .. } => {
            assert!(!read_only);
            within(*offset, data.len() as u32);
            assert_eq!(data.len(), req.length as usize);
        }
        Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
            assert!(!read_only);
            within(*offset, *len);
        }
        Op::Cache { offset, len } => within(*offset, *len),
        Op::BlockStatus { offset, len, .. } => {
            assert!(*len > 0 && p.base_allocation.is_some());
            within(*offset, *len);
        }
        Op::Flush | Op::Disc => {}
    }
}

/// Request decoder target. Byte 0 picks the read size; the rest is the client's byte stream.
/// Checks: decoding never panics, re-encoding reproduces the consumed bytes exactly, validation
/// accepts only in-range requests, and reply normalization keeps its guarantees.
pub fn request_stream(data: &[u8]) {
    let Some((&first, wire)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let requests = decode_stream(&mut RequestCodec::default(), wire, chunk);
    let mut reencoded = BytesMut::new();
    for req in &requests {
        req.encode(&mut reencoded);
    }
    assert!(
        wire.starts_with(&reencoded),
        "re-encoding differs from the input"
    );

    for req in &requests {
        for p in params_variants() {
            if let Ok(op) = validate(req, &p) {
                check_op(req, &op, &p);
            }
        }
        // Use the request fields as a device's (possibly wrong) answer.
        let len = req.length % (1 << 16);
        let pieces = [
            ReadSegment::Zero((req.offset % 4096) as u32),
            ReadSegment::Data(req.payload.clone()),
            ReadSegment::Zero(u32::from(req.flags)),
        ];
        let total: u64 = pieces.iter().map(ReadSegment::len).sum();
        let df = req.flags & 1 != 0;
        match normalize_read(pieces.to_vec(), len, df) {
            Ok(out) => {
                assert_eq!(total, u64::from(len));
                assert_eq!(
                    out.iter().map(ReadSegment::len).sum::<u64>(),
                    u64::from(len)
                );
                assert!(out.iter().all(|s| !s.is_empty()));
                if df {
                    assert!(out.len() <= 1);
                }
            }
            Err(rej) => assert_eq!(rej.errno, proto::EIO),
        }
        let extents: Vec<Extent> = req
            .cookie
            .to_be_bytes()
            .iter()
            .map(|&b| Extent {
                length: u32::from(b) * 100,
                flags: u32::from(b),
            })
            .collect();
        let want = req.length.max(1);
        if let Ok(out) = normalize_extents(extents, want, req.flags & 8 != 0) {
            let sum: u64 = out.iter().map(|e| u64::from(e.length)).sum();
            assert!(sum <= u64::from(want) && !out.is_empty());
            assert!(out.iter().all(|e| e.length > 0 && e.flags & !3 == 0));
            if req.flags & 8 != 0 {
                assert_eq!(out.len(), 1);
            }
        }
    }
}

/// Option parser target. Byte 0 picks the read size; the rest is the client's handshake stream
/// after the greeting (client flags, then options). Checks: framing and parsing never panic, and
/// a parsed option re-encodes to a payload that parses to the same option.
pub fn option_stream(data: &[u8]) {
    let Some((&first, wire)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let limit = if first & 0x80 != 0 {
        64
    } else {
        proto::MAX_OPTION_LEN
    };
    for frame in decode_stream(&mut OptionCodec::new(limit), wire, chunk) {
        match frame {
            HandshakeFrame::Option { code, data } => {
                assert!(data.len() <= limit as usize);
                if let Ok(option) = ClientOption::parse(code, &data) {
                    assert_eq!(option.code(), code);
                    let again = ClientOption::parse(code, &option.payload());
                    assert_eq!(again.as_ref(), Ok(&option), "option does not round-trip");
                }
            }
            HandshakeFrame::Oversized { len, .. } => assert!(len > limit),
            HandshakeFrame::ClientFlags(_) => {}
        }
    }
}
