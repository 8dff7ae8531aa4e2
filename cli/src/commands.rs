//! One function per command: parse what the user gave, call the engine, print the result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use blockvault_agent::vm_backup::{self, BackupRequest};
use blockvault_agent::Error as AgentError;
use blockvault_engine::points::{MaintenanceState, PointDetail, PointSummary, VerifyStates};
use blockvault_engine::{export_raw_with, format_ranges};
use blockvault_engine::{
    parse_duration, verify, DiskReader, ExportTarget, Progress, ReaderOptions, Selection, Verdict,
    VerifyOptions, VerifyReport,
};
use blockvault_repo::{KdfParams, OpenOptions, PointManifest, Repository, Storage};
use serde_json::json;

use crate::exit::{InputError, VerifyFailed, VerifyIncomplete};
use crate::progress::Bar;
use crate::size::{human, parse_size};
use crate::store_opts::store_options;
use crate::{
    password, BackupArgs, Cli, Command, DiskCmd, ExportArgs, Global, IndexCmd, InitArgs, PointsCmd,
    RepoCmd, RestoreCmd, VerifyArgs,
};

pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Repo(RepoCmd::Init(a)) => init(g, a).await,
        Command::Repo(RepoCmd::Info) => info(g).await,
        Command::Repo(RepoCmd::Index(IndexCmd::Rebuild)) => rebuild(g).await,
        Command::Repo(RepoCmd::Passwd(a)) => passwd(g, a.new_password_file.as_deref()).await,
        Command::Backup(a) => run_backup(g, a).await,
        Command::Points(PointsCmd::List { vm }) => list_points(g, vm.as_deref()).await,
        Command::Points(PointsCmd::Show { point }) => show_point(g, &point).await,
        Command::Points(PointsCmd::Protect { point }) => {
            crate::maintenance::protect(g, &point, true).await
        }
        Command::Points(PointsCmd::Unprotect { point }) => {
            crate::maintenance::protect(g, &point, false).await
        }
        Command::Prune(a) => crate::maintenance::prune(g, a).await,
        Command::Forget(a) => crate::maintenance::forget(g, a).await,
        Command::Restore(RestoreCmd::Export(a)) => export(g, a).await,
        Command::Restore(RestoreCmd::Mount(a)) => crate::mount::mount(g, a).await,
        Command::Restore(RestoreCmd::Sessions) => crate::mount::sessions(g),
        Command::Restore(RestoreCmd::Unmount(a)) => crate::mount::unmount(g, a).await,
        Command::Restore(RestoreCmd::Files(a)) => crate::files::files(g, a).await,
        Command::Restore(RestoreCmd::Vm(a)) => crate::restore_vm::restore_vm(g, a).await,
        Command::Verify(a) => run_verify(g, a).await,
        Command::Disk(DiskCmd::Info(a)) => crate::disk::disk_info(g, &a),
        Command::Agent(a) => crate::agent::agent(g, a).await,
        Command::Runs(r) => crate::agent::runs(g, r),
    }
}

fn location(g: &Global) -> Result<String> {
    g.repo.clone().ok_or_else(|| {
        anyhow!(InputError(
            "no repository given: pass --repo PATH or set BLOCKVAULT_REPO".into()
        ))
    })
}

pub(crate) fn cache_dir(g: &Global) -> Result<PathBuf> {
    choose_cache_dir(
        g.cache_dir.as_deref(),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// `--cache-dir` (or `BLOCKVAULT_CACHE_DIR`), else `$XDG_CACHE_HOME/blockvault`, else
/// `$HOME/.cache/blockvault`. With none of them there is no directory that is this user's own:
/// a shared one (under /var/tmp, say) could be created first by another local user, who could
/// then plant files and links in it, so the command refuses instead.
fn choose_cache_dir(
    flag: Option<&Path>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d.to_path_buf());
    }
    if let Some(x) = xdg.filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("blockvault"));
    }
    if let Some(h) = home.filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(h).join(".cache").join("blockvault"));
    }
    Err(anyhow!(InputError(
        "no cache directory: neither HOME nor XDG_CACHE_HOME is set; pass --cache-dir DIR (or \
         set BLOCKVAULT_CACHE_DIR) naming a directory only this user can write to"
            .into()
    )))
}

