//! Runs each tool under GNU time and collects wall time, peak memory and repository size.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::disk::{run, Reference};
use crate::{Args, Part};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub work: String,
    pub tool: String,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
    pub repo_bytes: Option<u64>,
}

pub const PASSWORD: &str = "benchmark password";

/// The work name of the direct-write ceiling sample (the device writing the disk's data).
pub const WRITE_CEILING: &str = "direct writes of the disk's data";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs restic, borg and GNU time from Debian's packages when missing.
pub fn ensure_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (cmd, pkg) in [
        ("restic", "restic"),
        ("borg", "borgbackup"),
        ("/usr/bin/time", "time"),
    ] {
        if !have(cmd) {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        eprintln!("installing {}", missing.join(" "));
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing))?;
    }
    Ok(())
}

static REPEAT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// How many times [`best_of`] runs each step (`--repeat`).
pub fn set_repeat(n: usize) {
    REPEAT.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The fastest of `--repeat` runs of a step that leaves nothing behind: `step(i)` clears what run
/// `i - 1` wrote, then times run `i`. This machine's disk and page-cache write-back make single
/// runs swing by up to 2x, and a stall hits whichever tool runs into it; the fastest run is the
/// one least disturbed. The peak memory is the highest of the runs.
pub fn best_of(mut step: impl FnMut(usize) -> Result<Sample>) -> Result<Sample> {
    let mut best = step(0)?;
    for i in 1..REPEAT.load(std::sync::atomic::Ordering::Relaxed) {
        let s = step(i)?;
        let peak = best.peak_rss_mib.max(s.peak_rss_mib);
        if s.wall_s < best.wall_s {
            best = s;
        }
        best.peak_rss_mib = peak;
    }
    Ok(best)
}

/// `qemu-img convert ARGS SRC OUT`, the fastest of `--repeat` runs, each into a fresh `OUT`,
/// timed until `OUT` is on disk (with `-t none` qemu-img flushes itself; else a sync follows).
pub fn qemu_img_convert(
    work: &str,
    tool: &str,
    args: &[&str],
    src: &Path,
    out: &Path,
) -> Result<Sample> {
    best_of(|_| {
        let _ = std::fs::remove_file(out);
        let mut c = Command::new("qemu-img");
        c.arg("convert").args(args).arg(src).arg(out);
        let c = if args.windows(2).any(|w| w == ["-t", "none"]) {
            c
        } else {
            synced(c, out)
        };
        timed(work, tool, c, None, None)
    })
}

/// `cmd` followed by a sync of the file it writes, as one command to time.
///
/// blockvault's exports return only once their output is on disk (they sync it), while
/// `qemu-img convert` leaves its output in the page cache (it flushes nothing at the end; with
/// `-t writeback` its VHDX driver flushes after every block allocation instead). Timing a reference
/// writer up to its own sync compares the same work, and keeps its write-back from running into
/// the next measurement.
fn synced(cmd: Command, out: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"out=$1; shift; "$@" && exec sync -- "$out""#)
        .arg("sh")
        .arg(out)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Runs `cmd` under `/usr/bin/time`, stdin from `input`, stdout to `output` (or discarded).
pub fn timed(
    work: &str,
    tool: &str,
    cmd: Command,
    input: Option<&Path>,
    output: Option<&Path>,
) -> Result<Sample> {
    if !Path::new("/usr/bin/time").exists() {
        ensure_tools()?;
    }
    let tf = tempfile::NamedTempFile::new()?;
    let mut t = Command::new("/usr/bin/time");
    t.arg("-f").arg("%e %M").arg("-o").arg(tf.path());
    t.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    t.stdin(match input {
        Some(p) => Stdio::from(File::open(p)?),
        None => Stdio::null(),
    });
    t.stdout(match output {
        Some(p) => Stdio::from(File::create(p)?),
        None => Stdio::null(),
    });
    // Whatever the previous step left in the page cache is written out first, so no tool pays
    // for another's write-back.
    run(&mut Command::new("sync"))?;
    eprintln!("running {work}: {tool}");
    let st = t.status().with_context(|| format!("running {tool}"))?;
    if !st.success() {
        bail!("{work} with {tool} failed: {st}");
    }
    let text = std::fs::read_to_string(tf.path())?;
    let last = text.lines().last().unwrap_or_default();
    let mut it = last.split_whitespace();
    let wall_s: f64 = it.next().unwrap_or("0").parse().unwrap_or(0.0);
    let rss_kib: f64 = it.next().unwrap_or("0").parse().unwrap_or(0.0);
    Ok(Sample {
        work: work.into(),
        tool: tool.into(),
        wall_s,
        peak_rss_mib: rss_kib / 1024.0,
        repo_bytes: None,
    })
}

pub fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_bytes(&e.path()),
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}

fn fresh(p: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(p);
    Ok(p.to_path_buf())
}

fn bv(args: &Args, repo: &Path, cache: &Path) -> Command {
    let mut c = Command::new(&args.blockvault);
    c.env("BLOCKVAULT_REPO", repo)
        .env("BLOCKVAULT_CACHE_DIR", cache)
        .env("BLOCKVAULT_PASSWORD", PASSWORD)
        .arg("--quiet");
    c
}

/// Everything one run measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Results {
    pub samples: Vec<Sample>,
    /// The incremental's changed ranges, each compressed with zstd at blockvault's level.
    pub changed_zstd_bytes: Option<u64>,
    /// The same ranges rounded outward to 256 KiB chunks, each chunk compressed.
    pub changed_chunks_zstd_bytes: Option<u64>,
    pub s3: Vec<crate::s3::S3Figures>,
    pub files: Option<crate::files::FilesFigures>,
    pub maintenance: Option<crate::maintenance::MaintFigures>,
    pub agent: Option<crate::agent::AgentFigures>,
    /// Parts that failed, with the reason; their figures are missing from the table.
    pub failed: Vec<String>,
}

