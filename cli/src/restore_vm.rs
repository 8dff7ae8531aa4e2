//! `restore vm` and `restore export --format qcow2`: arguments and rendering around the agent
//! library's `vm_restore` and `export_qcow2`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use blockvault_agent::export_qcow2::export_qcow2;
use blockvault_agent::vm_restore::{restore_vm as restore, ImageFormat, VmRestoreRequest};
use blockvault_engine::{DiskReader, Progress, ReaderOptions};
use blockvault_repo::{PointManifest, Repository};
use serde_json::json;

use crate::commands::lift;
use crate::exit::InputError;
use crate::progress::Bar;
use crate::size::{human, parse_size};
use crate::{Global, VmArgs};

fn input(msg: String) -> anyhow::Error {
    anyhow!(InputError(msg))
}

/// `restore export --format qcow2`.
pub async fn export_qcow2_file(
    g: &Global,
    repo: Arc<Repository>,
    m: &PointManifest,
    disk: &str,
    out: &str,
    parallel: usize,
) -> Result<()> {
    if out == "-" {
        bail!(input(
            "--format qcow2 needs a file: a qcow2 image cannot be written to standard output"
                .into()
        ));
    }
    let reader = Arc::new(DiskReader::open(
        repo,
        m,
        disk,
        ReaderOptions {
            parallel: parallel.max(1),
        },
    )?);
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "export", !g.quiet && !g.json);
    let r = export_qcow2(reader.clone(), Path::new(out), progress).await;
    bar.finish();
    r.map_err(lift)?;
    if g.json {
        crate::commands::print_json(
            &json!({"point": m.id, "disk": disk, "size": reader.size(), "out": out, "format": "qcow2"}),
        );
    } else {
        println!(
            "exported disk {disk} of point {} ({}) to {out} as qcow2",
            m.id,
            human(reader.size())
        );
    }
    Ok(())
}

pub async fn restore_vm(g: &Global, a: VmArgs) -> Result<()> {
    let block = parse_size(&a.vhdx_block_size).map_err(input)?;
    let req = VmRestoreRequest {
        to: a.to.clone(),
        format: ImageFormat::parse(&a.format).map_err(lift)?,
        disks: a.disks.clone(),
        overwrite: a.overwrite,
        vhdx_block_size: u32::try_from(block)
            .map_err(|_| input(format!("--vhdx-block-size {block} is too large")))?,
        parallel: a.parallel,
    };
    let repo = crate::commands::open_repo(g).await?;
    let id = repo.resolve_point(&a.point).await?;
    let m = repo.load_point(&id).await?;
    let show = !g.quiet && !g.json;
    let report = restore(&repo, &m, &req, &mut |disk, progress| {
        Box::new(Bar::start(progress, &format!("disk {disk}"), show))
    })
    .await
    .map_err(lift)?;
    if g.json {
        crate::commands::print_json(&serde_json::to_value(&report)?);
    } else {
        for f in &report.files {
            println!("{} -> {}", f.what, f.path.display());
        }
        println!();
        println!("{}", report.bring_up);
    }
    Ok(())
}
