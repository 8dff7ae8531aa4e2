//! Reading packs back for verification: every blob (or the blobs a caller names) is decrypted,
//! decompressed and re-hashed, on every core. A pack whose own table of contents is damaged or
//! cut off is still checked blob by blob through the index's entries for it (which come from the
//! index segments), so a truncated pack reports exactly the blobs it lost.
//!
//! A pack in a local directory is not read into memory first: each decoding thread reads the
//! blobs it checks next into its own buffer and decodes them there, while the bytes are still
//! in the core's cache. Reading whole packs into 16 MiB buffers made every later pass over them
//! (decrypting, then decompressing) fetch them from memory again, which cost verify 5-10 % of
//! its CPU (docs/BENCHMARKS.md, "Drop-behind, and verify reads blob by blob"). The reads go
//! around the page cache (`direct_read`) in windows of up to [`DIRECT_WINDOW`]; where the file
//! system does not allow that, blob by blob through it, with the kernel asked to read the pack
//! ahead (`POSIX_FADV_WILLNEED`) so that a cold disk is still read while earlier packs decode.

use std::path::PathBuf;

use crate::verify_record::{DamagedBlob, PackOutcome, PackResult};
use crate::{blob, ChunkId, ChunkIdHex, Error, Location, PackEntry, PackId, Repository};

/// Blobs closer than this are fetched in one range read when only some blobs of a pack are read.
const COALESCE_GAP: u64 = 256 * 1024;
/// Largest single range read when only some blobs are read (the pack window of remote reads).
const MAX_RANGE: u64 = 4 << 20;
/// Largest direct read of a local pack (more when one blob is larger): the blobs it holds are
/// decoded while it is still in the core's cache.
const DIRECT_WINDOW: u64 = 1 << 20;

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
    /// The pack's file in a local directory, opened, its blobs still to be read.
    File(LocalPack),
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
                read: None,
                run: None,
            },
            body,
        };
        let Some(only) = only else {
            if let Some(local) = self.storage().local_file(&path) {
                return match open_for_checking(local).await {
                    Ok(Some(file)) => Ok(fetched(Body::File(file))),
                    Ok(None) => Ok(fetched(Body::Missing)),
                    Err(e) => Err(unchecked(e)),
                };
            }
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
        // Ranges are read up to the pack's end: a truncated pack gives the blobs before the cut
        // as they are, and those past it are reported beyond the end (see `carve`), never a
        // whole range lost because it crossed the cut, nor the pack unchecked because a range
        // started past it.
        let mut end_of_pack = size;
        let mut spans = Vec::new();
        let missing = |spans: Vec<(u64, Vec<u8>)>| {
            for (_, b) in spans {
                self.recycled.return_pack_buffer(b);
            }
            Ok(fetched(Body::Missing))
        };
        for (s, e) in ranges {
            let e = e.min(end_of_pack);
            if s >= e {
                continue;
            }
            let buf = self.recycled.pack_buffer();
            match self.storage().read_into(&path, Some(s..e), buf).await {
                Ok(b) => spans.push((s, b)),
                Err(err) if err.is_not_found() => return missing(spans),
                Err(err) => {
                    // Cut off since it was listed? Read what is left of the range.
                    match self.storage().head(&path).await {
                        Ok(None) => return missing(spans),
                        Ok(Some(now)) if now < e => {
                            end_of_pack = now;
                            if s < now {
                                let buf = self.recycled.pack_buffer();
                                match self.storage().read_into(&path, Some(s..now), buf).await {
                                    Ok(b) => spans.push((s, b)),
                                    Err(err) if err.is_not_found() => return missing(spans),
                                    Err(err) => return Err(unchecked(err)),
                                }
                            }
                        }
                        _ => return Err(unchecked(err)),
                    }
                }
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
                        if known.is_empty() {
                            return Err(unchecked(table_and_blobs_unknown(id, &e)));
                        }
                        result.table = Some(e.to_string());
                        known.into_iter().map(entry_at).collect()
                    }
                };
                (vec![(0, bytes)], entries)
            }
            Body::File(file) => {
                let damaged = self
                    .check_file(id, file, &mut result)
                    .await
                    .map_err(unchecked)?;
                return Ok(finish(result, damaged));
            }
            Body::Spans(spans, locs) => {
                result.offsets = Some(locs.iter().map(|(_, l)| l.offset).collect());
                (spans, locs.into_iter().map(entry_at).collect())
            }
        };
        let damaged = decode_all(self, id, spans, entries)
            .await
            .map_err(unchecked)?;
        Ok(finish(result, damaged))
    }

    /// Checks every blob of a local pack file, each read by the thread that decodes it. A
    /// table that cannot be read is noted in `result`, and the index's entries for the pack are
    /// checked instead, as for a whole pack. `Err` when the file could not be read (not its data).
    async fn check_file(
        &self,
        id: PackId,
        file: LocalPack,
        result: &mut PackResult,
    ) -> Result<Vec<DamagedBlob>, Error> {
        let (keys, index) = (self.keys().clone(), self.local_index());
        let (recycled, storage) = (self.recycled.clone(), self.storage().clone());
        let (table, damaged) = tokio::task::spawn_blocking(move || {
            let path = &file.path;
            let (entries, size, table) =
                match crate::pack::open_file(&keys, &id, &file.buffered, path) {
                    Ok((entries, size)) => (entries, size, None),
                    Err(e @ Error::Io { .. }) => return Err(e),
                    Err(e) => {
                        let size = file
                            .buffered
                            .metadata()
                            .map_err(|source| Error::Io {
                                path: path.clone(),
                                source,
                            })?
                            .len();
                        let known = index.entries_of(&id)?;
                        if known.is_empty() {
                            return Err(table_and_blobs_unknown(id, &e));
                        }
                        (known.into_iter().map(entry_at).collect(), size, Some(e))
                    }
                };
            let damaged = decode_file(&keys, &recycled, id, &file, size, entries)?;
            storage.count_read(size);
            Ok((table.map(|e| e.to_string()), damaged))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))??;
        result.table = table;
        Ok(damaged)
    }
}

