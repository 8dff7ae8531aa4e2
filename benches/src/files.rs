//! File-level and whole-VM restore on the reference disk (ext4 on the whole disk): listing the
//! root, extracting a directory tree of about 500 MiB beside `debugfs rdump` of the same tree from
//! the raw image (and beside the whole-disk export measured earlier), and `restore vm --format
//! qcow2` beside `qemu-img convert -O qcow2` of the raw image. Every output is checked against
//! the reference tool's.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::disk::{run, Reference};
use crate::measure::{best_of, dir_bytes, qemu_img_convert, timed, Sample};

/// What the runs extracted, for the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FilesFigures {
    pub tree: String,
    pub tree_bytes: u64,
    pub file: String,
    pub file_bytes: u64,
}

/// The directory of the image closest to 500 MiB among the staged ones, and a regular file
/// closest to 10 MiB (both chosen on the host, checked in the image with debugfs).
pub fn choose(r: &Reference) -> Result<FilesFigures> {
    let mut best_dir: Option<(String, u64)> = None;
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/usr")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() && p.components().count() <= 5 {
                stack.push(p);
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if len >= 4 << 20 {
                    files.push((p.display().to_string(), len));
                }
            }
        }
    }
    // Staging fills the disk depth-first, so a top directory may be in the image only in part:
    // the candidates are also the directories one and two levels below, closest to 500 MiB on
    // the host first; the extracted tree is measured afterwards.
    let mut cands: Vec<(String, u64)> = Vec::new();
    for top in ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr/lib"] {
        cands.push((top.to_string(), dir_bytes(Path::new(top))));
        for sub in subdirs(top)
            .into_iter()
            .chain(subdirs(top).iter().flat_map(|d| subdirs(d)))
        {
            let n = dir_bytes(Path::new(&sub));
            cands.push((sub, n));
        }
    }
    cands.sort_by_key(|(_, n)| n.abs_diff(500 << 20));
    for (cand, _) in cands.iter().take(40) {
        let n = in_image_bytes(r, cand)?;
        if n > 0
            && best_dir
                .as_ref()
                .is_none_or(|(_, b)| n.abs_diff(500 << 20) < b.abs_diff(500 << 20))
        {
            best_dir = Some((cand.to_string(), n));
        }
    }
    let (tree, tree_bytes) = best_dir.context("no staged directory found in the reference disk")?;
    // The file closest to 10 MiB that was staged (a smaller disk stages fewer files).
    files.sort_by_key(|(_, len)| len.abs_diff(10 << 20));
    let mut chosen = None;
    for (f, len) in files.into_iter().take(200) {
        if in_image(r, &f)? {
            chosen = Some((f, len));
            break;
        }
    }
    let (file, file_bytes) =
        chosen.context("no file of several MiB under /usr is in the reference disk")?;
    Ok(FilesFigures {
        tree,
        tree_bytes,
        file,
        file_bytes,
    })
}

fn subdirs(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn in_image(r: &Reference, path: &str) -> Result<bool> {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(&r.raw)
        .output()?;
    Ok(String::from_utf8_lossy(&o.stdout).contains("Inode:"))
}

/// Bytes of the host directory `path` when the image holds it whole (as many entries as the
/// host's, at its top level), else 0: staging stops at a budget, part-way through a directory.
fn in_image_bytes(r: &Reference, path: &str) -> Result<u64> {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("ls -p {path}"))
        .arg(&r.raw)
        .output()?;
    let in_image = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('/'))
        .count()
        .saturating_sub(2);
    let on_host = std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0);
    if in_image == 0 || in_image != on_host {
        return Ok(0);
    }
    Ok(dir_bytes(Path::new(path)))
}

pub fn run_all(
    bv: impl Fn() -> Command,
    work: &Path,
    r: &Reference,
    point: &str,
) -> Result<(Vec<Sample>, FilesFigures)> {
    let mut out = Vec::new();
    let mut fig = choose(r)?;
    let mut c = bv();
    c.args(["restore", "files", point, "--disk", "d", "ls", "/"]);
    out.push(timed("files: list the root", "blockvault", c, None, None)?);

    // Each run extracts into a directory of its own: deleting a tree of tens of thousands of
    // files and creating another at once is several times slower on some file systems (ext4
    // without a journal skips inodes freed in the last minutes), whichever tool comes next.
    let tree = |who: &str, i: usize| work.join(format!("files-tree-{who}-{i}"));
    let runs: Vec<_> = (0..8)
        .flat_map(|i| [tree("bv", i), tree("debugfs", i)])
        .collect();
    for d in &runs {
        let _ = std::fs::remove_dir_all(d);
    }
    let (mut mine, mut theirs) = (tree("bv", 0), tree("debugfs", 0));
    out.push(best_of(|i| {
        mine = tree("bv", i);
        let mut c = bv();
        c.args([
            "restore", "files", point, "--disk", "d", "get", &fig.tree, "--to",
        ])
        .arg(&mine);
        timed("files: extract a tree", "blockvault", c, None, None)
    })?);
    out.push(best_of(|i| {
        theirs = tree("debugfs", i);
        std::fs::create_dir_all(&theirs)?;
        let mut c = Command::new("debugfs");
        c.arg("-R")
            .arg(format!("rdump {} {}", fig.tree, theirs.display()))
            .arg(&r.raw);
        timed("files: extract a tree", "debugfs rdump", c, None, None)
    })?);
    fig.tree_bytes = dir_bytes(&mine);
    if fig.tree_bytes < 50 << 20 {
        anyhow::bail!(
            "{} holds only {} bytes in the reference disk: no tree to measure",
            fig.tree,
            fig.tree_bytes
        );
    }
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&mine)
        .arg(&theirs))
    .context("the extracted tree differs from debugfs rdump's")?;
    for d in &runs {
        let _ = std::fs::remove_dir_all(d);
    }

    let vm = work.join("vm-qcow2");
    out.push(best_of(|_| {
        let _ = std::fs::remove_dir_all(&vm);
        let mut c = bv();
        c.args(["restore", "vm", point, "--format", "qcow2", "--to"])
            .arg(&vm);
        timed("whole VM as qcow2", "blockvault", c, None, None)
    })?);
    let theirs = work.join("qemu-img.qcow2");
    out.push(qemu_img_convert(
        "whole VM as qcow2",
        "qemu-img convert",
        &["-O", "qcow2"],
        &r.raw,
        &theirs,
    )?);
    let ours = std::fs::read_dir(&vm)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .context("restore vm wrote no qcow2 image")?;
    run(Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&ours))?;
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&ours)
        .arg(&r.raw))?;
    std::fs::remove_dir_all(&vm)?;
    std::fs::remove_file(&theirs)?;
    Ok((out, fig))
}
