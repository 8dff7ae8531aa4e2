//! Reading packs back for verification: every blob (or the blobs a caller names) is decrypted,
//! decompressed and re-hashed, on every core. A pack whose own table of contents is damaged or
//! cut off is still checked blob by blob through the index's entries for it (which come from the
//! index segments), so a truncated pack reports exactly the blobs it lost.

use std::collections::HashMap;

use crate::verify_record::{DamagedBlob, PackOutcome, PackResult};
use crate::{blob, ChunkId, ChunkIdHex, Error, Location, PackEntry, PackId, Repository};

/// Blobs closer than this are fetched in one range read when only some blobs of a pack are read.
const COALESCE_GAP: u64 = 256 * 1024;
/// Largest single range read when only some blobs are read (the pack window of remote reads).
const MAX_RANGE: u64 = 4 << 20;

/// A pack check that could not be done (the store failed, not the data).
#[derive(Debug)]
pub struct Unchecked {
    pub pack: PackId,
    pub error: Error,
}

/// A pack's bytes as fetched for checking, before any decoding: what [`Repository::fetch_pack`]
/// gives and [`Repository::check_fetched`] takes. Fetching and decoding are apart so that a
/// caller can keep the store busy while the cores decode (`engine/src/verify/reading.rs`).
pub struct FetchedPack {
    id: PackId,
    result: PackResult,
    body: Body,
}

enum Body {
    /// The store does not have the pack.
    Missing,
    /// The whole pack.
    Whole(Vec<u8>),
    /// The spans (`(start offset, bytes)`) holding the named blobs, and those blobs.
    Spans(Vec<(u64, Vec<u8>)>, Vec<(ChunkId, Location)>),
}