/// A local pack file opened for checking: through the page cache (its table is read so), and
/// around it when the file system allows (its blobs are read so).
struct LocalPack {
    buffered: std::fs::File,
    direct: Option<std::fs::File>,
    path: PathBuf,
}

/// Opens a local pack file for checking; `None` when there is no such file. When its blobs are
/// to be read through the page cache, the kernel is asked to start reading it.
async fn open_for_checking(path: PathBuf) -> Result<Option<LocalPack>, Error> {
    tokio::task::spawn_blocking(move || {
        let buffered = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let direct = match crate::direct_read::open(&path) {
            Ok(direct) => direct,
            // Deleted since the first open, which still reads it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::Io { path, source }),
        };
        if direct.is_none() {
            // Only advice: a file system that ignores it is read on demand instead.
            let _ = rustix::fs::fadvise(&buffered, 0, None, rustix::fs::Advice::WillNeed);
        }
        Ok(Some(LocalPack {
            buffered,
            direct,
            path,
        }))
    })
    .await
    .map_err(|e| Error::Invalid(e.to_string()))?
}

/// Why a pack whose table of contents cannot be read, and of which the index knows no blob (no
/// segment lists it), was not checked. Checked through no entries, it passed as a damaged table
/// with "every blob is intact" though no blob was read, and was recorded as read: its turn in
/// the rotation went by. Not checked, it is reported so and stays due.
fn table_and_blobs_unknown(pack: PackId, table: &Error) -> Error {
    Error::Malformed {
        object: format!("pack {pack}"),
        detail: format!(
            "its table of contents cannot be read ({table}) and no index segment lists its \
             blobs, so none of them could be checked"
        ),
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
) -> Result<Vec<DamagedBlob>, Error> {
    let keys = repo.keys().clone();
    let recycled = repo.recycled.clone();
    let task = tokio::task::spawn_blocking(move || {
        in_order(&mut entries);
        let (mut work, mut out) = carve(pack, &entries, &mut spans);
        let checked = on_every_core(&mut work, |part| {
            let mut scratch = recycled.scratch();
            let mut bad = Vec::new();
            for (e, sealed) in part.iter_mut() {
                if let Some(d) = check_one(&keys, pack, e, sealed, &mut scratch.plain) {
                    bad.push(d);
                }
            }
            recycled.return_scratch(scratch);
            bad
        });
        out.extend(checked.into_iter().flatten());
        for (_, buf) in spans {
            recycled.return_pack_buffer(buf);
        }
        out.sort_by_key(|d| d.offset);
        out
    });
    task.await
        .map_err(|e| Error::Invalid(format!("checking pack {pack}: {e}")))
}

/// Checks every entry of a pack file of `size` bytes, split over all cores; each thread reads
/// the blobs it checks next into its own buffer, so the bytes are decrypted and decompressed
/// while still in its core's cache. `Err` when the file could not be read.
fn decode_file(
    keys: &crate::crypto::Keys,
    recycled: &crate::recycle::Recycled,
    pack: PackId,
    file: &LocalPack,
    size: u64,
    mut entries: Vec<PackEntry>,
) -> Result<Vec<DamagedBlob>, Error> {
    in_order(&mut entries);
    let (mut work, mut out) = (Vec::with_capacity(entries.len()), Vec::new());
    let mut claimed = 0u64;
    for e in &entries {
        let (s, end) = (e.offset as u64, e.offset as u64 + e.len as u64);
        if end > size {
            out.push(damaged(pack, e, BEYOND_END));
        } else if s < claimed {
            out.push(damaged(pack, e, OVERLAPS));
        } else {
            claimed = end;
            work.push(e);
        }
    }
    let checked = on_every_core(&mut work, |part| {
        let mut scratch = recycled.scratch();
        let mut bad = Vec::new();
        let mut direct = file
            .direct
            .as_ref()
            .map(|f| move |buf: &mut [u8], at: u64| crate::direct_read::read_at(f, buf, at));
        let read = check_part(
            keys,
            pack,
            direct.as_mut().map(|d| d as &mut DirectRead),
            &file.buffered,
            part,
            &mut scratch,
            &mut bad,
        );
        recycled.return_scratch(scratch);
        read.map(|()| bad).map_err(|source| Error::Io {
            path: file.path.clone(),
            source,
        })
    });
    for part in checked {
        out.extend(part?);
    }
    out.sort_by_key(|d| d.offset);
    Ok(out)
}

/// A direct read: fills an aligned buffer from an aligned offset, as `direct_read::read_at`.
type DirectRead<'a> = dyn FnMut(&mut [u8], u64) -> std::io::Result<usize> + Send + 'a;

/// Checks one thread's `part` of a pack's entries (in offset order): by `direct` reads while
/// there are any and the device takes them, the rest through the page cache from `buffered`.
fn check_part(
    keys: &crate::crypto::Keys,
    pack: PackId,
    direct: Option<&mut DirectRead>,
    buffered: &std::fs::File,
    part: &[&PackEntry],
    scratch: &mut crate::recycle::BlobScratch,
    bad: &mut Vec<DamagedBlob>,
) -> std::io::Result<()> {
    let mut left = part;
    if let Some(direct) = direct {
        match check_direct(keys, pack, direct, &mut left, scratch, bad) {
            // The device wants another alignment: the rest goes through the page cache.
            Err(e) if crate::direct_read::refused(&e) => {}
            r => r?,
        }
    }
    check_buffered(keys, pack, buffered, left, scratch, bad)
}

/// Checks `left` (in offset order) from direct reads of up to [`DIRECT_WINDOW`] each, taking
/// each blob off `left` once checked; stops at the first failed read.
fn check_direct(
    keys: &crate::crypto::Keys,
    pack: PackId,
    read: &mut DirectRead,
    left: &mut &[&PackEntry],
    scratch: &mut crate::recycle::BlobScratch,
    bad: &mut Vec<DamagedBlob>,
) -> std::io::Result<()> {
    let windows = windows(left);
    let mut buffers = [
        std::mem::take(&mut scratch.sealed),
        std::mem::take(&mut scratch.ahead),
    ];
    let plain = &mut scratch.plain;
    let read = read_ahead(read, &windows, &mut buffers, |w, bytes| {
        for e in &left[..w.blobs] {
            let at = (e.offset as u64 - w.start) as usize;
            let Some(sealed) = bytes.get_mut(at..at + e.len as usize) else {
                // The file shrank since its size was read.
                bad.push(damaged(pack, e, BEYOND_END));
                continue;
            };
            if let Some(d) = check_one(keys, pack, e, sealed, plain) {
                bad.push(d);
            }
        }
        *left = &left[w.blobs..];
    });
    [scratch.sealed, scratch.ahead] = buffers;
    read
}

/// One direct read: its aligned start and length, and how many blobs it holds.
struct Window {
    start: u64,
    len: usize,
    blobs: usize,
}

/// Splits `entries` (in offset order) into direct reads: as many whole blobs as fit in
/// [`DIRECT_WINDOW`], and at least one.
fn windows(mut entries: &[&PackEntry]) -> Vec<Window> {
    use crate::direct_read::{align_down, align_up};
    let end_of = |e: &PackEntry| align_up(e.offset as u64 + e.len as u64);
    let mut out = Vec::new();
    while let Some(first) = entries.first() {
        let start = align_down(first.offset as u64);
        let blobs = 1 + entries[1..]
            .iter()
            .take_while(|e| end_of(e) - start <= DIRECT_WINDOW)
            .count();
        let len = (end_of(entries[blobs - 1]) - start) as usize;
        out.push(Window { start, len, blobs });
        entries = &entries[blobs..];
    }
    out
}

/// Reads `windows` in order and hands each one's bytes (fewer than asked at the end of the
/// file) to `each`, stopping at the first failed read. A helper thread reads the next window
/// while `each` works on the last, in the other of the two `buffers`: a direct read waits for
/// the device, and without this the core waited through every read (docs/BENCHMARKS.md, "Direct
/// reads overlap decoding").
fn read_ahead(
    read: &mut DirectRead,
    windows: &[Window],
    buffers: &mut [Vec<u8>; 2],
    mut each: impl FnMut(&Window, &mut [u8]),
) -> std::io::Result<()> {
    use crate::direct_read::aligned_mut;
    use std::sync::mpsc::sync_channel;
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(2);
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, std::io::Result<usize>)>(1);
    for b in buffers.iter_mut() {
        empty_tx
            .send(std::mem::take(b))
            .expect("the receiver is here");
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            for w in windows {
                let Ok(mut buf) = empty_rx.recv() else { break };
                let got = read(aligned_mut(&mut buf, w.len), w.start);
                let failed = got.is_err();
                if full_tx.send((buf, got)).is_err() || failed {
                    break;
                }
            }
            drop(full_tx);
            // The buffers handed back after the last read.
            empty_rx.iter().collect::<Vec<_>>()
        });
        let mut result = Ok(());
        let mut kept = Vec::new();
        for w in windows {
            let Ok((mut buf, got)) = full_rx.recv() else {
                break;
            };
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    kept.push(buf);
                    result = Err(e);
                    break;
                }
            };
            each(w, &mut aligned_mut(&mut buf, w.len)[..got]);
            if let Err(back) = empty_tx.send(buf) {
                kept.push(back.0);
            }
        }
        drop(empty_tx);
        kept.extend(full_rx.iter().map(|(buf, _)| buf));
        kept.extend(
            reader
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
        for (slot, buf) in buffers.iter_mut().zip(kept) {
            *slot = buf;
        }
        result
    })
}