pub(crate) async fn open_repo(g: &Global) -> Result<Arc<Repository>> {
    Ok(open_repo_keeping_password(g).await?.0)
}

/// Opens the repository and gives back the password it was opened with (which `repo passwd`
/// needs again, and must not ask for twice).
async fn open_repo_keeping_password(g: &Global) -> Result<(Arc<Repository>, password::Password)> {
    let storage = Storage::open_with(&location(g)?, false, &store_options(g)?)?;
    // Fail on a missing or foreign repository before asking for a password.
    Repository::read_config(&storage).await?;
    let pw = password::obtain(g.password_file.as_deref(), false)?;
    let opts = OpenOptions {
        cache_dir: cache_dir(g)?,
        zstd_level: compression_level(g)?,
    };
    let repo = Repository::open(storage, &pw, &opts).await?;
    Ok((repo, pw))
}

/// The zstd level for blobs this process writes. Readers need no setting: every level decodes
/// the same way, so one repository may hold blobs of several levels.
fn compression_level(g: &Global) -> Result<i32> {
    match g.compression_level {
        l @ 1..=19 => Ok(l),
        l => bail!(InputError(format!(
            "--compression-level {l}: zstd levels run from 1 to 19"
        ))),
    }
}

pub(crate) fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON serialises")
    );
}

async fn init(g: &Global, a: InitArgs) -> Result<()> {
    let chunk = parse_size(&a.chunk_size).map_err(|e| anyhow!(InputError(e)))?;
    blockvault_chunker::check_chunk_size(chunk).map_err(|e| anyhow!(InputError(e.to_string())))?;
    let storage = Storage::open_with(&location(g)?, true, &store_options(g)?)?;
    let pw = password::obtain(g.password_file.as_deref(), true)?;
    let kdf = match a.kdf_memory_kib {
        Some(m) => KdfParams::with_memory(m.max(8 * 1024)),
        None => KdfParams::recommended(),
    };
    let cfg = Repository::init(&storage, &pw, chunk as u32, kdf).await?;
    if g.json {
        print_json(
            &json!({"id": cfg.id, "location": storage.location(), "chunk_size": cfg.chunk_size}),
        );
    } else {
        println!("created repository {} at {}", cfg.id, storage.location());
        println!("chunk size {}", human(cfg.chunk_size as u64));
    }
    Ok(())
}

async fn info(g: &Global) -> Result<()> {
    let repo = open_repo(g).await?;
    let cfg = repo.config();
    let (points, bad) = repo.list_points().await?;
    let packs = repo.list_packs().await?;
    let stored: u64 = packs.iter().map(|(_, s)| s).sum();
    let stats = repo.index_stats().await?;
    let maint = MaintenanceState::load(&repo).await?;
    if g.json {
        print_json(&json!({
            "maintenance": maint,
            "id": cfg.id, "location": repo.storage().location(), "version": cfg.version,
            "chunk_size": cfg.chunk_size, "created": cfg.created,
            "kdf": {"algorithm": cfg.kdf.algorithm, "memory_kib": cfg.kdf.memory_kib,
                    "iterations": cfg.kdf.iterations, "parallelism": cfg.kdf.parallelism},
            "points": points.len(), "unreadable_points": bad.len(),
            "packs": packs.len(), "bytes_stored": stored,
            "index": {"path": repo.index_path(), "chunks": stats.chunks, "packs": stats.packs, "segments": stats.segments},
        }));
    } else {
        println!("repository {} (format v{})", cfg.id, cfg.version);
        println!("location      {}", repo.storage().location());
        println!("created       {}", cfg.created);
        println!("chunk size    {}", human(cfg.chunk_size as u64));
        println!(
            "key           argon2id m={} KiB t={} p={}",
            cfg.kdf.memory_kib, cfg.kdf.iterations, cfg.kdf.parallelism
        );
        println!(
            "points        {}{}",
            points.len(),
            if bad.is_empty() {
                String::new()
            } else {
                format!(" ({} unreadable)", bad.len())
            }
        );
        println!("packs         {} ({})", packs.len(), human(stored));
        println!(
            "local index   {} ({} chunks, {} packs, {} segments)",
            repo.index_path().display(),
            stats.chunks,
            stats.packs,
            stats.segments
        );
        crate::maintenance::print_state(&maint);
    }
    Ok(())
}

