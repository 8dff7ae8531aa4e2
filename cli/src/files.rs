//! `restore files`: list partitions and directories of a disk in a restore point and extract
//! files, reading the guest file system in user space (blockvault-restore) through the point's
//! random-access reader, so only the chunks the file system touches are fetched.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use blockvault_engine::{DiskReader, RandomReadOptions, RandomReader, ReaderOptions, Segment};
use blockvault_restore::{
    open_volume, parse_location, partitions, Entry, EntryKind, ExtractOptions, PartitionTable,
    ReadAt, Volume,
};
use serde_json::json;

use crate::exit::InputError;
use crate::size::{human, parse_size};
use crate::{FilesAction, FilesArgs, Global};

/// The disk of a restore point as positioned reads, for the synchronous parsers. Called only from
/// a blocking thread, which waits on the runtime for each read.
///
/// The parsers read a block or a few at a time, mostly within the chunk they read last (the
/// ext4 crate reads a file one 4 KiB block per call). Each thread keeps the chunk it read last
/// and copies from it while reads stay inside: a profile of a tree extraction put the reader's
/// per-read bookkeeping (the wait on the runtime, the cache lookup, the read-ahead detection) at
/// about a tenth of the CPU (docs/BENCHMARKS.md, "Tree extraction reads whole chunks").
struct PointDisk {
    reader: Arc<RandomReader>,
    rt: tokio::runtime::Handle,
    /// Tells this disk's chunks from another's in the threads' kept chunks.
    id: u64,
}

/// The chunk a thread read last: which disk, its first byte, its data.
type KeptChunk = (u64, u64, Segment);

thread_local! {
    static KEPT: std::cell::RefCell<Option<KeptChunk>> = const { std::cell::RefCell::new(None) };
}

impl PointDisk {
    fn new(reader: Arc<RandomReader>, rt: tokio::runtime::Handle) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            reader,
            rt,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn read_segments(&self, offset: u64, len: u64) -> std::io::Result<Vec<Segment>> {
        self.rt
            .block_on(self.reader.read_at_here(offset, len))
            .map_err(std::io::Error::other)
    }
}

/// Fills `buf` from `seg`'s bytes starting at `from`.
fn copy_out(seg: &Segment, from: usize, buf: &mut [u8]) {
    match seg {
        Segment::Data(b) => buf.copy_from_slice(&b[from..from + buf.len()]),
        Segment::Zero(_) => buf.fill(0),
    }
}

impl ReadAt for PointDisk {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let chunk = u64::from(self.reader.layout().chunk_size());
        let start = offset - offset % chunk;
        let end = offset.saturating_add(buf.len() as u64);
        if end <= start + chunk && end <= self.size() {
            let from = (offset - start) as usize;
            let kept = KEPT.with_borrow(|k| match k {
                Some((id, at, seg)) if *id == self.id && *at == start => {
                    copy_out(seg, from, buf);
                    true
                }
                _ => false,
            });
            if kept {
                return Ok(());
            }
            // The whole chunk (one segment: its data or its length of zeros), kept for the next
            // reads.
            let len = chunk.min(self.size() - start);
            let mut segs = self.read_segments(start, len)?;
            if let (1, Some(seg)) = (segs.len(), segs.pop()) {
                copy_out(&seg, from, buf);
                KEPT.set(Some((self.id, start, seg)));
                return Ok(());
            }
        }
        let segs = self.read_segments(offset, buf.len() as u64)?;
        let mut at = 0usize;
        for s in segs {
            let n = s.len() as usize;
            copy_out(&s, 0, &mut buf[at..at + n]);
            at += n;
        }
        Ok(())
    }
}

