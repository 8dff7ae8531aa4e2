//! The chunk size and zstd level against each other: full backup time, stored size and the growth
//! of an incremental, for each combination, so the defaults rest on measurements.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::disk::{run, Reference};
use crate::measure::{dir_bytes, timed, Sample};

pub const CHUNK_SIZES: &[&str] = &["64KiB", "256KiB", "1MiB"];
pub const LEVELS: &[i32] = &[1, 2, 3];

/// One full backup of the reference disk and one of the changed disk (deduplicated against the
/// first) per combination. Samples are named `sweep <chunk> zstd <level>: full|incremental`.
pub fn run_all(
    bv: impl Fn(&Path, &Path) -> Command,
    work: &Path,
    r: &Reference,
    changed_raw: &Path,
) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for chunk in CHUNK_SIZES {
        for level in LEVELS {
            let repo = work.join("bv-repo-sweep");
            let cache = work.join("bv-cache-sweep");
            let _ = std::fs::remove_dir_all(&repo);
            let _ = std::fs::remove_dir_all(&cache);
            run(bv(&repo, &cache).args(["repo", "init", "--chunk-size", chunk]))?;
            let name = format!("sweep {chunk} zstd {level}");
            let backup = |disk: &Path| {
                let mut c = bv(&repo, &cache);
                c.arg("--compression-level")
                    .arg(level.to_string())
                    .args(["backup", "--vm", "sweep", "--disk"])
                    .arg(format!("d={}", disk.display()));
                c
            };
            let mut s = timed(
                &format!("{name}: full"),
                "blockvault",
                backup(&r.raw),
                None,
                None,
            )?;
            let before = dir_bytes(&repo);
            s.repo_bytes = Some(before);
            out.push(s);
            let mut s = timed(
                &format!("{name}: incremental"),
                "blockvault",
                backup(changed_raw),
                None,
                None,
            )?;
            s.repo_bytes = Some(dir_bytes(&repo) - before);
            out.push(s);
            std::fs::remove_dir_all(&repo)?;
            std::fs::remove_dir_all(&cache)?;
        }
    }
    Ok(out)
}