async fn rebuild(g: &Global) -> Result<()> {
    let repo = open_repo(g).await?;
    let report = repo.rebuild_index().await?;
    let stats = repo.index_stats().await?;
    if g.json {
        print_json(&json!({"report": report, "index": stats}));
    } else {
        println!(
            "index rebuilt: {} segments, {} packs read directly; {} chunks in {} packs",
            report.segments_loaded, report.packs_read, stats.chunks, stats.packs
        );
        for p in report
            .unreadable_packs
            .iter()
            .chain(&report.unreadable_segments)
        {
            println!("unreadable: {p}");
        }
    }
    if !report.unreadable_packs.is_empty() {
        bail!(blockvault_repo::Error::Tampered {
            object: "repository".into(),
            detail: format!(
                "{} pack(s) could not be indexed; run 'blockvault verify --read-data'",
                report.unreadable_packs.len()
            ),
        });
    }
    Ok(())
}

async fn passwd(g: &Global, new_file: Option<&Path>) -> Result<()> {
    let (repo, old) = open_repo_keeping_password(g).await?;
    let new = match (new_file, std::env::var_os("BLOCKVAULT_NEW_PASSWORD")) {
        (Some(f), _) => password::from_file(f)?,
        (None, Some(v)) if !v.is_empty() => password::Password::new(v.into_encoded_bytes()),
        _ => {
            let p = rpassword::prompt_password("new password: ").context("reading password")?;
            // The repetition is dropped wiped; `p` becomes the (wiping) password itself.
            let q = zeroize::Zeroizing::new(
                rpassword::prompt_password("repeat new password: ").context("reading password")?,
            );
            let p = password::Password::new(p.into_bytes());
            if *p != *q.as_bytes() || p.is_empty() {
                bail!("the new passwords are empty or do not match");
            }
            p
        }
    };
    let kdf = KdfParams::with_memory(repo.config().kdf.memory_kib);
    repo.change_password(&old, &new, kdf).await?;
    if !g.json {
        println!("password changed for repository {}", repo.id());
    }
    Ok(())
}

/// Parses `NAME=PATH`.
fn parse_disk_arg(s: &str) -> Result<(String, PathBuf)> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| anyhow!(InputError(format!("--disk '{s}': expected NAME=PATH"))))?;
    if !vm_backup::valid_disk_name(name) {
        bail!(InputError(format!(
            "--disk '{s}': a disk name uses letters, digits, '.', '_' and '-'"
        )));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Turns the library's error into the CLI's, keeping the exit-code classification.
pub(crate) fn lift(e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Input(m) => anyhow!(InputError(m)),
        AgentError::Repo(e) => anyhow!(e),
        AgentError::Engine(e) => anyhow!(e),
        other => anyhow!(other),
    }
}

async fn run_backup(g: &Global, a: BackupArgs) -> Result<()> {
    let pack_size = parse_size(&a.pack_size).map_err(|e| anyhow!(InputError(e)))?;
    // Blob offsets in a pack's table are 32-bit: a pack stays well below 4 GiB.
    if !(1 << 20..=1 << 30).contains(&pack_size) {
        bail!(InputError(format!(
            "--pack-size {}: a pack size runs from 1MiB to 1GiB",
            a.pack_size
        )));
    }
    let mut req = BackupRequest {
        vm: a.vm.clone(),
        tags: a.tags.clone(),
        configs: a.configs.clone(),
        consistency: a.consistency.clone(),
        host: vm_backup::hostname(),
        workers: a.workers,
        pack_size: Some(pack_size as usize),
        packs_per_segment: Some(a.packs_per_segment),
        ..BackupRequest::default()
    };
    for d in &a.disks {
        req.disks.push(parse_disk_arg(d)?);
    }
    for c in &a.changes {
        let (name, path) = c
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| anyhow!(InputError(format!("--changes '{c}': expected NAME=PATH"))))?;
        req.changes.push((name.into(), path.into()));
    }
    for m in &a.parent_path_maps {
        let (from, to) = crate::disk::parse_path_map(m)?;
        req.parent_path_maps.push((from, to));
    }
    // Disks and files are checked before the password is asked for.
    let prepared = vm_backup::prepare(req).map_err(lift)?;
    let repo = open_repo(g).await?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "backup", !g.quiet && !g.json);
    let outcome = vm_backup::run(repo, prepared, progress).await;
    bar.finish();
    let r = outcome.map_err(lift)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?);
    } else {
        println!(
            "restore point {} of VM {}: read {}, new {}, stored {} in {:.1}s",
            r.point,
            r.vm,
            human(r.bytes_read),
            human(r.bytes_new),
            human(r.bytes_stored),
            r.duration_ms as f64 / 1000.0
        );
    }
    Ok(())
}

