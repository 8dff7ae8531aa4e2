//! NTFS through the `ntfs` crate. Compressed streams (which the crate reads raw) are decoded here
//! per compression unit with [`crate::lznt1`]; EFS-encrypted streams are refused.

use std::collections::HashSet;

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek};

use crate::detect::FsKind;
use crate::device::{Budget, Window};
use crate::volume::{display_path, Entry, EntryKind, Listing, Volume};
use crate::{guarded, Error, Result};

/// MFT records below this number are the file system's own ($MFT, $Bitmap, ...) or reserved.
const FIRST_USER_RECORD: u64 = 24;
/// Clusters per compression unit: NTFS always compresses in units of 16 clusters.
const UNIT_CLUSTERS: u64 = 16;
/// NT time (100 ns ticks since 1601) of the Unix epoch.
const NT_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

pub struct NtfsVolume {
    ntfs: Ntfs,
    fs: Window,
    budget: Budget,
    what: String,
}

fn nt_time(t: ntfs::NtfsTime) -> Option<(i64, u32)> {
    let v = t.nt_timestamp();
    if v == 0 {
        return None;
    }
    let rel = v as i128 - NT_UNIX_EPOCH as i128;
    let secs = rel.div_euclid(10_000_000) as i64;
    let nanos = (rel.rem_euclid(10_000_000) * 100) as u32;
    Some((secs, nanos))
}

fn attribute_names(f: NtfsFileAttributeFlags) -> Vec<String> {
    let table = [
        (NtfsFileAttributeFlags::READ_ONLY, "readonly"),
        (NtfsFileAttributeFlags::HIDDEN, "hidden"),
        (NtfsFileAttributeFlags::SYSTEM, "system"),
        (NtfsFileAttributeFlags::ARCHIVE, "archive"),
        (NtfsFileAttributeFlags::SPARSE_FILE, "sparse"),
        (NtfsFileAttributeFlags::REPARSE_POINT, "reparse-point"),
        (NtfsFileAttributeFlags::COMPRESSED, "compressed"),
        (NtfsFileAttributeFlags::ENCRYPTED, "encrypted"),
    ];
    table
        .iter()
        .filter(|(b, _)| f.contains(*b))
        .map(|(_, n)| n.to_string())
        .collect()
}

impl NtfsVolume {
    pub fn open(w: Window, what: &str) -> Result<Self> {
        let budget = Budget::default();
        budget.set(1_000_000);
        let mut fs = w.with_budget(budget.clone());
        let what = format!("the NTFS file system of {what}");
        let ntfs = guarded(&what, || {
            let mut n = Ntfs::new(&mut fs).map_err(|e| Error::Corrupt {
                what: what.clone(),
                detail: e.to_string(),
            })?;
            // Case-insensitive name lookups need the file system's own upper-case table.
            n.read_upcase_table(&mut fs).map_err(|e| Error::Corrupt {
                what: what.clone(),
                detail: format!("its $UpCase table cannot be read: {e}"),
            })?;
            Ok(n)
        })?;
        Ok(Self {
            ntfs,
            fs,
            budget,
            what,
        })
    }

    fn corrupt(&self, path: &[Vec<u8>], e: impl std::fmt::Display) -> Error {
        Error::Corrupt {
            what: format!("{} in {}", display_path(path), self.what),
            detail: e.to_string(),
        }
    }

    /// The MFT record number of `path`, looking each component up in its parent's index.
    fn resolve(&mut self, path: &[Vec<u8>]) -> Result<u64> {
        let mut rec = ntfs::KnownNtfsFileRecordNumber::RootDirectory as u64;
        for (i, c) in path.iter().enumerate() {
            let here = &path[..=i];
            let name = std::str::from_utf8(c)
                .map_err(|_| Error::NotFound(display_path(here)))?
                .to_string();
            let dir = self
                .ntfs
                .file(&mut self.fs, rec)
                .map_err(|e| self.corrupt(&path[..i], e))?;
            if !dir.is_directory() {
                return Err(Error::NotADirectory(display_path(&path[..i])));
            }
            let index = dir
                .directory_index(&mut self.fs)
                .map_err(|e| self.corrupt(&path[..i], e))?;
            let mut finder = index.finder();
            let found = ntfs::indexes::NtfsFileNameIndex::find(
                &mut finder,
                &self.ntfs,
                &mut self.fs,
                &name,
            );
            // The index is ordered by upper-cased name, so `find` is case-insensitive: in a
            // case-sensitive directory (WSL, ntfs-3g) it may give `Report.txt` for `report.txt`.
            // A name it does not give back exactly is looked for among all the entries, as the
            // listing spelled it; only when none matches exactly does the case-insensitive
            // match stand (a path typed in another case).
            let insensitive = match found {
                None => None,
                Some(Err(e)) => return Err(self.corrupt(here, e)),
                Some(Ok(e)) => {
                    let key = e.key().transpose().map_err(|e| self.corrupt(here, e))?;
                    let rec = e.file_reference().file_record_number();
                    Some((rec, key.is_some_and(|k| k.name().to_string_lossy() == name)))
                }
            };
            let next = match insensitive {
                Some((rec, true)) => rec,
                other => match exact_entry(&mut self.fs, &self.what, &index, here, &name)? {
                    Some(rec) => rec,
                    None => match other {
                        Some((rec, _)) => rec,
                        None => return Err(Error::NotFound(display_path(here))),
                    },
                },
            };
            if next < FIRST_USER_RECORD {
                return Err(Error::NotFound(display_path(here)));
            }
            rec = next;
        }
        Ok(rec)
    }