fn time_text(t: Option<(i64, u32)>) -> String {
    t.and_then(|(s, _)| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|d| {
            d.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn kind_char(k: EntryKind) -> char {
    match k {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
        EntryKind::Other => '?',
    }
}

/// Which partition a path without `pN:` means: the whole-disk file system, or the only readable
/// partition; anything else must be named.
fn default_partition(table: &PartitionTable) -> Result<String> {
    if table.scheme == "none" {
        return Ok("disk".into());
    }
    let readable: Vec<_> = table
        .partitions
        .iter()
        .filter(|p| p.filesystem.readable() && p.problem.is_none())
        .collect();
    if readable.len() == 1 {
        return Ok(readable[0].selector());
    }
    bail!(InputError(format!(
        "the disk has {} partitions; name one, as in {}:/path (see `ls` without a path)",
        table.partitions.len(),
        table
            .partitions
            .first()
            .map(|p| p.selector())
            .unwrap_or_else(|| "p1".into())
    )))
}

pub async fn files(g: &Global, a: FilesArgs) -> Result<()> {
    let repo = crate::commands::open_repo(g).await?;
    let id = repo.resolve_point(&a.point).await?;
    let m = repo.load_point(&id).await?;
    let cache = parse_size(&a.memory_cache).map_err(|e| anyhow!(InputError(e)))?;
    let reader = Arc::new(DiskReader::open(
        repo.clone(),
        &m,
        &a.disk,
        ReaderOptions {
            parallel: a.parallel.max(1),
        },
    )?);
    let readahead = match &a.action {
        FilesAction::Ls { .. } => 0,
        FilesAction::Get { .. } => a.readahead,
    };
    let rr = Arc::new(
        RandomReader::open(
            reader,
            RandomReadOptions {
                cache_bytes: cache as usize,
                parallel: a.parallel.max(1),
                readahead_chunks: readahead,
            },
        )
        .await?,
    );
    let dev: Arc<dyn ReadAt> = Arc::new(PointDisk::new(
        rr.clone(),
        tokio::runtime::Handle::current(),
    ));
    let json_out = g.json;
    let quiet = g.quiet;
    let action = a.action;
    let result = tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
        let table = partitions(&dev)?;
        match action {
            FilesAction::Ls { path: None, .. } => Ok(list_partitions(&table, json_out)),
            FilesAction::Ls {
                path: Some(p),
                limit,
            } => list_dir(&dev, &table, &p, limit, json_out),
            FilesAction::Get { paths, to, out } => get(&dev, &table, &paths, to, out, quiet),
        }
    })
    .await
    .context("the file-system reader stopped")??;
    if json_out && result.get("streamed").is_none() {
        let mut v = result;
        v["point"] = json!(m.id);
        v["disk"] = json!(a.disk);
        v["storage"] = serde_json::to_value(repo.storage().stats())?;
        v["blob_cache"] = serde_json::to_value(repo.blob_cache_stats())?;
        let c = rr.cache_stats();
        v["chunk_cache"] = json!({"chunks": c.chunks, "bytes": c.bytes});
        crate::commands::print_json(&v);
    }
    Ok(())
}

fn list_partitions(table: &PartitionTable, json_out: bool) -> serde_json::Value {
    if !json_out {
        println!(
            "{} partition table, disk of {}",
            match table.scheme.as_str() {
                "gpt" => "GPT",
                "mbr" => "MBR",
                _ => "no",
            },
            human(table.disk_size)
        );
        println!(
            "{:<5} {:<24} {:>14} {:>10}  file system",
            "part", "type", "start", "size"
        );
        for p in &table.partitions {
            println!(
                "{:<5} {:<24} {:>14} {:>10}  {}{}",
                p.selector(),
                p.type_name,
                p.start,
                human(p.size),
                p.filesystem,
                match &p.problem {
                    Some(why) => format!(" (unreadable: {why})"),
                    None if !p.filesystem.readable() => " (use restore mount)".into(),
                    None => String::new(),
                }
            );
        }
    }
    serde_json::to_value(table).unwrap_or_default()
}

fn entry_json(e: &Entry) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    v["modified"] = json!(time_text(e.mtime));
    v
}

fn list_dir(
    dev: &Arc<dyn ReadAt>,
    table: &PartitionTable,
    spec: &str,
    limit: usize,
    json_out: bool,
) -> Result<serde_json::Value> {
    let loc = parse_location(spec)?;
    let part = match loc.partition {
        Some(p) => p,
        None => default_partition(table)?,
    };
    let mut vol = open_volume(dev, table, &part)?;
    let top = vol.stat(&loc.path)?;
    let (entries, truncated) = if top.kind == EntryKind::Dir {
        let l = vol.list(&loc.path, limit)?;
        (l.entries, l.truncated)
    } else {
        (vec![top.clone()], false)
    };
    if !json_out {
        for e in &entries {
            println!(
                "{}{} {:>12} {}  {}{}",
                kind_char(e.kind),
                e.mode
                    .map(|m| format!("{:04o}", m & 0o7777))
                    .unwrap_or_else(|| "    ".into()),
                e.size,
                time_text(e.mtime),
                e.name,
                if e.kind == EntryKind::Dir { "/" } else { "" }
            );
        }
        if truncated {
            println!("... more entries than --limit {limit}; showing the first {limit}");
        }
    }
    Ok(json!({
        "partition": part, "filesystem": vol.kind(), "path": spec,
        "entries": entries.iter().map(entry_json).collect::<Vec<_>>(), "truncated": truncated,
    }))
}