async fn list_points(g: &Global, vm: Option<&str>) -> Result<()> {
    let repo = open_repo(g).await?;
    let (points, bad) = repo.list_points().await?;
    let verify = VerifyStates::load(&repo).await;
    let points: Vec<&PointManifest> = points
        .iter()
        .filter(|p| vm.is_none_or(|v| p.vm == v))
        .collect();
    if g.json {
        let summaries: Vec<PointSummary> = points
            .iter()
            .map(|p| PointSummary::of(p, &verify))
            .collect();
        print_json(&serde_json::to_value(&summaries)?);
    } else {
        println!(
            "{:<16}  {:<20}  {:<20}  {:>10}  disks / tags / verify",
            "point", "vm", "created", "size"
        );
        for p in &points {
            let size: u64 = p.disks.iter().map(|d| d.size).sum();
            let disks: Vec<&str> = p.disks.iter().map(|d| d.name.as_str()).collect();
            println!(
                "{:<16}  {:<20}  {:<20}  {:>10}  {}{}  {}",
                p.id,
                p.vm,
                p.created.get(..19).unwrap_or(&p.created),
                human(size),
                disks.join(","),
                if p.tags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", p.tags.join(","))
                },
                verify.view(&p.id).text()
            );
        }
    }
    for (id, e) in &bad {
        eprintln!("blockvault: restore point {id} is unreadable: {e}");
    }
    Ok(())
}

async fn show_point(g: &Global, text: &str) -> Result<()> {
    let repo = open_repo(g).await?;
    let id = repo.resolve_point(text).await?;
    let p = PointDetail::load(&repo, &id).await?;
    if g.json {
        print_json(&serde_json::to_value(&p)?);
        return Ok(());
    }
    let m = &p.manifest;
    println!("point     {}", m.id);
    println!("vm        {}", m.vm);
    println!("host      {}", m.host);
    println!("created   {}", m.created);
    if !m.tags.is_empty() {
        println!("tags      {}", m.tags.join(", "));
    }
    println!("duration  {:.1}s", m.duration_ms as f64 / 1000.0);
    for d in &m.disks {
        println!(
            "disk {} ({}, {})",
            d.name,
            human(d.size),
            serde_json::to_value(&d.kind)?.as_str().unwrap_or_default()
        );
        println!("  source        {} {}", d.source.format, d.source.path);
        if let Some(r) = &d.full_reason {
            println!("  full because  {r}");
        }
        if let Some(p) = &d.parent {
            println!("  parent        {p}");
        }
        if let Some(r) = &d.rct_id {
            println!("  rct id        {r}");
        }
        if let Some(c) = &d.consistency {
            println!("  consistency   {c}");
        }
        let s = &d.stats;
        println!(
            "  read {}, zero chunks {}, deduplicated {}, new {} ({} -> {} stored)",
            human(s.bytes_read),
            s.zero_chunks,
            s.dedup_chunks,
            s.new_chunks,
            human(s.bytes_new),
            human(s.bytes_stored)
        );
    }
    for c in &m.configs {
        println!("config file {} ({})", c.name, human(c.size));
    }
    println!("verify    {}", p.verify.text());
    for d in p.verify.status().map(|s| &s.damage[..]).unwrap_or_default() {
        println!("  damaged {}: bytes {}", d.disk, format_ranges(&d.ranges));
    }
    match &p.boot_trace {
        Some(t) => {
            let disks: Vec<String> = t
                .disks
                .iter()
                .map(|d| {
                    format!(
                        "{} {} chunks over {:.1}s",
                        d.name,
                        d.chunks,
                        d.span_ms as f64 / 1000.0
                    )
                })
                .collect();
            println!("boot trace  recorded {}: {}", t.recorded, disks.join(", "));
        }
        None => println!("boot trace  none (the next mount records one)"),
    }
    Ok(())
}