    fn read_stream(
        &mut self,
        path: &[Vec<u8>],
        piece: usize,
        whole: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let rec = self.resolve(path)?;
        let file = self
            .ntfs
            .file(&mut self.fs, rec)
            .map_err(|e| self.corrupt(path, e))?;
        if file.is_directory() {
            return Err(Error::NotAFile(display_path(path)));
        }
        let item = match file.data(&mut self.fs, "") {
            None => return Ok(0),
            Some(r) => r.map_err(|e| self.corrupt(path, e))?,
        };
        let attr = item.to_attribute().map_err(|e| self.corrupt(path, e))?;
        let size = attr.value_length();
        let flags = attr.flags();
        let info = file.info().map_err(|e| self.corrupt(path, e))?;
        if info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::REPARSE_POINT)
        {
            if let Some(why) = reparse_tag(&mut self.fs, &file)
                .and_then(|tag| elsewhere(tag, info.file_attributes()))
            {
                return Err(Error::Unsupported {
                    what: display_path(path),
                    found: why,
                });
            }
        }
        if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
            return Err(Error::Unsupported {
                what: display_path(path),
                found: "EFS-encrypted data".into(),
            });
        }
        // Past the valid data length the file reads as zeros on Windows, whatever its clusters
        // hold (a file extended with SetEndOfFile, a preallocated download).
        let valid = match (
            attr.is_resident(),
            attr.position().value(),
            file.position().value(),
        ) {
            (false, Some(at), Some(record))
                if at.get() >= record.get()
                    && at.get() - record.get() < u64::from(self.ntfs.file_record_size()) =>
            {
                valid_data_length(&mut self.fs, record.get(), at.get() - record.get())
                    .map_err(|e| self.corrupt(path, format!("its data attribute: {e}")))?
                    .min(size)
            }
            _ => size,
        };
        let mut zeroed = Vec::new();
        let mut out = |off: u64, data: &[u8]| -> Result<()> {
            if off + data.len() as u64 <= valid {
                return whole(off, data);
            }
            let keep = valid.saturating_sub(off).min(data.len() as u64) as usize;
            zeroed.clear();
            zeroed.extend_from_slice(&data[..keep]);
            zeroed.resize(data.len(), 0);
            whole(off, &zeroed)
        };
        let out = &mut out;
        let value = attr
            .value(&mut self.fs)
            .map_err(|e| self.corrupt(path, e))?;
        let piece = piece.clamp(4096, 8 << 20);
        if flags.contains(NtfsAttributeFlags::COMPRESSED) {
            let runs = match &value {
                NtfsAttributeValue::NonResident(v) => v
                    .data_runs()
                    .map(|r| {
                        r.map(|r| {
                            (
                                r.data_position().value().map(|p| p.get()),
                                r.allocated_size(),
                            )
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| self.corrupt(path, e))?,
                _ => {
                    return Err(Error::Unsupported {
                        what: display_path(path),
                        found: "a compressed stream spread over several MFT records".into(),
                    })
                }
            };
            let cluster = self.ntfs.cluster_size() as u64;
            self.read_compressed(path, &runs, cluster, size, out)?;
            return Ok(size);
        }
        let mut v = value;
        let mut buf = vec![0u8; piece];
        let mut off = 0u64;
        while off < size {
            let n = v
                .read(&mut self.fs, &mut buf)
                .map_err(|e| self.corrupt(path, e))?;
            if n == 0 {
                break;
            }
            let n = (n as u64).min(size - off) as usize;
            out(off, &buf[..n])?;
            off += n as u64;
        }
        if off != size {
            return Err(self.corrupt(path, format!("{off} bytes could be read of its {size}")));
        }
        Ok(size)
    }

    /// Decodes a compressed stream unit by unit: a unit of 16 clusters whose runs are all
    /// allocated is stored raw; one with fewer allocated clusters (the rest sparse) holds LZNT1
    /// data in those clusters; an all-sparse unit is zeros.
    fn read_compressed(
        &mut self,
        path: &[Vec<u8>],
        runs: &[(Option<u64>, u64)],
        cluster: u64,
        size: u64,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let unit = UNIT_CLUSTERS * cluster;
        // Flatten into (first vcn, clusters, position) extents.
        let mut extents = Vec::with_capacity(runs.len());
        let mut vcn = 0u64;
        for (pos, len) in runs {
            let n = len / cluster;
            extents.push((vcn, n, *pos));
            vcn = vcn.saturating_add(n);
        }
        let mut raw = Vec::with_capacity(unit as usize);
        let mut decoded = Vec::with_capacity(unit as usize);
        let mut off = 0u64;
        let mut ext = 0usize;
        while off < size {
            let first = off / cluster;
            raw.clear();
            let mut allocated = 0u64;
            // Gather the unit's allocated clusters in order.
            let mut c = first;
            while c < first + UNIT_CLUSTERS {
                while ext < extents.len() && extents[ext].0 + extents[ext].1 <= c {
                    ext += 1;
                }
                let Some(&(start, n, pos)) = extents.get(ext) else {
                    break;
                };
                if start > c {
                    return Err(self.corrupt(path, "its data runs leave a gap"));
                }
                let take = (start + n - c).min(first + UNIT_CLUSTERS - c);
                if let Some(p) = pos {
                    let at = p + (c - start) * cluster;
                    let l = raw.len();
                    raw.resize(l + (take * cluster) as usize, 0);
                    self.fs
                        .read_exact_at(at, &mut raw[l..])
                        .map_err(|e| Error::Read {
                            offset: at,
                            source: e,
                        })?;
                    allocated += take;
                }
                c += take;
            }
            let want = (size - off).min(unit) as usize;
            if allocated == 0 {
                out(off, &vec![0u8; want])?;
            } else if allocated >= UNIT_CLUSTERS {
                out(off, &raw[..want])?;
            } else {
                decoded.clear();
                crate::lznt1::decompress(&raw, &mut decoded, unit as usize).map_err(|e| {
                    self.corrupt(path, format!("compression unit at byte {off}: {e}"))
                })?;
                decoded.resize(unit as usize, 0);
                out(off, &decoded[..want])?;
            }
            off += want as u64;
        }
        Ok(())
    }
}

impl Volume for NtfsVolume {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry> {
        self.budget.set(100_000);
        let what = self.what.clone();
        guarded(&what, || {
            let rec = self.resolve(path)?;
            let file = self
                .ntfs
                .file(&mut self.fs, rec)
                .map_err(|e| self.corrupt(path, e))?;
            let name = path.last().cloned().unwrap_or_default();
            let mut me = Reader {
                fs: &mut self.fs,
                what: &self.what,
            };
            me.entry(name, &file)
        })
    }

    fn list(&mut self, path: &[Vec<u8>], limit: usize) -> Result<Listing> {
        self.budget.set(100_000 + 64 * limit as u64);
        let what = self.what.clone();
        guarded(&what, || {
            let rec = self.resolve(path)?;
            let dir = self
                .ntfs
                .file(&mut self.fs, rec)
                .map_err(|e| self.corrupt(path, e))?;
            if !dir.is_directory() {
                return Err(Error::NotADirectory(display_path(path)));
            }
            let index = dir
                .directory_index(&mut self.fs)
                .map_err(|e| self.corrupt(path, e))?;
            let mut it = index.entries();
            let mut found: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut seen = HashSet::new();
            let mut truncated = false;
            while let Some(e) = it.next(&mut self.fs) {
                let e = e.map_err(|e| self.corrupt(path, e))?;
                let Some(key) = e.key() else { continue };
                let key = key.map_err(|e| self.corrupt(path, e))?;
                // Each long name may have a separate 8.3 alias; list the long one only.
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let rec = e.file_reference().file_record_number();
                if rec < FIRST_USER_RECORD {
                    continue;
                }
                let name = key.name().to_string_lossy().into_bytes();
                if !seen.insert((name.clone(), rec)) {
                    continue;
                }
                if found.len() >= limit {
                    truncated = true;
                    break;
                }
                found.push((name, rec));
            }
            drop(it);
            let mut entries = Vec::with_capacity(found.len());
            for (name, rec) in found {
                let file = self
                    .ntfs
                    .file(&mut self.fs, rec)
                    .map_err(|e| self.corrupt(path, e))?;
                let mut me = Reader {
                    fs: &mut self.fs,
                    what: &self.what,
                };
                entries.push(me.entry(name, &file)?);
            }
            Ok(Listing { entries, truncated })
        })
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>> {
        Err(Error::Unsupported {
            what: display_path(path),
            found: "an NTFS reparse point (link or junction)".into(),
        })
    }

    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        piece: usize,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        self.budget.set(u64::MAX / 2);
        let what = self.what.clone();
        guarded(&what, || self.read_stream(path, piece, out))
    }
}

/// The record of the one entry of `index` whose name reads exactly `name` (as a listing
/// spells it, unpaired surrogates replaced). Several such records are refused rather than
/// one picked: their names differ only in what the replacement hid.
fn exact_entry(
    fs: &mut Window,
    what: &str,
    index: &ntfs::NtfsIndex<'_, '_, ntfs::indexes::NtfsFileNameIndex>,
    here: &[Vec<u8>],
    name: &str,
) -> Result<Option<u64>> {
    let corrupt = |here: &[Vec<u8>], e: ntfs::NtfsError| Error::Corrupt {
        what: format!("{} in {what}", display_path(here)),
        detail: e.to_string(),
    };
    let mut it = index.entries();
    let mut found = None;
    while let Some(e) = it.next(fs) {
        let e = e.map_err(|e| corrupt(here, e))?;
        let Some(key) = e.key() else { continue };
        let key = key.map_err(|e| corrupt(here, e))?;
        if key.namespace() == NtfsFileNamespace::Dos || key.name().to_string_lossy() != name {
            continue;
        }
        let rec = e.file_reference().file_record_number();
        match found {
            Some(r) if r != rec => {
                return Err(Error::Unsupported {
                    what: display_path(here),
                    found: "several NTFS names that read the same once their unpaired \
                            UTF-16 surrogates are replaced"
                        .into(),
                })
            }
            _ => found = Some(rec),
        }
    }
    Ok(found)
}

/// Reparse tags of links: `IO_REPARSE_TAG_MOUNT_POINT` (junctions, volume mount points),
/// `IO_REPARSE_TAG_SYMLINK` and WSL's `IO_REPARSE_TAG_LX_SYMLINK` ([MS-FSCC] 2.1.2.1).
fn is_link_tag(tag: u32) -> bool {
    matches!(tag, 0xA000_0003 | 0xA000_000C | 0xA000_001D)
}

/// Reparse tags of special files, listed and skipped like links: WSL sockets, FIFOs and
/// character and block devices, and app execution aliases ([MS-FSCC] 2.1.2.1).
fn is_special_tag(tag: u32) -> bool {
    matches!(
        tag,
        0x8000_0023 | 0x8000_0024 | 0x8000_0025 | 0x8000_0026 | 0x8000_001B
    )
}

/// `IO_REPARSE_TAG_CLOUD` and its sixteen variants `IO_REPARSE_TAG_CLOUD_1..F` (OneDrive and
/// other cloud-file providers), which differ in bits 12-15 ([MS-FSCC] 2.1.2.1).
fn is_cloud_tag(tag: u32) -> bool {
    tag & 0xFFFF_0FFF == 0x9000_001A
}

/// Why the data of a regular file with reparse tag `tag` is not what its `$DATA` stream holds,
/// if it is not: a cloud placeholder whose data may still be in the cloud (offline or sparse),
/// a file whose data lives elsewhere (WOF-compressed, deduplicated) or a WSL special file.
fn elsewhere(tag: u32, flags: NtfsFileAttributeFlags) -> Option<String> {
    if is_cloud_tag(tag) {
        let placeholder = flags.contains(NtfsFileAttributeFlags::OFFLINE)
            || flags.contains(NtfsFileAttributeFlags::SPARSE_FILE);
        return placeholder.then(|| {
            "a cloud-file placeholder (OneDrive or the like) whose data may not be on this disk"
                .to_string()
        });
    }
    Some(match tag {
        0x8000_0017 => "WOF-compressed data (compact OS), stored outside its $DATA stream".into(),
        0x8000_0013 => "deduplicated data, stored in the volume's chunk store".into(),
        t => format!("a reparse point of tag {t:#010x} (not a link or a cloud file)"),
    })
}

/// The reparse tag of a file: the first 4 bytes of its $REPARSE_POINT attribute (little endian);
/// `None` when it has none or it cannot be read.
fn reparse_tag(fs: &mut Window, file: &NtfsFile<'_>) -> Option<u32> {
    let mut attributes = file.attributes();
    while let Some(item) = attributes.next(fs) {
        let item = item.ok()?;
        let attribute = item.to_attribute().ok()?;
        if attribute.ty().ok()? == NtfsAttributeType::ReparsePoint {
            let mut value = attribute.value(fs).ok()?;
            let mut tag = [0u8; 4];
            value.read_exact(fs, &mut tag).ok()?;
            return Some(u32::from_le_bytes(tag));
        }
    }
    None
}

/// The parts of [`NtfsVolume`] that describing an entry needs, borrowed apart from `ntfs` (which
/// the file being described borrows).
struct Reader<'a> {
    fs: &'a mut Window,
    what: &'a str,
}