impl Repository {
    /// Reads pack `id` (`size` bytes per the listing) for checking: the whole pack when `only` is
    /// `None`, else coalesced range reads of those blobs. A missing pack is an outcome (checked
    /// as such by [`Repository::check_fetched`]); a store error that says nothing about the data
    /// (network, permissions) is `Err`.
    pub async fn fetch_pack(
        &self,
        id: PackId,
        size: u64,
        only: Option<Vec<(ChunkId, Location)>>,
    ) -> std::result::Result<FetchedPack, Unchecked> {
        let unchecked = |error: Error| Unchecked { pack: id, error };
        let path = crate::objects::ObjectName::Pack(id).path();
        let fetched = |body| FetchedPack {
            id,
            result: PackResult {
                pack: id.to_hex(),
                size,
                outcome: PackOutcome::Ok,
                detail: None,
                table: None,
                damaged: Vec::new(),
                offsets: None,
            },
            body,
        };
        let Some(only) = only else {
            let buf = self.recycled.pack_buffer();
            return match self.storage().read_into(&path, None, buf).await {
                Ok(b) => Ok(fetched(Body::Whole(b))),
                Err(e) if e.is_not_found() => Ok(fetched(Body::Missing)),
                Err(e) => Err(unchecked(e)),
            };
        };
        // Only some blobs: coalesced range reads.
        let mut locs = only;
        locs.sort_by_key(|(_, l)| l.offset);
        locs.dedup_by_key(|(_, l)| l.offset);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (_, l) in &locs {
            let (s, e) = (l.offset as u64, l.offset as u64 + l.len as u64);
            match ranges.last_mut() {
                Some(r) if s <= r.1 + COALESCE_GAP && e - r.0 <= MAX_RANGE => r.1 = r.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        let mut spans = Vec::new();
        for (s, e) in ranges {
            let buf = self.recycled.pack_buffer();
            match self.storage().read_into(&path, Some(s..e), buf).await {
                Ok(b) => spans.push((s, b)),
                Err(err) if err.is_not_found() => {
                    for (_, b) in spans {
                        self.recycled.return_pack_buffer(b);
                    }
                    return Ok(fetched(Body::Missing));
                }
                // A short read: the pack was cut off; the blobs past its end are damaged.
                Err(Error::Malformed { .. }) => {}
                Err(err) => return Err(unchecked(err)),
            }
        }
        Ok(fetched(Body::Spans(spans, locs)))
    }

    /// Checks the blobs of a fetched pack on every core: each is decrypted, decompressed and
    /// re-hashed. Missing and damaged packs are outcomes, not errors.
    pub async fn check_fetched(
        &self,
        fetched: FetchedPack,
    ) -> std::result::Result<PackResult, Unchecked> {
        let FetchedPack {
            id,
            mut result,
            body,
        } = fetched;
        let unchecked = |error: Error| Unchecked { pack: id, error };
        let (spans, entries) = match body {
            Body::Missing => {
                result.outcome = PackOutcome::Missing;
                result.detail = Some("missing from the repository".into());
                return Ok(result);
            }
            Body::Whole(bytes) => {
                let keys = self.keys().clone();
                let entries = match crate::pack::open_whole(&keys, &id, &bytes) {
                    Ok(entries) => entries,
                    Err(e) => {
                        let index = self.local_index();
                        let known = tokio::task::spawn_blocking(move || index.entries_of(&id))
                            .await
                            .map_err(|e| unchecked(Error::Invalid(e.to_string())))?
                            .map_err(unchecked)?;
                        result.table = Some(e.to_string());
                        known.into_iter().map(entry_at).collect()
                    }
                };
                (vec![(0, bytes)], entries)
            }
            Body::Spans(spans, locs) => {
                result.offsets = Some(locs.iter().map(|(_, l)| l.offset).collect());
                (spans, locs.into_iter().map(entry_at).collect())
            }
        };
        let damaged = decode_all(self, id, spans, entries).await;
        Ok(finish(result, damaged))
    }
}

/// The table entry of a blob the index places at `l`.
fn entry_at((id, l): (ChunkId, Location)) -> PackEntry {
    PackEntry {
        id,
        kind: l.kind,
        offset: l.offset,
        len: l.len,
        raw_len: l.raw_len,
    }
}

fn finish(mut r: PackResult, damaged: Vec<DamagedBlob>) -> PackResult {
    r.damaged = damaged;
    if !r.damaged.is_empty() || r.table.is_some() {
        r.outcome = PackOutcome::Damaged;
        r.detail = Some(match (&r.table, r.damaged.first()) {
            (Some(t), None) => format!("table of contents: {t}; every blob is intact"),
            (Some(t), Some(d)) => format!(
                "table of contents: {t}; {} blob(s) damaged, first: {}",
                r.damaged.len(),
                d.detail
            ),
            (None, Some(d)) => format!("{} blob(s) damaged, first: {}", r.damaged.len(), d.detail),
            (None, None) => unreachable!("checked above"),
        });
    }
    r
}

/// Decodes every entry from the fetched spans (`(start offset, bytes)`), split over all cores,
/// each thread with scratch buffers kept from the last pack. Each blob is decrypted where it
/// lies in its span (the spans are not needed afterwards), and the spans' buffers are kept for
/// the next read.
async fn decode_all(
    repo: &Repository,
    pack: PackId,
    mut spans: Vec<(u64, Vec<u8>)>,
    mut entries: Vec<PackEntry>,
) -> Vec<DamagedBlob> {
    let keys = repo.keys().clone();
    let recycled = repo.recycled.clone();
    let task = tokio::task::spawn_blocking(move || {
        entries.sort_by_key(|e| (e.offset, e.len));
        entries.dedup_by(|a, b| a.offset == b.offset && a.len == b.len && a.id == b.id);
        let fail = |e: &PackEntry, detail: String| DamagedBlob {
            chunk: ChunkIdHex(e.id),
            offset: e.offset,
            len: e.len,
            detail,
        };
        let what = |e: &PackEntry| {
            format!(
                "chunk {} in pack {pack} at offset {}",
                e.id.short(),
                e.offset
            )
        };
        let (mut work, mut out) = carve(&entries, &mut spans, &fail, &what);
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(work.len().max(1));
        let per = work.len().div_ceil(threads).max(1);
        let checked: Vec<DamagedBlob> = std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .chunks_mut(per)
                .map(|part| {
                    let (keys, recycled, fail, what) = (&keys, &recycled, &fail, &what);
                    scope.spawn(move || {
                        let mut scratch = recycled.scratch();
                        let mut bad = Vec::new();
                        for (e, sealed) in part.iter_mut() {
                            let describe = || what(e);
                            if let Err(err) = blob::check_in_place(
                                keys,
                                &e.id,
                                e.kind,
                                e.raw_len,
                                sealed,
                                &mut scratch.plain,
                                &describe,
                            ) {
                                bad.push(fail(e, err.to_string()));
                            }
                        }
                        recycled.return_scratch(scratch);
                        bad
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        out.extend(checked);
        for (_, buf) in spans {
            recycled.return_pack_buffer(buf);
        }
        out.sort_by_key(|d| d.offset);
        out
    });
    task.await.unwrap_or_default()
}

/// Entries with the bytes each is decoded in, and the entries found damaged without decoding.
type Carved<'a> = (Vec<(&'a PackEntry, &'a mut [u8])>, Vec<DamagedBlob>);

/// Pairs each entry (in offset order) with its own part of the spans, to be decoded where it
/// lies. An entry past the spans' end (a truncated pack), or one that overlaps the entry
/// before it (a damaged table: two blobs cannot share bytes), is reported damaged instead.
fn carve<'a>(
    entries: &'a [PackEntry],
    spans: &'a mut [(u64, Vec<u8>)],
    fail: &dyn Fn(&PackEntry, String) -> DamagedBlob,
    what: &dyn Fn(&PackEntry) -> String,
) -> Carved<'a> {
    let ranges: Vec<(u64, u64)> = spans
        .iter()
        .map(|(start, b)| (*start, start + b.len() as u64))
        .collect();
    // The unclaimed rest of each span, and the offset it starts at.
    let mut rests: Vec<(u64, &'a mut [u8])> = spans
        .iter_mut()
        .map(|(start, b)| (*start, b.as_mut_slice()))
        .collect();
    let (mut work, mut bad) = (Vec::with_capacity(entries.len()), Vec::new());
    for e in entries {
        let (s, end) = (e.offset as u64, e.offset as u64 + e.len as u64);
        let Some(i) = ranges.iter().position(|(a, b)| s >= *a && end <= *b) else {
            let detail = format!("{}: lies beyond the end of the pack (truncated)", what(e));
            bad.push(fail(e, detail));
            continue;
        };
        let (at, rest) = std::mem::take(&mut rests[i]);
        if s < at {
            rests[i] = (at, rest);
            let detail = format!(
                "{}: overlaps the blob before it in the pack's table",
                what(e)
            );
            bad.push(fail(e, detail));
            continue;
        }
        let (_, tail) = rest.split_at_mut((s - at) as usize);
        let (mine, after) = tail.split_at_mut(e.len as usize);
        rests[i] = (end, after);
        work.push((e, mine));
    }
    (work, bad)
}

/// Groups locations by pack (for point-scoped reads).
pub fn by_pack(
    locs: impl IntoIterator<Item = (ChunkId, Location)>,
) -> HashMap<PackId, Vec<(ChunkId, Location)>> {
    let mut m: HashMap<PackId, Vec<(ChunkId, Location)>> = HashMap::new();
    for (id, l) in locs {
        m.entry(l.pack).or_default().push((id, l));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobKind;

    fn entry(n: u8, offset: u32, len: u32) -> PackEntry {
        PackEntry {
            id: ChunkId([n; 32]),
            kind: BlobKind::Data,
            offset,
            len,
            raw_len: len,
        }
    }

    /// Each entry gets exactly its own bytes; one past the spans or overlapping its predecessor
    /// is reported, not decoded.
    #[test]
    fn carve_gives_each_entry_its_bytes_and_reports_the_rest() {
        let mut spans = vec![(100u64, (0u8..50).collect::<Vec<u8>>()), (200, vec![7; 10])];
        let entries = vec![
            entry(1, 100, 10),
            entry(2, 110, 5),
            entry(3, 112, 4), // overlaps entry 2
            entry(4, 140, 10),
            entry(5, 145, 10), // runs past the first span's end
            entry(6, 200, 10),
            entry(7, 300, 1), // past every span
        ];
        let fail = |e: &PackEntry, detail: String| DamagedBlob {
            chunk: ChunkIdHex(e.id),
            offset: e.offset,
            len: e.len,
            detail,
        };
        let what = |e: &PackEntry| format!("blob {}", e.id.0[0]);
        let (work, bad) = carve(&entries, &mut spans, &fail, &what);
        let got: Vec<(u8, Vec<u8>)> = work.iter().map(|(e, b)| (e.id.0[0], b.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (1, (0..10).collect()),
                (2, (10..15).collect()),
                (4, (40..50).collect()),
                (6, vec![7; 10]),
            ]
        );
        let reported: Vec<(u32, bool)> = bad
            .iter()
            .map(|d| (d.offset, d.detail.contains("overlaps")))
            .collect();
        assert_eq!(reported, vec![(112, true), (145, false), (300, false)]);
        assert!(bad[1].detail.contains("truncated"));
    }
}
