//! The blob codec: one chunk (or chunk-map page, or file) compressed with zstd, then sealed with
//! AES-256-GCM under the data key. Layout: `header[4] || nonce[12] || ciphertext || tag[16]`, with
//! the chunk id and the header as associated data, so a blob cannot be swapped for another.

use std::cell::RefCell;

use crate::crypto::{aad, Keys};
use crate::format::{AAD_BLOB, BLOB_HEADER_LEN, BLOB_VERSION, COMPRESSION_NONE, COMPRESSION_ZSTD};
use crate::{ChunkId, Error, Result};

/// Largest plaintext a blob may decode to: bounds allocations driven by stored lengths.
pub const MAX_BLOB_RAW_LEN: u32 = 16 << 20;

/// What a blob holds; recorded in its header and in pack tables of contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobKind {
    /// A chunk of disk data.
    Data,
    /// A page of a chunk map.
    Page,
    /// A piece of a stored file (VM configuration).
    File,
}

impl BlobKind {
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Data => 0,
            BlobKind::Page => 1,
            BlobKind::File => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => BlobKind::Data,
            1 => BlobKind::Page,
            2 => BlobKind::File,
            _ => return None,
        })
    }
}

/// A blob ready to be appended to a pack.
#[derive(Clone, Debug)]
pub struct EncodedBlob {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub raw_len: u32,
    pub bytes: Vec<u8>,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(level: i32, data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut slot = c.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress(data).ok()
    })
}

/// Compresses (when it pays) and seals `plaintext` whose id is `id`.
pub(crate) fn encode(
    keys: &Keys,
    kind: BlobKind,
    id: ChunkId,
    plaintext: &[u8],
    zstd_level: i32,
) -> EncodedBlob {
    let compressed = compress(zstd_level, plaintext).filter(|c| c.len() < plaintext.len());
    let (compression, payload) = match &compressed {
        Some(c) => (COMPRESSION_ZSTD, c.as_slice()),
        None => (COMPRESSION_NONE, plaintext),
    };
    let header = [BLOB_VERSION, kind.code(), compression, 0];
    let mut bytes = Vec::with_capacity(crate::format::BLOB_OVERHEAD + payload.len());
    bytes.extend_from_slice(&header);
    keys.data.seal_into(
        &aad(AAD_BLOB, &[id.as_bytes(), &header]),
        payload,
        &mut bytes,
    );
    EncodedBlob {
        id,
        kind,
        raw_len: plaintext.len() as u32,
        bytes,
    }
}

