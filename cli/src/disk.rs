//! VHDX-aware parts of the commands: parent path maps, `restore export --format vhdx|--config`
//! (rendering the agent library's reports), and `disk info`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use blockvault_agent::export_vhdx::{export_vhdx, VhdxExportOptions};
use blockvault_agent::source::{detect_format, DiskFormat};
use blockvault_agent::vm_restore::{
    check_overwrite, export_configs as export_configs_to, ConfigTarget,
};
use blockvault_agent::{VhdxDisk, VhdxOpenOptions};
use blockvault_engine::{DiskReader, DiskSource, Progress, ReaderOptions};
use blockvault_repo::{PointManifest, Repository};
use serde_json::json;

use crate::commands::lift;
use crate::exit::InputError;
use crate::progress::Bar;
use crate::size::{human, parse_size};
use crate::{DiskInfoArgs, ExportArgs, Global};

fn input(msg: String) -> anyhow::Error {
    anyhow!(InputError(msg))
}

/// Parses one `FROM=TO` parent path map.
pub fn parse_path_map(m: &str) -> Result<(String, String)> {
    let (from, to) = m
        .split_once('=')
        .filter(|(f, t)| !f.is_empty() && !t.is_empty())
        .ok_or_else(|| input(format!("--parent-path-map '{m}': expected FROM=TO")))?;
    Ok((from.to_string(), to.to_string()))
}

/// Parses `FROM=TO` pairs into reader options.
pub fn open_options(maps: &[String]) -> Result<VhdxOpenOptions> {
    let mut o = VhdxOpenOptions::default();
    for m in maps {
        let (from, to) = parse_path_map(m)?;
        o = o.map_parent_path(&from, &to);
    }
    Ok(o)
}

/// `restore export --config NAME --out FILE` or `--configs-to DIR`.
pub async fn export_configs(
    g: &Global,
    repo: &Repository,
    m: &PointManifest,
    a: &ExportArgs,
) -> Result<()> {
    let target = match (&a.configs_to, &a.out) {
        (Some(dir), _) => ConfigTarget::Dir(dir.clone()),
        (None, Some(out)) => ConfigTarget::File(PathBuf::from(out)),
        (None, None) => bail!(InputError("--config needs --out FILE".into())),
    };
    let report = export_configs_to(repo, m, a.config.as_deref(), &target, a.overwrite)
        .await
        .map_err(lift)?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for c in &report.configs {
        println!(
            "config file {} ({}) -> {}",
            c.name,
            human(c.size),
            c.out.display()
        );
    }
    Ok(())
}

/// `restore export --format vhdx`.
pub async fn export_vhdx_file(
    g: &Global,
    repo: Arc<Repository>,
    m: &PointManifest,
    disk: &str,
    out: &str,
    a: &ExportArgs,
) -> Result<()> {
    if out == "-" {
        bail!(InputError(
            "--format vhdx needs a file: a VHDX cannot be written to standard output".into()
        ));
    }
    check_overwrite(Path::new(out), a.overwrite).map_err(lift)?;
    let block = parse_size(&a.vhdx_block_size).map_err(input)?;
    let lss = m
        .disk(disk)
        .and_then(|d| d.source.logical_sector_size)
        .unwrap_or(512);
    let reader = Arc::new(DiskReader::open(
        repo,
        m,
        disk,
        ReaderOptions {
            parallel: a.parallel.max(1),
        },
    )?);
    if reader.size() % lss as u64 != 0 {
        bail!(InputError(format!(
            "disk '{disk}' has {} bytes, not a multiple of its {lss}-byte sector: it cannot be a VHDX; export it --format raw",
            reader.size()
        )));
    }
    let opts = VhdxExportOptions {
        block_size: u32::try_from(block)
            .map_err(|_| input(format!("--vhdx-block-size {block} is too large")))?,
        logical_sector_size: lss,
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "export", !g.quiet && !g.json);
    let r = export_vhdx(reader.clone(), Path::new(out), &opts, progress).await;
    bar.finish();
    r?;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"point": m.id, "disk": disk, "size": reader.size(), "out": out, "format": "vhdx"})
            )?
        );
    } else {
        println!(
            "exported disk {disk} of point {} ({}) to {out} as VHDX",
            m.id,
            human(reader.size())
        );
    }
    Ok(())
}

/// `disk info FILE`: what the reader understood of an image.
pub fn disk_info(g: &Global, a: &DiskInfoArgs) -> Result<()> {
    let opts = open_options(&a.parent_path_maps)?;
    let what = a.file.display().to_string();
    let format = detect_format(&a.file).map_err(|e| input(e.to_string()))?;
    if format == DiskFormat::Raw {
        let src = blockvault_engine::RawFile::open(&a.file)
            .map_err(|e| input(format!("cannot open {what}: {e}")))?;
        let alloc = src.allocated().map_err(|e| input(format!("{what}: {e}")))?;
        if g.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"format": "raw", "path": what,
                    "virtual_size": src.size(), "allocated_bytes": alloc.total_len()}))?
            );
        } else {
            println!(
                "{what}: raw image, {} ({} allocated)",
                human(src.size()),
                human(alloc.total_len())
            );
        }
        return Ok(());
    }
    let disk = VhdxDisk::open(&a.file, &opts).map_err(|e| input(e.to_string()))?;
    let info = disk.info();
    if g.json {
        let mut v = serde_json::to_value(&info)?;
        v["format"] = json!("vhdx");
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{}: VHDX{}",
        info.path,
        if info.has_parent {
            " (differencing)"
        } else {
            ""
        }
    );
    println!(
        "virtual size      {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    println!("file size         {}", human(info.file_size));
    println!("block size        {}", human(info.block_size as u64));
    println!(
        "sectors           logical {} B, physical {} B",
        info.logical_sector_size, info.physical_sector_size
    );
    println!("disk id           {}", info.disk_id);
    println!(
        "header            {} (sequence {})",
        info.current_header, info.header_sequence
    );
    let b = &info.bat;
    println!(
        "BAT               {} payload blocks: {} fully present, {} partially present, {} zero, {} not present, {} unmapped, {} undefined; {} sector bitmaps",
        b.payload_blocks, b.fully_present, b.partially_present, b.zero, b.not_present, b.unmapped, b.undefined, b.sector_bitmaps_present
    );
    if info.log.replayed {
        println!(
            "log               replayed {} entries in memory (log guid {})",
            info.log.entries_replayed, info.log.log_guid
        );
    } else {
        println!("log               clean");
    }
    for p in &info.parent_chain {
        println!("parent            {p}");
    }
    Ok(())
}