/// Checks `entries` from reads of one blob each, through the page cache.
fn check_buffered(
    keys: &crate::crypto::Keys,
    pack: PackId,
    file: &std::fs::File,
    entries: &[&PackEntry],
    scratch: &mut crate::recycle::BlobScratch,
    bad: &mut Vec<DamagedBlob>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    for e in entries {
        let len = e.len as usize;
        // Grown once to the largest blob, never cleared: no zero-filling per blob.
        if scratch.sealed.len() < len {
            scratch.sealed.resize(len, 0);
        }
        let sealed = &mut scratch.sealed[..len];
        match file.read_exact_at(sealed, e.offset as u64) {
            Ok(()) => {}
            // The file shrank since its size was read.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                bad.push(damaged(pack, e, BEYOND_END));
                continue;
            }
            Err(err) => return Err(err),
        }
        if let Some(d) = check_one(keys, pack, e, sealed, &mut scratch.plain) {
            bad.push(d);
        }
    }
    Ok(())
}

const BEYOND_END: &str = "lies beyond the end of the pack (truncated)";
const OVERLAPS: &str = "overlaps the blob before it in the pack's table";

/// Sorts entries by offset and drops repeats (the index may list a blob the table lists too).
fn in_order(entries: &mut Vec<PackEntry>) {
    entries.sort_by_key(|e| (e.offset, e.len));
    entries.dedup_by(|a, b| a.offset == b.offset && a.len == b.len && a.id == b.id);
}