/// Checks a blob's header and length before anything is decrypted; returns the header.
fn check_header(
    id_kind: Option<BlobKind>,
    raw_len: u32,
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<[u8; BLOB_HEADER_LEN]> {
    if bytes.len() < BLOB_HEADER_LEN {
        return Err(Error::malformed(what(), "blob shorter than its header"));
    }
    let header: [u8; 4] = bytes[..BLOB_HEADER_LEN].try_into().expect("4 bytes");
    if header[0] != BLOB_VERSION {
        return Err(Error::malformed(
            what(),
            format!("blob version {}", header[0]),
        ));
    }
    let kind = BlobKind::from_code(header[1])
        .ok_or_else(|| Error::malformed(what(), format!("blob kind {}", header[1])))?;
    if id_kind.is_some_and(|k| k != kind) {
        return Err(Error::tampered(
            what(),
            format!("blob is a {kind:?}, expected {id_kind:?}"),
        ));
    }
    if raw_len > MAX_BLOB_RAW_LEN {
        return Err(Error::malformed(
            what(),
            format!("raw length {raw_len} too large"),
        ));
    }
    if !matches!(header[2], COMPRESSION_NONE | COMPRESSION_ZSTD) {
        return Err(Error::malformed(
            what(),
            format!("compression {}", header[2]),
        ));
    }
    Ok(header)
}

/// Opens a blob and returns its plaintext. `what` names the blob in errors.
pub(crate) fn decode(
    keys: &Keys,
    id: &ChunkId,
    expected_kind: Option<BlobKind>,
    raw_len: u32,
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let mut sealed = bytes.to_vec();
    let mut out = Vec::new();
    decode_into(
        keys,
        id,
        expected_kind,
        raw_len,
        &mut sealed,
        &mut out,
        what,
    )?;
    Ok(out)
}

/// Checks a stored blob: opens it and re-hashes its plaintext against its id. Verify and a
/// repack call this before they trust a copy; `scratch` is reused blob after blob.
pub(crate) fn check(
    keys: &Keys,
    id: &ChunkId,
    kind: BlobKind,
    raw_len: u32,
    bytes: &[u8],
    scratch: &mut crate::recycle::BlobScratch,
    what: &dyn Fn() -> String,
) -> Result<()> {
    scratch.sealed.clear();
    scratch.sealed.extend_from_slice(bytes);
    check_in_place(
        keys,
        id,
        kind,
        raw_len,
        &mut scratch.sealed,
        &mut scratch.plain,
        what,
    )
}

/// [`check`] of a blob whose stored bytes the caller no longer needs: they are decrypted where
/// they lie (and left holding garbage), which saves copying them. `plain` is scratch space.
pub(crate) fn check_in_place(
    keys: &Keys,
    id: &ChunkId,
    kind: BlobKind,
    raw_len: u32,
    sealed: &mut [u8],
    plain: &mut Vec<u8>,
    what: &dyn Fn() -> String,
) -> Result<()> {
    plain.clear();
    decode_into(keys, id, Some(kind), raw_len, sealed, plain, what)?;
    if keys.hasher.id(plain) != *id {
        return Err(Error::tampered(what(), "content does not match its id"));
    }
    Ok(())
}

/// Opens a blob into `out` after the bytes it already holds (a prefix the caller chose, such as
/// padding that aligns the data), decrypting `sealed` where it lies: no allocation when `out`
/// already has room for `raw_len` more bytes, so a caller that keeps its buffers decodes chunk
/// after chunk without touching the allocator. `sealed` is left holding garbage.
pub(crate) fn decode_into(
    keys: &Keys,
    id: &ChunkId,
    expected_kind: Option<BlobKind>,
    raw_len: u32,
    sealed: &mut [u8],
    out: &mut Vec<u8>,
    what: &dyn Fn() -> String,
) -> Result<()> {
    let header = check_header(expected_kind, raw_len, sealed, what)?;
    let keep = out.len();
    out.reserve(raw_len as usize);
    let payload = keys
        .data
        .open_in_place(
            &aad(AAD_BLOB, &[id.as_bytes(), &header]),
            &mut sealed[BLOB_HEADER_LEN..],
        )
        .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
    match header[2] {
        COMPRESSION_ZSTD => {
            if !decompress_into(payload, out) {
                return Err(Error::malformed(what(), "zstd data does not decompress"));
            }
        }
        _ => out.extend_from_slice(payload),
    }
    if out.len() - keep != raw_len as usize {
        return Err(Error::malformed(
            what(),
            format!("decoded {} bytes, expected {raw_len}", out.len() - keep),
        ));
    }
    Ok(())
}

/// Decompresses into the spare capacity of `out`, after what it holds (never more than that: a
/// blob that claims a smaller raw length than it holds fails here instead of growing the buffer).
fn decompress_into(data: &[u8], out: &mut Vec<u8>) -> bool {
    DECOMPRESSOR.with(|d| {
        let mut slot = d.borrow_mut();
        if slot.is_none() {
            match zstd::bulk::Decompressor::new() {
                Ok(z) => *slot = Some(z),
                Err(_) => return false,
            }
        }
        // A cursor at the end of what `out` holds: zstd writes from there, not from the start.
        let mut after = std::io::Cursor::new(&mut *out);
        after.set_position(after.get_ref().len() as u64);
        slot.as_mut()
            .is_some_and(|z| z.decompress_to_buffer(data, &mut after).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_master_key;

    #[test]
    fn round_trip_compressible_and_random() {
        let keys = Keys::derive(&random_master_key());
        let mut random = vec![0u8; 70_000];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        for data in [vec![7u8; 100_000], random, vec![]] {
            let id = keys.hasher.id(&data);
            let b = encode(&keys, BlobKind::Data, id, &data, 1);
            let out = decode(
                &keys,
                &id,
                Some(BlobKind::Data),
                b.raw_len,
                &b.bytes,
                &|| "t".into(),
            )
            .unwrap();
            assert_eq!(out, data);
            let other = keys.hasher.id(b"other");
            assert!(matches!(
                decode(&keys, &other, None, b.raw_len, &b.bytes, &|| "t".into()),
                Err(Error::Tampered { .. })
            ));
            assert!(matches!(
                decode(
                    &keys,
                    &id,
                    Some(BlobKind::Page),
                    b.raw_len,
                    &b.bytes,
                    &|| "t".into()
                ),
                Err(Error::Tampered { .. })
            ));
        }
    }

    #[test]
    fn decoding_keeps_the_prefix_already_in_the_output() {
        let keys = Keys::derive(&random_master_key());
        let mut random = vec![0u8; 70_000];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        for data in [vec![7u8; 100_000], random] {
            let id = keys.hasher.id(&data);
            let b = encode(&keys, BlobKind::Data, id, &data, 1);
            let mut out = vec![9u8; 100];
            let mut sealed = b.bytes.clone();
            decode_into(&keys, &id, None, b.raw_len, &mut sealed, &mut out, &|| {
                "t".into()
            })
            .unwrap();
            assert_eq!(&out[..100], &[9u8; 100][..]);
            assert_eq!(&out[100..], &data[..]);
        }
    }

    #[test]
    fn compressible_data_shrinks() {
        let keys = Keys::derive(&random_master_key());
        let data = vec![1u8; 1 << 20];
        let b = encode(&keys, BlobKind::Data, keys.hasher.id(&data), &data, 1);
        assert!(b.bytes.len() < 1000);
    }
}
