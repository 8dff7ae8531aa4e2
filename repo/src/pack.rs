//! Packs: many blobs appended into one object, closed by an encrypted table of contents.
//!
//! ```text
//! "BVPACK\0\1" | pack id (16) | blob | blob | ... | sealed TOC | TOC length (u32 LE) | "BVPTOC\0\1"
//! ```
//! The table of contents is sealed under the metadata key with the pack id as associated data, so a
//! pack can be indexed from its own last bytes without trusting anything else.

use bytes::Bytes;

use crate::blob::MAX_BLOB_RAW_LEN;
use crate::crypto::{aad, Keys};
use crate::format::{
    AAD_TOC, MAX_TOC_LEN, NONCE_LEN, PACK_HEADER_LEN, PACK_MAGIC, PACK_TRAILER_LEN,
    PACK_TRAILER_MAGIC, TAG_LEN, TOC_ENTRY_LEN, TOC_VERSION,
};
use crate::{BlobKind, ChunkId, EncodedBlob, Error, PackId, Result};

/// Where one blob sits inside its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub offset: u32,
    pub len: u32,
    pub raw_len: u32,
}

/// Accumulates blobs in memory until the pack is big enough to upload.
pub struct PackBuilder {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack: the bytes to upload and the entries to index once it is stored.
#[derive(Clone, Debug)]
pub struct SealedPack {
    pub id: PackId,
    pub bytes: Bytes,
    pub entries: Vec<PackEntry>,
}

impl SealedPack {
    /// What an index segment records of this pack.
    pub fn record(&self) -> crate::PackRecord {
        crate::PackRecord {
            id: self.id,
            size: self.bytes.len() as u64,
            entries: self.entries.clone(),
        }
    }
}

impl PackBuilder {
    pub fn new(capacity: usize) -> Self {
        let id = PackId::random();
        let mut buf = Vec::with_capacity(capacity + capacity / 16);
        buf.extend_from_slice(&PACK_MAGIC);
        buf.extend_from_slice(&id.0);
        Self {
            id,
            buf,
            entries: Vec::new(),
        }
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// True when a blob of `len` bytes may go into this pack without passing `pack_size` bytes
    /// or the most entries a reader accepts in a table of contents (`MAX_TOC_LEN`): a pack of
    /// 1 GiB of tiny, highly compressed blobs would otherwise hold a table no reader opens. An
    /// empty pack takes any blob.
    pub fn has_room(&self, len: usize, pack_size: usize) -> bool {
        self.is_empty() || (self.len() + len <= pack_size && self.entries.len() < MAX_PACK_ENTRIES)
    }

    pub fn add(&mut self, blob: &EncodedBlob) {
        self.entries.push(PackEntry {
            id: blob.id,
            kind: blob.kind,
            offset: self.buf.len() as u32,
            len: blob.bytes.len() as u32,
            raw_len: blob.raw_len,
        });
        self.buf.extend_from_slice(&blob.bytes);
    }

    /// Appends a blob already sealed elsewhere (a repack's copy): blobs are bound to their id
    /// and header, not to the pack that holds them, so their bytes move unchanged.
    pub fn add_sealed(&mut self, entry: &PackEntry, bytes: &[u8]) {
        self.entries.push(PackEntry {
            offset: self.buf.len() as u32,
            len: bytes.len() as u32,
            ..*entry
        });
        self.buf.extend_from_slice(bytes);
    }

    pub(crate) fn seal(mut self, keys: &Keys) -> SealedPack {
        let toc = encode_toc(&self.entries);
        let sealed = keys.meta.seal(&aad(AAD_TOC, &[&self.id.0]), &toc);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&PACK_TRAILER_MAGIC);
        SealedPack {
            id: self.id,
            bytes: Bytes::from(self.buf),
            entries: self.entries,
        }
    }
}

/// Most blobs in one pack: its sealed table of contents (version, count, entries, nonce and
/// tag) stays within `MAX_TOC_LEN`.
pub const MAX_PACK_ENTRIES: usize =
    (MAX_TOC_LEN as usize - 5 - NONCE_LEN - TAG_LEN) / TOC_ENTRY_LEN;

fn encode_toc(entries: &[PackEntry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + entries.len() * TOC_ENTRY_LEN);
    v.push(TOC_VERSION);
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        encode_entry(e, &mut v);
    }
    v
}

pub(crate) fn encode_entry(e: &PackEntry, v: &mut Vec<u8>) {
    v.extend_from_slice(e.id.as_bytes());
    v.push(e.kind.code());
    v.extend_from_slice(&e.offset.to_le_bytes());
    v.extend_from_slice(&e.len.to_le_bytes());
    v.extend_from_slice(&e.raw_len.to_le_bytes());
}

