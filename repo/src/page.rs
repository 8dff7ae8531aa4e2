//! Chunk-map pages. A disk's chunk map lists, for every chunk slot, the id of the chunk stored there
//! or nothing for an all-zero chunk. The map is cut into pages of `SLOTS_PER_PAGE` slots; each page
//! is a content-addressed blob (kind `Page`), so a restore point that changed little shares all its
//! untouched pages with its parent and writes only the touched ones.
//!
//! Plaintext: `version u8 | slots u32 | bitmap (ceil(slots/8) bytes, LSB first, 1 = stored chunk) |
//! 32-byte id for every set bit, in slot order`.

use crate::format::PAGE_VERSION;
use crate::{ChunkId, Error, Result};

/// Slots per page: with 256 KiB chunks a page covers 1 GiB of disk and is at most 128 KiB of ids.
pub const SLOTS_PER_PAGE: u32 = 4096;

/// How many slots page `page_no` of a map of `chunks` slots holds (the last page may be short).
pub fn page_slots(chunks: u64, page_no: u64) -> usize {
    let first = page_no * SLOTS_PER_PAGE as u64;
    chunks.saturating_sub(first).min(SLOTS_PER_PAGE as u64) as usize
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMapPage {
    pub slots: Vec<Option<ChunkId>>,
}

impl ChunkMapPage {
    pub fn zeros(slots: usize) -> Self {
        Self {
            slots: vec![None; slots],
        }
    }

    pub fn is_all_zero(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    pub fn encode(&self) -> Vec<u8> {
        let n = self.slots.len();
        let present = self.slots.iter().filter(|s| s.is_some()).count();
        let mut v = Vec::with_capacity(5 + n.div_ceil(8) + present * 32);
        v.push(PAGE_VERSION);
        v.extend_from_slice(&(n as u32).to_le_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, s) in self.slots.iter().enumerate() {
            if s.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        v.extend_from_slice(&bitmap);
        for id in self.slots.iter().flatten() {
            v.extend_from_slice(id.as_bytes());
        }
        v
    }

    pub fn decode(bytes: &[u8], expected_slots: usize, what: &dyn Fn() -> String) -> Result<Self> {
        if bytes.len() < 5 || bytes[0] != PAGE_VERSION {
            return Err(Error::malformed(what(), "bad page version or length"));
        }
        let n = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        if n != expected_slots {
            return Err(Error::malformed(
                what(),
                format!("page has {n} slots, expected {expected_slots}"),
            ));
        }
        let bitmap = bytes
            .get(5..5 + n.div_ceil(8))
            .ok_or_else(|| Error::malformed(what(), "truncated page bitmap"))?;
        let mut ids = bytes[5 + bitmap.len()..].chunks_exact(32);
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let id = ids
                    .next()
                    .ok_or_else(|| Error::malformed(what(), "fewer ids than bitmap bits"))?;
                slots.push(ChunkId::from_slice(id));
            } else {
                slots.push(None);
            }
        }
        if ids.next().is_some() || !ids.remainder().is_empty() {
            return Err(Error::malformed(what(), "more ids than bitmap bits"));
        }
        Ok(Self { slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(bits in proptest::collection::vec(any::<Option<u8>>(), 0..300)) {
            let page = ChunkMapPage {
                slots: bits.iter().map(|b| b.map(|x| ChunkId([x; 32]))).collect(),
            };
            let enc = page.encode();
            prop_assert_eq!(ChunkMapPage::decode(&enc, bits.len(), &|| "p".into()).unwrap(), page);
            prop_assert!(ChunkMapPage::decode(&enc[..enc.len() - 1], bits.len(), &|| "p".into()).is_err());
        }
    }
}