/// Decrypts, decompresses and re-hashes one blob (`sealed` is left holding garbage); the
/// damage found, if any.
fn check_one(
    keys: &crate::crypto::Keys,
    pack: PackId,
    e: &PackEntry,
    sealed: &mut [u8],
    plain: &mut Vec<u8>,
) -> Option<DamagedBlob> {
    let describe = || what(pack, e);
    blob::check_in_place(keys, &e.id, e.kind, e.raw_len, sealed, plain, &describe)
        .err()
        .map(|err| DamagedBlob {
            chunk: ChunkIdHex(e.id),
            offset: e.offset,
            len: e.len,
            detail: err.to_string(),
        })
}

/// A blob found damaged without decoding it.
fn damaged(pack: PackId, e: &PackEntry, problem: &str) -> DamagedBlob {
    DamagedBlob {
        chunk: ChunkIdHex(e.id),
        offset: e.offset,
        len: e.len,
        detail: format!("{}: {problem}", what(pack, e)),
    }
}

fn what(pack: PackId, e: &PackEntry) -> String {
    format!(
        "chunk {} in pack {pack} at offset {}",
        e.id.short(),
        e.offset
    )
}

/// Runs `check` on `work` split into one part per core, each on a thread of its own; what each
/// part returned. A panic in a part is raised again here.
fn on_every_core<T: Send, R: Send>(work: &mut [T], check: impl Fn(&mut [T]) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(work.len().max(1));
    let per = work.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let check = &check;
        let handles: Vec<_> = work
            .chunks_mut(per)
            .map(|part| scope.spawn(move || check(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Entries with the bytes each is decoded in, and the entries found damaged without decoding.
type Carved<'a> = (Vec<(&'a PackEntry, &'a mut [u8])>, Vec<DamagedBlob>);

/// Pairs each entry (in offset order) with its own part of the spans, to be decoded where it
/// lies. An entry past the spans' end (a truncated pack), or one that overlaps the entry
/// before it (a damaged table: two blobs cannot share bytes), is reported damaged instead.
fn carve<'a>(
    pack: PackId,
    entries: &'a [PackEntry],
    spans: &'a mut [(u64, Vec<u8>)],
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
            bad.push(damaged(pack, e, BEYOND_END));
            continue;
        };
        let (at, rest) = std::mem::take(&mut rests[i]);
        if s < at {
            rests[i] = (at, rest);
            bad.push(damaged(pack, e, OVERLAPS));
            continue;
        }
        let (_, tail) = rest.split_at_mut((s - at) as usize);
        let (mine, after) = tail.split_at_mut(e.len as usize);
        rests[i] = (end, after);
        work.push((e, mine));
    }
    (work, bad)
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
        let (work, bad) = carve(PackId([9; 16]), &entries, &mut spans);
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

    /// Reads ahead hand every window over once, in order, with the bytes read for it (fewer at
    /// the end of the file); a failed read ends them there, without reading further; and both
    /// buffers come back for the next pack.
    #[test]
    fn reads_ahead_hand_over_each_window_in_order_and_stop_at_a_failure() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let block = crate::direct_read::ALIGN;
        let windows: Vec<Window> = (0..10)
            .map(|i| Window {
                start: i * block,
                len: block as usize,
                blobs: 1,
            })
            .collect();
        let run = |fail_at: Option<u64>| {
            let reads = AtomicUsize::new(0);
            let mut read = |buf: &mut [u8], at: u64| {
                reads.fetch_add(1, Ordering::SeqCst);
                let i = at / block;
                if Some(i) == fail_at {
                    return Err(std::io::Error::other("device gone"));
                }
                buf.fill(i as u8);
                // The file ends half-way through the last window.
                Ok(if i == 9 { buf.len() / 2 } else { buf.len() })
            };
            let (mut seen, mut buffers) = (Vec::new(), [Vec::new(), Vec::new()]);
            let r = read_ahead(&mut read, &windows, &mut buffers, |w, bytes| {
                let i = w.start / block;
                assert!(bytes.iter().all(|&b| b == i as u8), "window {i}");
                seen.push((i, bytes.len()));
            });
            assert!(buffers.iter().all(|b| b.len() >= block as usize));
            (r, seen, reads.into_inner())
        };
        let (r, seen, reads) = run(None);
        r.unwrap();
        let mut want: Vec<_> = (0..10).map(|i| (i, block as usize)).collect();
        want[9].1 /= 2;
        assert_eq!((seen, reads), (want.clone(), 10));
        let (r, seen, reads) = run(Some(6));
        assert_eq!(r.unwrap_err().to_string(), "device gone");
        assert_eq!((seen, reads), (want[..6].to_vec(), 7));
    }

    /// Direct reads in windows, reads through the page cache blob by blob, and direct reads
    /// that the device starts refusing part-way find the same damage: flipped bytes, blobs
    /// beyond an end cut off after the size was read, and a blob larger than a window among
    /// smaller ones. A read that fails otherwise stops the check.
    #[test]
    fn direct_and_buffered_reads_of_a_pack_file_find_the_same_damage() {
        use crate::crypto::{random_master_key, Keys};
        use rand::RngCore;
        let keys = Keys::derive(&random_master_key());
        let mut builder = crate::pack::PackBuilder::new(64 << 20);
        for i in 0..40usize {
            // Random, so stored as it is: sizes from 1 KiB to a blob wider than a window.
            let len = if i == 17 {
                1536 << 10
            } else {
                1024 + i * 37_000
            };
            let mut d = vec![0u8; len];
            rand::thread_rng().fill_bytes(&mut d);
            builder.add(&blob::encode(
                &keys,
                BlobKind::Data,
                keys.hasher.id(&d),
                &d,
                1,
            ));
        }
        let sealed = builder.seal(&keys);
        let entries = sealed.entries.clone();
        let mut bytes = sealed.bytes.to_vec();
        for i in [3, 17, 30] {
            bytes[entries[i].offset as usize + 50] ^= 0x10;
        }
        let size = bytes.len() as u64;
        let cut = entries[36].offset as usize + 100;
        let dir = crate::direct_read::disk_tempdir();
        let path = dir.path().join("pack");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let recycled = crate::recycle::Recycled::new();
        let check = |direct: bool| {
            let file = LocalPack {
                buffered: std::fs::File::open(&path).unwrap(),
                direct: direct.then(|| {
                    crate::direct_read::open(&path)
                        .unwrap()
                        .expect("disk_tempdir does direct reads")
                }),
                path: path.clone(),
            };
            decode_file(&keys, &recycled, sealed.id, &file, size, entries.clone()).unwrap()
        };
        let found = |d: &[DamagedBlob]| -> Vec<(u32, String)> {
            d.iter().map(|d| (d.offset, d.detail.clone())).collect()
        };
        let (direct, buffered) = (check(true), check(false));
        assert_eq!(found(&direct), found(&buffered));

        // A device that takes three direct reads, then refuses them: the rest is read through
        // the page cache, and no blob is left out or checked twice.
        let direct_file = crate::direct_read::open(&path)
            .unwrap()
            .expect("direct reads");
        let mut reads = 0;
        let mut refusing = |buf: &mut [u8], at: u64| {
            reads += 1;
            if reads > 3 {
                let einval = rustix::io::Errno::INVAL.raw_os_error();
                return Err(std::io::Error::from_raw_os_error(einval));
            }
            crate::direct_read::read_at(&direct_file, buf, at)
        };
        let part: Vec<&PackEntry> = entries.iter().collect();
        let (mut scratch, mut fell_back) = (Default::default(), Vec::new());
        let buffered_file = std::fs::File::open(&path).unwrap();
        check_part(
            &keys,
            sealed.id,
            Some(&mut refusing),
            &buffered_file,
            &part,
            &mut scratch,
            &mut fell_back,
        )
        .unwrap();
        assert_eq!(reads, 4, "three windows read directly, the fourth refused");
        assert_eq!(found(&fell_back), found(&buffered));

        // Any other failed read is the device's, not the data's: the part stops with it.
        let mut failing = |_: &mut [u8], _: u64| Err(std::io::Error::other("device gone"));
        let mut none = Vec::new();
        let err = check_part(
            &keys,
            sealed.id,
            Some(&mut failing),
            &buffered_file,
            &part,
            &mut scratch,
            &mut none,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "device gone");
        assert!(none.is_empty(), "{none:?}");
        let offsets: Vec<u32> = direct.iter().map(|d| d.offset).collect();
        let want: Vec<u32> = [3, 17, 30, 36, 37, 38, 39]
            .iter()
            .map(|i| entries[*i].offset)
            .collect();
        assert_eq!(offsets, want);
        assert!(
            direct[0].detail.contains("authentication failed"),
            "{direct:?}"
        );
        assert!(direct[3].detail.contains("truncated"), "{direct:?}");
    }
}