fn get(
    dev: &Arc<dyn ReadAt>,
    table: &PartitionTable,
    paths: &[String],
    to: Option<std::path::PathBuf>,
    out: Option<String>,
    quiet: bool,
) -> Result<serde_json::Value> {
    let mut volumes: HashMap<String, Box<dyn Volume>> = HashMap::new();
    let mut results = Vec::new();
    if let Some(out) = out {
        if out != "-" || paths.len() != 1 || to.is_some() {
            bail!(InputError(
                "--out - streams exactly one file to standard output (use --to DIR otherwise)"
                    .into()
            ));
        }
        let loc = parse_location(&paths[0])?;
        let part = match loc.partition {
            Some(p) => p,
            None => default_partition(table)?,
        };
        let mut vol = open_volume(dev, table, &part)?;
        let e = vol.stat(&loc.path)?;
        if e.kind != EntryKind::File {
            bail!(InputError(format!(
                "{}: not a regular file; --out - streams one file",
                paths[0]
            )));
        }
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
        let mut pos = 0u64;
        let zeros = vec![0u8; 1 << 16];
        let size = vol.read_file(&loc.path, 1 << 20, &mut |off, data| {
            // Pieces arrive in order; a skipped hole is written as zeros.
            let io = |e: std::io::Error| blockvault_restore::Error::Output {
                path: "<stdout>".into(),
                source: e,
            };
            while pos < off {
                let n = (off - pos).min(zeros.len() as u64) as usize;
                w.write_all(&zeros[..n]).map_err(io)?;
                pos += n as u64;
            }
            w.write_all(data).map_err(io)?;
            pos += data.len() as u64;
            Ok(())
        })?;
        while pos < size {
            let n = (size - pos).min(zeros.len() as u64) as usize;
            w.write_all(&zeros[..n])?;
            pos += n as u64;
        }
        w.flush()?;
        return Ok(json!({"streamed": paths[0], "size": size}));
    }
    let Some(to) = to else {
        bail!(InputError(
            "get needs --to DIR (or --out - for one file)".into()
        ));
    };
    let mut refused = 0u64;
    for spec in paths {
        let loc = parse_location(spec)?;
        let part = match loc.partition {
            Some(p) => p,
            None => default_partition(table)?,
        };
        if !volumes.contains_key(&part) {
            volumes.insert(part.clone(), open_volume(dev, table, &part)?);
        }
        let vol = volumes.get_mut(&part).expect("inserted");
        let report =
            blockvault_restore::extract(vol.as_mut(), &loc.path, &to, &ExtractOptions::default())?;
        if !quiet {
            let links = match report.hard_links {
                0 => String::new(),
                n => format!(" ({n} of them hard links)"),
            };
            eprintln!(
                "{spec}: {} files{links}, {} directories, {} symlinks, {} to {}",
                report.files,
                report.directories,
                report.symlinks,
                human(report.bytes),
                to.display()
            );
            for s in &report.skipped {
                eprintln!("  skipped {s}");
            }
            if report.skipped_total > report.skipped.len() as u64 {
                eprintln!(
                    "  ... and {} more skipped",
                    report.skipped_total - report.skipped.len() as u64
                );
            }
            for s in &report.refused {
                eprintln!("  NOT EXTRACTED {s}");
            }
            if report.refused_total > report.refused.len() as u64 {
                eprintln!(
                    "  ... and {} more not extracted",
                    report.refused_total - report.refused.len() as u64
                );
            }
        }
        refused += report.refused_total;
        results.push(json!({"path": spec, "partition": part, "report": report}));
    }
    if refused > 0 {
        // Everything else is extracted; the run still fails, so no script takes the tree for
        // complete.
        return Err(blockvault_restore::Error::Unsupported {
            what: format!("{refused} file(s) of what was asked for (listed as NOT EXTRACTED)"),
            found: "content this reader does not read".into(),
        }
        .into());
    }
    Ok(json!({"to": to, "extracted": results}))
}
