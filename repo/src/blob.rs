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

fn decompress(data: &[u8], raw_len: usize) -> Option<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut slot = d.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        slot.as_mut()?.decompress(data, raw_len).ok()
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

/// Opens a blob and returns its plaintext. `what` names the blob in errors.
pub(crate) fn decode(
    keys: &Keys,
    id: &ChunkId,
    expected_kind: Option<BlobKind>,
    raw_len: u32,
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
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
    if expected_kind.is_some_and(|k| k != kind) {
        return Err(Error::tampered(
            what(),
            format!("blob is a {kind:?}, expected {expected_kind:?}"),
        ));
    }
    if raw_len > MAX_BLOB_RAW_LEN {
        return Err(Error::malformed(
            what(),
            format!("raw length {raw_len} too large"),
        ));
    }
    let payload = keys
        .data
        .open(
            &aad(AAD_BLOB, &[id.as_bytes(), &header]),
            &bytes[BLOB_HEADER_LEN..],
        )
        .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
    let plain = match header[2] {
        COMPRESSION_NONE => payload,
        COMPRESSION_ZSTD => decompress(&payload, raw_len as usize)
            .ok_or_else(|| Error::malformed(what(), "zstd data does not decompress"))?,
        c => return Err(Error::malformed(what(), format!("compression {c}"))),
    };
    if plain.len() != raw_len as usize {
        return Err(Error::malformed(
            what(),
            format!("decoded {} bytes, expected {raw_len}", plain.len()),
        ));
    }
    Ok(plain)
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
    fn compressible_data_shrinks() {
        let keys = Keys::derive(&random_master_key());
        let data = vec![1u8; 1 << 20];
        let b = encode(&keys, BlobKind::Data, keys.hasher.id(&data), &data, 1);
        assert!(b.bytes.len() < 1000);
    }
}
