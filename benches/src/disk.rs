//! The reference disk: an ext4 file system about half full of real files, as a raw image.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct Reference {
    pub raw: PathBuf,
    pub size: u64,
    /// Bytes of file data staged into the file system.
    pub data: u64,
}

pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (n, m) = if let Some(n) = t.strip_suffix("gib").or_else(|| t.strip_suffix('g')) {
        (n, 1u64 << 30)
    } else if let Some(n) = t.strip_suffix("mib").or_else(|| t.strip_suffix('m')) {
        (n, 1 << 20)
    } else {
        (t.as_str(), 1)
    };
    Ok((n
        .trim()
        .parse::<f64>()
        .with_context(|| format!("size '{s}'"))?
        * m as f64) as u64)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Hard-links real files into `stage` until `budget` bytes are staged (same file system as /usr).
fn stage_files(stage: &Path, budget: u64) -> Result<u64> {
    let mut total = 0u64;
    let mut stack: Vec<PathBuf> = vec![
        "/usr/share".into(),
        "/usr/lib/x86_64-linux-gnu".into(),
        "/usr/lib".into(),
    ];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let Ok(meta) = e.metadata() else { continue };
                use std::os::unix::fs::MetadataExt;
                if !seen.insert(meta.ino()) || total + meta.len() > budget {
                    continue;
                }
                let rel = p.strip_prefix("/").unwrap_or(&p);
                let dst = stage.join(rel);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if std::fs::hard_link(&p, &dst).is_ok() || std::fs::copy(&p, &dst).is_ok() {
                    total += meta.len();
                }
            }
        }
        if total >= budget {
            break;
        }
    }
    Ok(total)
}

pub fn reference_disk(work: &Path, size: u64, keep: bool) -> Result<Reference> {
    let raw = work.join(format!("reference-{}.raw", size >> 20));
    let data_file = work.join(format!("reference-{}.data", size >> 20));
    if keep && raw.exists() && data_file.exists() {
        let data = std::fs::read_to_string(&data_file)?.trim().parse()?;
        eprintln!("reusing {}", raw.display());
        return Ok(Reference { raw, size, data });
    }
    let stage = work.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    // ~45 % of the disk: the reference disk holds 3.7 GiB of files on 8 GiB.
    let data = stage_files(&stage, size * 45 / 100)?;
    eprintln!(
        "staged {} MiB of real files; building the ext4 image",
        data >> 20
    );
    let _ = std::fs::remove_file(&raw);
    run(Command::new("truncate")
        .arg("-s")
        .arg(size.to_string())
        .arg(&raw))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&stage)
        .arg(&raw))?;
    std::fs::remove_dir_all(&stage)?;
    std::fs::write(&data_file, data.to_string())?;
    Ok(Reference { raw, size, data })
}
