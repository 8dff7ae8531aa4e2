//! Parent locators (MS-VHDX §2.6.2.6) and how a differencing disk finds its
//! parent on this machine.

use std::path::{Path, PathBuf};

use super::error::Error;
use super::format::*;
use super::guid::Guid;

/// Decoded key/value pairs of a VHDX parent locator.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The GUIDs a parent's DataWriteGuid may have (§2.6.2.6.3).
    pub fn linkages(&self) -> Vec<Guid> {
        ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| self.get(k))
            .filter_map(Guid::parse)
            .collect()
    }
}

fn utf16(file: &str, b: &[u8], what: &str, at: u64) -> Result<String, Error> {
    if b.len() % 2 != 0 {
        return Err(Error::corrupt(
            file,
            "parent locator",
            at,
            format!("{what} has odd UTF-16 length {}", b.len()),
        ));
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).map_err(|_| {
        Error::corrupt(
            file,
            "parent locator",
            at,
            format!("{what} is not valid UTF-16"),
        )
    })
}

/// Parses the parent locator item (`b`, located at `file_offset`).
pub(crate) fn parse_locator(
    file: &str,
    b: &[u8],
    file_offset: u64,
) -> Result<ParentLocator, Error> {
    let what = "parent locator metadata item";
    if b.len() < 20 {
        return Err(Error::corrupt(
            file,
            what,
            file_offset,
            format!("only {} bytes long", b.len()),
        ));
    }
    let ty = Guid::from_bytes(&b[0..16]);
    if ty != VHDX_PARENT_LOCATOR_TYPE {
        return Err(Error::unsupported(
            file,
            what,
            file_offset,
            format!("locator type {ty} (only the VHDX locator type is known)"),
        ));
    }
    let count = le_u16(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(Error::corrupt(
            file,
            what,
            file_offset,
            format!("{count} key/value entries do not fit in {} bytes", b.len()),
        ));
    }
    let mut entries: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let e = &b[20 + i * 12..20 + (i + 1) * 12];
        let ko = le_u32(e, 0) as usize;
        let vo = le_u32(e, 4) as usize;
        let kl = le_u16(e, 8) as usize;
        let vl = le_u16(e, 10) as usize;
        let at = file_offset + 20 + i as u64 * 12;
        let bound = |o: usize, l: usize| o.checked_add(l).is_some_and(|end| end <= b.len());
        if !bound(ko, kl) || !bound(vo, vl) {
            return Err(Error::corrupt(
                file,
                format!("parent locator entry {i}"),
                at,
                "key or value lies outside the item",
            ));
        }
        let k = utf16(file, &b[ko..ko + kl], "key", at)?;
        let v = utf16(file, &b[vo..vo + vl], "value", at)?;
        if entries.iter().any(|(x, _)| *x == k) {
            return Err(Error::corrupt(
                file,
                format!("parent locator entry {i}"),
                at,
                format!("duplicate key {k:?}"),
            ));
        }
        entries.push((k, v));
    }
    let loc = ParentLocator { entries };
    match loc.get("parent_linkage") {
        None => Err(Error::corrupt(
            file,
            what,
            file_offset,
            "required key parent_linkage is missing",
        )),
        Some(v) if Guid::parse(v).is_none() => Err(Error::corrupt(
            file,
            what,
            file_offset,
            format!("parent_linkage {v:?} is not a GUID"),
        )),
        Some(_) => Ok(loc),
    }
}

/// A Windows path with `\\?\` stripped and `/` as separator.
fn normalize(p: &str) -> String {
    let p = p.strip_prefix(r"\\?\").unwrap_or(p);
    p.replace('\\', "/")
}

fn is_windows_absolute(p: &str) -> bool {
    let b = p.as_bytes();
    (b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic()) || p.starts_with("//")
}

/// Applies the first matching `from` prefix (case-insensitive, any separator).
fn map_path(p: &str, map: &[(String, PathBuf)]) -> Option<PathBuf> {
    let np = normalize(p);
    for (from, to) in map {
        let nf = normalize(from);
        let nf = nf.trim_end_matches('/');
        if np.len() >= nf.len()
            && np.as_bytes()[..nf.len()].eq_ignore_ascii_case(nf.as_bytes())
            && (np.len() == nf.len() || np.as_bytes()[nf.len()] == b'/')
        {
            let rest = np[nf.len()..].trim_start_matches('/');
            return Some(if rest.is_empty() {
                to.clone()
            } else {
                to.join(rest)
            });
        }
    }
    None
}

/// Candidate paths for the parent, in the order of §2.6.2.6.3 (relative_path,
/// volume_path, absolute_win32_path), then by file name in the search dirs.
pub(crate) fn candidates(
    child: Option<&Path>,
    loc: &ParentLocator,
    map: &[(String, PathBuf)],
    search_dirs: &[PathBuf],
) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let child_dir = child.and_then(|c| c.parent()).map(Path::to_path_buf);
    if let Some(rel) = loc.get("relative_path") {
        let n = normalize(rel);
        if let Some(m) = map_path(rel, map) {
            out.push(m);
        }
        if !n.starts_with('/') && !is_windows_absolute(&n) {
            if let Some(d) = &child_dir {
                out.push(d.join(&n));
            }
        }
        names.push(n);
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(abs) = loc.get(key) {
            if let Some(m) = map_path(abs, map) {
                out.push(m);
            }
            let n = normalize(abs);
            if n.starts_with('/') && !n.starts_with("//") {
                out.push(PathBuf::from(&n));
            }
            names.push(n);
        }
    }
    for n in &names {
        if let Some(name) = n.rsplit('/').next().filter(|s| !s.is_empty() && *s != "..") {
            for d in search_dirs {
                out.push(d.join(name));
            }
        }
    }
    let mut dedup = Vec::new();
    for p in out {
        if !dedup.contains(&p) {
            dedup.push(p);
        }
    }
    dedup
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_mapping() {
        let map = vec![(r"D:\VMs".to_string(), PathBuf::from("/mnt/vms"))];
        assert_eq!(
            map_path(r"\\?\d:\vms\app\base.vhdx", &map),
            Some(PathBuf::from("/mnt/vms/app/base.vhdx"))
        );
        assert_eq!(map_path(r"D:\VMsX\base.vhdx", &map), None);
        let loc = ParentLocator {
            entries: vec![
                (
                    "parent_linkage".into(),
                    "{00000000-0000-0000-0000-000000000001}".into(),
                ),
                ("relative_path".into(), r"..\base\base.vhdx".into()),
                (
                    "absolute_win32_path".into(),
                    r"\\?\D:\VMs\base\base.vhdx".into(),
                ),
            ],
        };
        let c = candidates(
            Some(Path::new("/data/child/c.avhdx")),
            &loc,
            &map,
            &[PathBuf::from("/search")],
        );
        assert_eq!(
            c,
            vec![
                PathBuf::from("/data/child/../base/base.vhdx"),
                PathBuf::from("/mnt/vms/base/base.vhdx"),
                PathBuf::from("/search/base.vhdx"),
            ]
        );
    }
}