async fn export(g: &Global, a: ExportArgs) -> Result<()> {
    let repo = open_repo(g).await?;
    let id = repo.resolve_point(&a.point).await?;
    let m = repo.load_point(&id).await?;
    let stats_of = repo.clone();
    if a.config.is_some() || a.configs_to.is_some() {
        return crate::disk::export_configs(g, &repo, &m, &a).await;
    }
    let (Some(disk), Some(out)) = (a.disk.clone(), a.out.clone()) else {
        bail!(InputError(
            "restore export needs --disk NAME and --out FILE".into()
        ));
    };
    if out != "-" {
        blockvault_agent::vm_restore::check_overwrite(Path::new(&out), a.overwrite)
            .map_err(lift)?;
    }
    if a.allow_damaged && a.format != "raw" {
        bail!(InputError(format!(
            "--allow-damaged writes zeros into a raw image only; export --format raw, then \
             convert it (--format {} would ignore it)",
            a.format
        )));
    }
    if a.format == "vhdx" {
        return crate::disk::export_vhdx_file(g, repo, &m, &disk, &out, &a).await;
    }
    if a.format == "qcow2" {
        return crate::restore_vm::export_qcow2_file(g, repo, &m, &disk, &out, a.parallel).await;
    }
    let reader = Arc::new(DiskReader::open(
        repo,
        &m,
        &disk,
        ReaderOptions {
            parallel: a.parallel.max(1),
        },
    )?);
    let to_stdout = out == "-";
    let stdout_file = to_stdout && stdout_is_empty_file();
    let target = if stdout_file {
        // The same bytes as the stream, written as to `--out FILE`: holes for zero chunks,
        // direct writes (docs/OPERATIONS.md, "Export formats").
        ExportTarget::Path(PathBuf::from("/proc/self/fd/1"))
    } else if to_stdout {
        // A duplicate of fd 1 as a plain file: unbuffered, where `Stdout` would scan every byte
        // of the disk for newlines.
        use std::os::fd::AsFd;
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating standard output")?;
        ExportTarget::Stream(Box::new(std::fs::File::from(fd)))
    } else {
        ExportTarget::Path(PathBuf::from(&out))
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(
        progress.clone(),
        "export",
        !g.quiet && !g.json && !to_stdout,
    );
    let r = export_raw_with(reader.clone(), target, progress, a.allow_damaged).await;
    bar.finish();
    let lost = r?;
    if stdout_file {
        // Whatever the shell writes after us goes after the disk, as it would after a stream.
        use std::os::fd::AsFd;
        rustix::fs::seek(
            std::io::stdout().as_fd(),
            rustix::fs::SeekFrom::Start(reader.size()),
        )
        .context("moving standard output past the exported disk")?;
    }
    if !lost.is_empty() {
        eprintln!(
            "blockvault: disk {disk} of point {}: data lost, zeros written at bytes {}",
            m.id,
            format_ranges(&lost)
        );
    }
    if g.json && !to_stdout {
        print_json(
            &json!({"point": m.id, "disk": disk, "size": reader.size(), "out": out,
            "lost": lost,
            "storage": stats_of.storage().stats(), "blob_cache": stats_of.blob_cache_stats()}),
        );
    } else if !to_stdout {
        println!(
            "exported disk {} of point {} ({}) to {}",
            disk,
            m.id,
            human(reader.size()),
            out
        );
    }
    Ok(())
}

async fn run_verify(g: &Global, a: VerifyArgs) -> Result<()> {
    let input = |e: String| anyhow!(InputError(e));
    let selection = if let Some(s) = &a.read_data_subset {
        Selection::parse_subset(s).map_err(input)?
    } else if let Some(d) = &a.reverify_after {
        Selection::ReverifyAfter {
            secs: parse_duration(d).map_err(|e| input(format!("--reverify-after {e}")))?,
        }
    } else if a.read_data {
        Selection::All
    } else {
        Selection::None
    };
    let max_bytes = match &a.max_bytes {
        Some(m) => Some(parse_size(m).map_err(|e| input(format!("--max-bytes: {e}")))?),
        None => None,
    };
    let repo = open_repo(g).await?;
    let reads = selection != Selection::None || !a.points.is_empty() || !a.vms.is_empty();
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "verify", reads && !g.quiet && !g.json);
    let mut opts = VerifyOptions::new(selection);
    opts.points = a.points.clone();
    opts.vms = a.vms.clone();
    opts.max_bytes = max_bytes;
    opts.parallel = a.parallel.max(1);
    opts.host = vm_backup::hostname();
    let report = verify(repo, opts, progress).await;
    bar.finish();
    let report = report?;
    if g.json {
        print_json(&serde_json::to_value(&report)?);
    } else {
        print_verify_report(&report);
    }
    match report.verdict {
        Verdict::Clean => Ok(()),
        Verdict::Damaged => bail!(VerifyFailed(report.problems.len())),
        Verdict::Incomplete => bail!(VerifyIncomplete(report.unchecked.len())),
    }
}

