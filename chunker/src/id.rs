use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Content address of a chunk: BLAKE3 keyed with the repository's secret id key, over the plaintext.
///
/// Keying means the id reveals nothing about content to anyone without the repository key, while equal
/// plaintexts inside one repository still get equal ids (and so deduplicate).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub const LEN: usize = 32;

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// First eight bytes in hex: enough to name a chunk in messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl FromStr for ChunkId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| Error::BadChunkId(s.to_string()))?;
        Ok(Self(out))
    }
}

/// Computes chunk ids with the repository's id key.
#[derive(Clone)]
pub struct ChunkHasher {
    key: [u8; 32],
}

impl ChunkHasher {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub fn id(&self, data: &[u8]) -> ChunkId {
        // Multi-threaded hashing does not pay at chunk sizes (<= 8 MiB): the pipeline already keeps
        // every core busy with one chunk each.
        ChunkId(*blake3::keyed_hash(&self.key, data).as_bytes())
    }
}

impl fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkHasher(<key>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_differ_by_key_and_content() {
        let a = ChunkHasher::new([1; 32]);
        let b = ChunkHasher::new([2; 32]);
        assert_eq!(a.id(b"hello"), a.id(b"hello"));
        assert_ne!(a.id(b"hello"), b.id(b"hello"));
        assert_ne!(a.id(b"hello"), a.id(b"hellp"));
        assert_ne!(a.id(b"hello"), ChunkId(*blake3::hash(b"hello").as_bytes()));
    }

    #[test]
    fn hex_round_trip() {
        let id = ChunkHasher::new([7; 32]).id(b"x");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<ChunkId>().is_err());
    }
}