impl Reader<'_> {
    fn entry(&mut self, name: Vec<u8>, file: &NtfsFile<'_>) -> Result<Entry> {
        let corrupt = |e: &dyn std::fmt::Display| Error::Corrupt {
            what: format!("{} in {}", String::from_utf8_lossy(&name), self.what),
            detail: e.to_string(),
        };
        let info = file.info().map_err(|e| corrupt(&e))?;
        let flags = info.file_attributes();
        // Only links are left out; other reparse points (cloud files, say) are files or
        // directories, and reading one whose data is elsewhere is refused by name.
        let link = flags.contains(NtfsFileAttributeFlags::REPARSE_POINT)
            && reparse_tag(self.fs, file).is_some_and(|t| is_link_tag(t) || is_special_tag(t));
        let kind = if link {
            // Symbolic links and junctions point at Windows paths; they are listed, not followed.
            // A junction or directory link is a directory record too: taken for a directory, it
            // was extracted as an empty one instead of being skipped and listed.
            EntryKind::Other
        } else if file.is_directory() {
            // Other directory reparse points (cloud-file placeholders, say) hold real entries.
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        let size = if kind == EntryKind::File {
            match file.data(self.fs, "") {
                Some(Ok(item)) => item.to_attribute().map(|a| a.value_length()).unwrap_or(0),
                _ => 0,
            }
        } else {
            0
        };
        Ok(Entry {
            name: String::from_utf8_lossy(&name).into_owned(),
            raw_name: name,
            kind,
            size,
            mtime: nt_time(info.modification_time()),
            atime: nt_time(info.access_time()),
            crtime: nt_time(info.creation_time()),
            mode: None,
            uid: None,
            gid: None,
            attributes: attribute_names(flags),
        })
    }
}

