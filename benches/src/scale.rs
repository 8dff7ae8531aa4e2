//! Verify's memory as the repository grows. Two synthetic disks in which every 64 KiB chunk is
//! distinct (4 KiB of random bytes, the rest a hole, so a blob is about 4 KiB and a 16 MiB pack
//! holds some 4,000 of them), one 16 times the size of the other, are
//! each backed up into a repository with 64 KiB chunks; then `verify` (references only) and
//! `verify --read-data` run on each. Memory that stays bounded shows as a large-disk peak close to
//! the small one's, though the large repository references 16 times as many chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::disk::run;
use crate::measure::{timed, Sample};

const CHUNK: u64 = 64 << 10;
/// The small disk; the large one is `FACTOR` times its size.
const SMALL: u64 = 4 << 30;
pub const FACTOR: u64 = 16;

/// The work names of one size: (backup, verify references, verify --read-data).
pub fn works(large: bool) -> [String; 3] {
    let size = if large { "large" } else { "small" };
    [
        format!("scale: backup, {size} disk"),
        format!("scale: verify references, {size} disk"),
        format!("scale: verify --read-data, {size} disk"),
    ]
}

/// Chunks of the small and the large disk.
pub fn chunks(large: bool) -> u64 {
    SMALL / CHUNK * if large { FACTOR } else { 1 }
}

/// A sparse disk of `size` bytes whose every chunk starts with 4 KiB of random bytes and is zero
/// after them.
fn write_disk(path: &Path, size: u64) -> Result<()> {
    use rand::{RngCore, SeedableRng};
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let mut block = vec![0u8; 4096];
    for i in 0..size / CHUNK {
        rng.fill_bytes(&mut block);
        f.write_all_at(&block, i * CHUNK)?;
    }
    f.sync_all()?;
    Ok(())
}

pub fn run_all(bv: impl Fn(&Path, &Path) -> Command, w: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for large in [false, true] {
        let [backup, refs, data] = works(large);
        let disk = w.join("scale.raw");
        let repo = w.join("bv-repo-scale");
        let cache = w.join("bv-cache-scale");
        let _ = std::fs::remove_dir_all(&repo);
        let _ = std::fs::remove_dir_all(&cache);
        write_disk(&disk, SMALL * if large { FACTOR } else { 1 })?;
        run(bv(&repo, &cache).args(["repo", "init", "--chunk-size", "64KiB"]))?;
        let mut c = bv(&repo, &cache);
        c.args(["backup", "--vm", "scale", "--disk"])
            .arg(format!("d={}", disk.display()));
        out.push(timed(&backup, "blockvault", c, None, None)?);
        std::fs::remove_file(&disk)?;
        let mut c = bv(&repo, &cache);
        c.arg("verify");
        out.push(timed(&refs, "blockvault", c, None, None)?);
        let mut c = bv(&repo, &cache);
        c.args(["verify", "--read-data"]);
        out.push(timed(&data, "blockvault", c, None, None)?);
        std::fs::remove_dir_all(&repo)?;
        std::fs::remove_dir_all(&cache)?;
    }
    Ok(out)
}