/// blockvault's zstd level (`repo::OpenOptions::zstd_level` as the CLI sets it).
const ZSTD_LEVEL: i32 = 1;
/// The repository's default chunk size, which the benchmark repositories use.
const DEFAULT_CHUNK: u64 = 256 << 10;

pub fn run_all(args: &Args, r: &Reference) -> Result<Results> {
    let w = &args.workdir;
    let mut res = Results::default();
    let mut out = Vec::new();
    let restore = w.join("restore.raw");

    // blockvault
    let repo = fresh(&w.join("bv-repo"))?;
    let cache = fresh(&w.join("bv-cache"))?;
    run(bv(args, &repo, &cache).args(["repo", "init"]))?;
    let mut c = bv(args, &repo, &cache);
    c.args(["backup", "--vm", "bench", "--disk"])
        .arg(format!("d={}", r.raw.display()));
    let mut s = timed("full backup", "blockvault", c, None, None)?;
    s.repo_bytes = Some(dir_bytes(&repo));
    out.push(s);
    let point = latest_point(args, &repo, &cache)?;
    let c = || -> Command {
        let mut c = bv(args, &repo, &cache);
        c.args([
            "restore",
            "export",
            &point,
            "--disk",
            "d",
            "--overwrite",
            "--out",
        ])
        .arg(&restore);
        c
    };
    out.push(best_of(|_| {
        let _ = std::fs::remove_file(&restore);
        timed("restore to a file", "blockvault", c(), None, None)
    })?);
    check_same(&r.raw, &restore)?;
    let mut c = bv(args, &repo, &cache);
    c.args(["restore", "export", &point, "--disk", "d", "--out", "-"]);
    out.push(timed(
        "restore to a stream",
        "blockvault",
        c,
        None,
        Some(&restore),
    )?);
    check_same(&r.raw, &restore)?;
    std::fs::remove_file(&restore)?; // 8 GiB of disk space

    // The decoder alone: fetch, decrypt, decompress and re-hash every chunk, nothing written.
    out.push(best_of(|_| {
        let mut c = bv(args, &repo, &cache);
        c.args(["verify", "--read-data"]);
        timed("verify --read-data", "blockvault", c, None, None)
    })?);
    // qemu-img copying the raw image (sparse-aware) is what a raw export is held against.
    out.push(qemu_img_convert(
        "restore to a file",
        "qemu-img",
        &["-f", "raw", "-O", "raw"],
        &r.raw,
        &restore,
    )?);
    // The device's ceiling for writing this disk's data: the same copy with direct writes,
    // flushed at the end, as the exports write. An export cannot beat the slower of this and the
    // decoder (docs/BENCHMARKS.md, "Exports are bound by the disk").
    out.push(qemu_img_convert(
        WRITE_CEILING,
        "qemu-img -t none",
        &["-t", "none", "-f", "raw", "-O", "raw"],
        &r.raw,
        &restore,
    )?);
    std::fs::remove_file(&restore)?;
    let mut failed = Vec::new();
    if args.runs(Part::Boot) {
        if let Some(s) = part("boot", &mut failed, || {
            crate::boot::run_all(args, &repo, &cache)
        }) {
            out.extend(s);
        }
    }
    if let Some((samples, figures)) = part("files", &mut failed, || {
        crate::files::run_all(|| bv(args, &repo, &cache), w, r, &point)
    }) {
        out.extend(samples);
        res.files = Some(figures);
    }
    if args.runs(Part::Nbd) {
        let mount = || bv(args, &repo, &cache);
        if let Some(s) = part("nbd", &mut failed, || crate::nbd::run_all(r, mount, &point)) {
            out.extend(s);
        }
    }

    // The same disk as a VHDX, with an RCT-driven incremental.
    let change = if args.runs(Part::Vhdx) {
        let vhdx = crate::vhdx::reference_vhdx(r)?;
        let change = crate::vhdx::make_change(w, r, &vhdx, args.change_align)?;
        res.changed_zstd_bytes = Some(crate::vhdx::compressed_ranges(
            &change.raw,
            &change.ranges,
            ZSTD_LEVEL,
        )?);
        res.changed_chunks_zstd_bytes = Some(crate::vhdx::compressed_chunks(
            &change.raw,
            &change.ranges,
            DEFAULT_CHUNK,
            ZSTD_LEVEL,
        )?);
        let repo = fresh(&w.join("bv-repo-vhdx"))?;
        let cache = fresh(&w.join("bv-cache-vhdx"))?;
        run(bv(args, &repo, &cache).args(["repo", "init"]))?;
        out.extend(crate::vhdx::run_blockvault(
            || bv(args, &repo, &cache),
            w,
            &repo,
            r,
            &vhdx,
            &change,
        )?);
        std::fs::remove_dir_all(&repo)?;
        if args.sweep {
            out.extend(crate::sweep::run_all(
                |repo, cache| bv(args, repo, cache),
                w,
                r,
                &change.raw,
            )?);
        }
        Some(change)
    } else {
        None
    };

    if args.runs(Part::S3) {
        for &kind in &args.s3_server {
            if let Some((samples, figures)) = part("s3", &mut failed, || {
                crate::s3::run_all(&args.blockvault, w, r, kind, res.files.as_ref())
            }) {
                out.extend(samples);
                res.s3.push(figures);
            }
        }
    }

    if args.runs(Part::Maintenance) {
        if let Some((samples, figures)) = part("maintenance", &mut failed, || {
            crate::maintenance::run_all(
                |repo, cache| bv(args, repo, cache),
                &args.blockvault,
                w,
                r,
                args.history,
                !args.no_reference,
                args.s3_server
                    .first()
                    .copied()
                    .filter(|_| args.runs(Part::S3)),
            )
        }) {
            out.extend(samples);
            res.maintenance = Some(figures);
        }
    }
    if args.runs(Part::Agent) {
        if let Some((samples, figures)) = part("agent", &mut failed, || {
            let idle = std::time::Duration::from_secs(args.idle_secs);
            crate::agent::run_all(&args.blockvault, w, r, idle)
        }) {
            out.extend(samples);
            res.agent = Some(figures);
        }
    }

    if args.runs(Part::Scale) {
        if let Some(s) = part("scale", &mut failed, || {
            crate::scale::run_all(|repo, cache| bv(args, repo, cache), w)
        }) {
            out.extend(s);
        }
    }

    if args.sparse_factor > 1 {
        let big = w.join("sparse.raw");
        let _ = std::fs::remove_file(&big);
        run(Command::new("truncate")
            .arg("-s")
            .arg((r.size * args.sparse_factor).to_string())
            .arg(&big))?;
        run(Command::new("dd")
            .arg(format!("if={}", r.raw.display()))
            .arg(format!("of={}", big.display()))
            .args(["bs=4M", "conv=sparse,notrunc", "status=none"]))?;
        let repo2 = fresh(&w.join("bv-repo-sparse"))?;
        let cache2 = fresh(&w.join("bv-cache-sparse"))?;
        run(bv(args, &repo2, &cache2).args(["repo", "init"]))?;
        let mut c = bv(args, &repo2, &cache2);
        c.args(["backup", "--vm", "bench", "--disk"])
            .arg(format!("d={}", big.display()));
        let mut s = timed(
            &format!("full backup, {}x sparse disk", args.sparse_factor),
            "blockvault",
            c,
            None,
            None,
        )?;
        s.repo_bytes = Some(dir_bytes(&repo2));
        out.push(s);
        std::fs::remove_file(&big)?;
        std::fs::remove_dir_all(&repo2)?;
    }

    if !args.no_reference {
        // restic
        let rrepo = fresh(&w.join("restic-repo"))?;
        let restic = |a: &[&str]| {
            let mut c = Command::new("restic");
            c.env("RESTIC_REPOSITORY", &rrepo)
                .env("RESTIC_PASSWORD", PASSWORD)
                .args(a)
                .arg("--quiet");
            c
        };
        run(&mut restic(&["init"]))?;
        let mut s = timed(
            "full backup",
            "restic",
            restic(&["backup", "--stdin", "--stdin-filename", "disk.raw"]),
            Some(&r.raw),
            None,
        )?;
        s.repo_bytes = Some(dir_bytes(&rrepo));
        out.push(s);
        out.push(timed(
            "restore to a stream",
            "restic",
            restic(&["dump", "latest", "disk.raw"]),
            None,
            Some(&restore),
        )?);
        check_same(&r.raw, &restore)?;
        std::fs::remove_file(&restore)?; // 8 GiB of disk space
        if let Some(c) = &change {
            let before = dir_bytes(&rrepo);
            let mut s = timed(
                "incremental, 2% change",
                "restic",
                restic(&["backup", "--stdin", "--stdin-filename", "disk.raw"]),
                Some(&c.raw),
                None,
            )?;
            s.repo_bytes = Some(dir_bytes(&rrepo) - before);
            out.push(s);
            out.push(best_of(|_| {
                timed(
                    "verify all data",
                    "restic",
                    restic(&["check", "--read-data"]),
                    None,
                    None,
                )
            })?);
        }
        std::fs::remove_dir_all(&rrepo)?;

        // borg
        let brepo = fresh(&w.join("borg-repo"))?;
        let borg = |a: &[&str]| {
            let mut c = Command::new("borg");
            c.env("BORG_PASSPHRASE", PASSWORD)
                .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
                .env("BORG_BASE_DIR", w.join("borg-base"))
                .args(a);
            c
        };
        run(borg(&["init", "--encryption", "repokey-blake2"]).arg(&brepo))?;
        // Fixed 4 MiB chunks and zstd level 1: the configuration closest to blockvault's.
        let borg_create = |archive: &str| {
            borg(&[
                "create",
                "--chunker-params",
                "fixed,4194304",
                "--compression",
                "zstd,1",
                archive,
                "-",
            ])
        };
        let archive = format!("{}::full", brepo.display());
        let mut s = timed(
            "full backup",
            "borg",
            borg_create(&archive),
            Some(&r.raw),
            None,
        )?;
        s.repo_bytes = Some(dir_bytes(&brepo));
        out.push(s);
        out.push(timed(
            "restore to a stream",
            "borg",
            borg(&["extract", "--stdout", &archive]),
            None,
            Some(&restore),
        )?);
        check_same(&r.raw, &restore)?;
        std::fs::remove_file(&restore)?; // 8 GiB of disk space
        if let Some(c) = &change {
            let before = dir_bytes(&brepo);
            let archive = format!("{}::incremental", brepo.display());
            let mut s = timed(
                "incremental, 2% change",
                "borg",
                borg_create(&archive),
                Some(&c.raw),
                None,
            )?;
            s.repo_bytes = Some(dir_bytes(&brepo) - before);
            out.push(s);
            out.push(best_of(|_| {
                let mut c = borg(&["check", "--verify-data"]);
                c.arg(&brepo);
                timed("verify all data", "borg", c, None, None)
            })?);
        }
        std::fs::remove_dir_all(&brepo)?;
    }
    let _ = std::fs::remove_file(&restore);
    if let Some(c) = change {
        std::fs::remove_file(&c.raw)?;
        std::fs::remove_file(&c.vhdx)?;
    }
    res.samples = out;
    res.failed = failed;
    Ok(res)
}

/// Runs one part of the benchmark. A part that fails is reported at the end and the run goes on:
/// one broken tool or a full disk must not lose the figures of every other part.
fn part<T>(name: &str, failed: &mut Vec<String>, f: impl FnOnce() -> Result<T>) -> Option<T> {
    match f() {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("the {name} part failed: {e:#}");
            failed.push(format!("{name}: {e:#}"));
            None
        }
    }
}

fn latest_point(args: &Args, repo: &Path, cache: &Path) -> Result<String> {
    let o = bv(args, repo, cache)
        .args(["points", "list", "--json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("points list --json")?;
    v.as_array()
        .and_then(|a| a.last())
        .and_then(|p| p["id"].as_str())
        .map(str::to_string)
        .context("no restore point after the backup")
}

pub fn check_same(a: &Path, b: &Path) -> Result<()> {
    let st = Command::new("cmp").arg("-s").arg(a).arg(b).status()?;
    if !st.success() {
        bail!(
            "{} differs from {}: a restore is wrong",
            b.display(),
            a.display()
        );
    }
    Ok(())
}