/// Offset of the initialized (valid data) length in a non-resident attribute's header.
const INITIALIZED_SIZE_AT: u64 = 0x38;
/// Update sequence stride of a file record: the last two bytes of each 512-byte stride hold the
/// sequence number on disk, the real bytes are in the record's update sequence array.
const USA_STRIDE: u64 = 512;

/// The valid data length of the non-resident attribute at `attr` bytes into the file record at
/// `record`. `ntfs` 0.4 parses this field but neither exposes nor honours it, so it is read
/// here, with the record's update sequence applied to the bytes that need it.
fn valid_data_length(fs: &mut Window, record: u64, attr: u64) -> std::io::Result<u64> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut head = [0u8; 8];
    fs.read_exact_at(record, &mut head)?;
    if &head[..4] != b"FILE" {
        return Err(bad("file record signature missing"));
    }
    let usa_at = u64::from(u16::from_le_bytes([head[4], head[5]]));
    let usa_count = u64::from(u16::from_le_bytes([head[6], head[7]]));
    let field = attr + INITIALIZED_SIZE_AT;
    let mut v = [0u8; 8];
    fs.read_exact_at(record + field, &mut v)?;
    for (k, b) in v.iter_mut().enumerate() {
        let p = field + k as u64;
        if p % USA_STRIDE >= USA_STRIDE - 2 {
            let stride = p / USA_STRIDE;
            if stride + 1 >= usa_count {
                return Err(bad("update sequence array too short"));
            }
            let mut fix = [0u8; 2];
            fs.read_exact_at(record + usa_at + 2 * (stride + 1), &mut fix)?;
            *b = fix[(p % USA_STRIDE - (USA_STRIDE - 2)) as usize];
        }
    }
    Ok(u64::from_le_bytes(v))
}