/// Decodes `count` entries; checks each lies inside `[PACK_HEADER_LEN, body_end)`.
pub(crate) fn decode_entries(
    data: &[u8],
    count: usize,
    body_end: u64,
    what: &dyn Fn() -> String,
) -> Result<Vec<PackEntry>> {
    if data.len() != count * TOC_ENTRY_LEN {
        return Err(Error::malformed(
            what(),
            format!("{} bytes of entries for {count} entries", data.len()),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for (i, raw) in data.chunks_exact(TOC_ENTRY_LEN).enumerate() {
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
        let kind = BlobKind::from_code(raw[32])
            .ok_or_else(|| Error::malformed(what(), format!("entry {i}: blob kind {}", raw[32])))?;
        let e = PackEntry {
            id: ChunkId::from_slice(&raw[..32]).expect("32 bytes"),
            kind,
            offset: u32_at(33),
            len: u32_at(37),
            raw_len: u32_at(41),
        };
        if (e.offset as u64) < PACK_HEADER_LEN as u64
            || e.offset as u64 + e.len as u64 > body_end
            || e.raw_len > MAX_BLOB_RAW_LEN
        {
            return Err(Error::malformed(
                what(),
                format!(
                    "entry {i} (chunk {}) at {}+{} lies outside the pack body",
                    e.id.short(),
                    e.offset,
                    e.len
                ),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// Reads the table-of-contents length from a pack's last `PACK_TRAILER_LEN` bytes.
pub(crate) fn parse_trailer(pack: &PackId, pack_size: u64, trailer: &[u8]) -> Result<u32> {
    let what = || format!("pack {pack}");
    if pack_size < (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 || trailer.len() != PACK_TRAILER_LEN
    {
        return Err(Error::malformed(
            what(),
            format!("{pack_size} bytes is too short for a pack"),
        ));
    }
    if trailer[4..] != PACK_TRAILER_MAGIC {
        return Err(Error::malformed(
            what(),
            "trailer magic missing (truncated upload?)",
        ));
    }
    let toc_len = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    if toc_len > MAX_TOC_LEN
        || toc_len as u64 + (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 > pack_size
    {
        return Err(Error::malformed(
            what(),
            format!("table of contents length {toc_len}"),
        ));
    }
    Ok(toc_len)
}

/// Decrypts and decodes a pack's table of contents.
pub(crate) fn open_toc(
    keys: &Keys,
    pack: &PackId,
    pack_size: u64,
    sealed_toc: &[u8],
) -> Result<Vec<PackEntry>> {
    let what = || format!("pack {pack} table of contents");
    let toc = keys
        .meta
        .open(&aad(AAD_TOC, &[&pack.0]), sealed_toc)
        .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
    if toc.len() < 5 || toc[0] != TOC_VERSION {
        return Err(Error::malformed(what(), "bad version or length"));
    }
    let count = u32::from_le_bytes(toc[1..5].try_into().expect("4 bytes")) as usize;
    let body_end = pack_size - PACK_TRAILER_LEN as u64 - sealed_toc.len() as u64;
    decode_entries(&toc[5..], count, body_end, &what)
}

/// Checks a whole downloaded pack's header and returns its entries.
pub(crate) fn open_whole(keys: &Keys, pack: &PackId, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    let size = bytes.len() as u64;
    if bytes.len() < PACK_HEADER_LEN + PACK_TRAILER_LEN {
        return Err(Error::malformed(format!("pack {pack}"), "too short"));
    }
    check_header(pack, &bytes[..PACK_HEADER_LEN])?;
    let toc_len = parse_trailer(pack, size, &bytes[bytes.len() - PACK_TRAILER_LEN..])? as usize;
    let toc_start = bytes.len() - PACK_TRAILER_LEN - toc_len;
    open_toc(
        keys,
        pack,
        size,
        &bytes[toc_start..bytes.len() - PACK_TRAILER_LEN],
    )
}

/// [`open_whole`] of a pack file, reading only its header, trailer and table of contents.
/// Returns the entries and the file's size; a failed read is `Error::Io` naming `path`, which
/// says nothing about the pack's data.
pub(crate) fn open_file(
    keys: &Keys,
    pack: &PackId,
    file: &std::fs::File,
    path: &std::path::Path,
) -> Result<(Vec<PackEntry>, u64)> {
    use std::os::unix::fs::FileExt;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(io)?.len();
    if size < (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 {
        return Err(Error::malformed(format!("pack {pack}"), "too short"));
    }
    let mut header = [0u8; PACK_HEADER_LEN];
    file.read_exact_at(&mut header, 0).map_err(io)?;
    check_header(pack, &header)?;
    let mut trailer = [0u8; PACK_TRAILER_LEN];
    file.read_exact_at(&mut trailer, size - PACK_TRAILER_LEN as u64)
        .map_err(io)?;
    let toc_len = parse_trailer(pack, size, &trailer)?;
    let mut toc = vec![0u8; toc_len as usize];
    let toc_start = size - PACK_TRAILER_LEN as u64 - toc_len as u64;
    file.read_exact_at(&mut toc, toc_start).map_err(io)?;
    Ok((open_toc(keys, pack, size, &toc)?, size))
}

/// Checks that a pack starts with the pack magic and its own id.
fn check_header(pack: &PackId, header: &[u8]) -> Result<()> {
    if header[..8] != PACK_MAGIC || header[8..PACK_HEADER_LEN] != pack.0 {
        return Err(Error::tampered(
            format!("pack {pack}"),
            "header does not carry this pack's magic and id",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::encode;
    use crate::crypto::random_master_key;

    #[test]
    fn build_and_reopen() {
        let keys = Keys::derive(&random_master_key());
        let mut b = PackBuilder::new(1 << 20);
        let datas: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 5000 + i as usize]).collect();
        for d in &datas {
            b.add(&encode(&keys, BlobKind::Data, keys.hasher.id(d), d, 1));
        }
        let sealed = b.seal(&keys);
        let entries = open_whole(&keys, &sealed.id, &sealed.bytes).unwrap();
        assert_eq!(entries, sealed.entries);
        for (e, d) in entries.iter().zip(&datas) {
            let blob = &sealed.bytes[e.offset as usize..(e.offset + e.len) as usize];
            let plain =
                crate::blob::decode(&keys, &e.id, None, e.raw_len, blob, &|| "t".into()).unwrap();
            assert_eq!(&plain, d);
        }
        // The table is bound to the pack id.
        assert!(open_whole(&keys, &PackId::random(), &sealed.bytes).is_err());
        // A truncated pack is reported, not panicked on.
        for cut in [0, 5, 30, sealed.bytes.len() - 1] {
            assert!(open_whole(&keys, &sealed.id, &sealed.bytes[..cut]).is_err());
        }
        let mut t = sealed.bytes.to_vec();
        let n = t.len();
        t[n - 20] ^= 0x40;
        assert!(matches!(
            open_whole(&keys, &sealed.id, &t),
            Err(Error::Tampered { .. })
        ));
    }

    /// A pack full of entries still has a table a reader accepts.
    #[test]
    fn a_pack_of_the_most_entries_opens() {
        let keys = Keys::derive(&random_master_key());
        let mut b = PackBuilder::new(1 << 20);
        let blob = encode(&keys, BlobKind::Data, keys.hasher.id(b"x"), b"x", 1);
        let mut n = 0;
        while b.has_room(blob.bytes.len(), 1 << 30) {
            b.add(&blob);
            n += 1;
        }
        assert_eq!(n, MAX_PACK_ENTRIES);
        let sealed = b.seal(&keys);
        let entries = open_whole(&keys, &sealed.id, &sealed.bytes).unwrap();
        assert_eq!(entries.len(), MAX_PACK_ENTRIES);
    }

    /// A pack file's table, read in three small pieces, is the whole pack's table; a cut,
    /// foreign or damaged file fails as the whole pack does.
    #[test]
    fn a_pack_file_opens_like_the_whole_pack() {
        let keys = Keys::derive(&random_master_key());
        let mut b = PackBuilder::new(1 << 20);
        for i in 0..7u8 {
            let d = vec![i; 3000 + i as usize];
            b.add(&encode(&keys, BlobKind::Data, keys.hasher.id(&d), &d, 1));
        }
        let sealed = b.seal(&keys);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        let open = |bytes: &[u8], id: &PackId| {
            std::fs::write(&path, bytes).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            open_file(&keys, id, &file, &path)
        };
        let (entries, size) = open(&sealed.bytes, &sealed.id).unwrap();
        assert_eq!(entries, sealed.entries);
        assert_eq!(size, sealed.bytes.len() as u64);
        assert!(matches!(
            open(&sealed.bytes, &PackId::random()),
            Err(Error::Tampered { .. })
        ));
        for cut in [0, 5, 30, sealed.bytes.len() - 1] {
            let e = open(&sealed.bytes[..cut], &sealed.id).unwrap_err();
            assert!(matches!(e, Error::Malformed { .. }), "cut at {cut}: {e}");
        }
        let mut t = sealed.bytes.to_vec();
        let n = t.len();
        t[n - 20] ^= 0x40;
        assert!(matches!(open(&t, &sealed.id), Err(Error::Tampered { .. })));
    }
}