fn print_verify_report(r: &VerifyReport) {
    println!(
        "checked {} restore points, {} referenced chunks, {} packs ({})",
        r.points,
        r.chunks_referenced,
        r.packs,
        human(r.bytes_stored)
    );
    if let Some(run) = r.run {
        println!(
            "run {run} ({}): read {} packs, {}",
            r.selection,
            r.packs_read,
            human(r.bytes_read)
        );
    }
    if r.overdue_packs > 0 {
        println!(
            "{} packs due in this rotation were left for the next run by --max-bytes",
            r.overdue_packs
        );
    }
    for p in &r.problems {
        println!("DAMAGED {}: {}", p.object, p.detail);
        if !p.affected_points.is_empty() {
            println!("  affects restore points: {}", p.affected_points.join(", "));
        }
        for d in &p.damage {
            println!(
                "  point {} disk {}: bytes {}",
                d.point,
                d.disk,
                format_ranges(&d.ranges)
            );
        }
    }
    for u in &r.unchecked {
        println!("NOT CHECKED {}: {}", u.object, u.detail);
    }
    let count = |s: blockvault_repo::PointVerifyState| {
        r.point_states.iter().filter(|p| p.state == s).count()
    };
    use blockvault_repo::PointVerifyState as S;
    println!(
        "points: {} verified, {} partly verified, {} damaged, {} never verified",
        count(S::Verified),
        count(S::Partly),
        count(S::Damaged),
        count(S::Never)
    );
    if let Some(rec) = &r.record {
        println!("recorded as verify/{rec}");
    }
    match r.verdict {
        Verdict::Clean => println!("no problems found"),
        Verdict::Damaged => println!("damage found"),
        Verdict::Incomplete => println!("no damage found, but some objects could not be checked"),
    }
}

/// True when standard output is an empty regular file at its start, not in append mode (`>
/// disk.raw`): writing the disk there by offset, with holes for zeros, leaves exactly the bytes a
/// stream would. Anything else (a pipe, a terminal, `>>`, a file with contents) gets the stream.
fn stdout_is_empty_file() -> bool {
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let fd = out.as_fd();
    let regular_and_empty = rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_size == 0
    });
    regular_and_empty
        && rustix::fs::fcntl_getfl(fd).is_ok_and(|f| !f.contains(rustix::fs::OFlags::APPEND))
        && rustix::fs::seek(fd, rustix::fs::SeekFrom::Current(0)).is_ok_and(|p| p == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_home_or_a_cache_flag_there_is_no_shared_fallback() {
        let e = choose_cache_dir(None, None, Some("".into())).unwrap_err();
        assert!(e.to_string().contains("--cache-dir"), "{e}");
        assert_eq!(crate::exit::classify(&e), crate::exit::BAD_INPUT);
        assert_eq!(
            choose_cache_dir(None, None, Some("/home/u".into())).unwrap(),
            PathBuf::from("/home/u/.cache/blockvault")
        );
        assert_eq!(
            choose_cache_dir(None, Some("/x".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/x/blockvault")
        );
        assert_eq!(
            choose_cache_dir(Some(Path::new("/c")), None, None).unwrap(),
            PathBuf::from("/c")
        );
    }
}
