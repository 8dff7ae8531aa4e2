//! The source contract: a source *captures* a VM (hands over disk images, changed-ranges files and
//! configuration files that stay unchanged while they are read) and *releases* it afterwards,
//! whatever happened: the runner calls `release` after every `capture`, whether the capture, the
//! backup or neither failed (with the backup's report only when it succeeded). The `hyperv`
//! source also cleans up inside a failed capture, so a missing checkpoint at release is expected.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::config::{JobConfig, VmConfig};
use super::hooks::{run_hook, LogTail};
use crate::error::Result;
use crate::vm_backup::BackupReport;

/// What the runner knows of one VM's backup attempt.
pub struct VmContext {
    pub job: String,
    pub run: i64,
    pub vm: String,
    /// The RCT id recorded per disk with the VM's newest restore point (for the `hyperv` source's
    /// change query).
    pub parent_rct_ids: Vec<(String, String)>,
    pub log: LogTail,
    pub cancel: CancellationToken,
}

impl VmContext {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BLOCKVAULT_JOB", self.job.clone()),
            ("BLOCKVAULT_RUN", self.run.to_string()),
            ("BLOCKVAULT_VM", self.vm.clone()),
        ]
    }
}

/// What a capture hands to the backup.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    pub disks: Vec<(String, PathBuf)>,
    pub changes: Vec<(String, PathBuf)>,
    pub configs: Vec<PathBuf>,
    /// `application` or `crash`.
    pub consistency: Option<String>,
    pub parent_path_maps: Vec<(String, String)>,
}

#[async_trait]
pub trait VmSource: Send + Sync {
    async fn capture(&self, cx: &VmContext) -> Result<Captured>;
    /// Runs after every capture, failed or not; `outcome` is the backup's report when it succeeded.
    async fn release(&self, cx: &VmContext, outcome: Option<&BackupReport>) -> Result<()>;
}

/// `source = "files"`: paths from the configuration, with optional `capture`/`release` commands.
pub struct FilesSource {
    pub vm: VmConfig,
    pub hook_timeout: Duration,
}

impl FilesSource {
    pub fn new(job: &JobConfig, vm: &VmConfig) -> Self {
        Self {
            vm: vm.clone(),
            hook_timeout: Duration::from_secs(job.hooks.timeout_secs),
        }
    }
}

#[async_trait]
impl VmSource for FilesSource {
    async fn capture(&self, cx: &VmContext) -> Result<Captured> {
        if let Some(cmd) = &self.vm.capture {
            run_hook(
                "capture",
                cmd,
                &cx.env(),
                self.hook_timeout,
                &cx.log,
                &cx.cancel,
            )
            .await?;
        }
        Ok(Captured {
            disks: self
                .vm
                .disks
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            changes: self
                .vm
                .changes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            configs: self.vm.configs.clone(),
            consistency: self.vm.consistency.as_ref().map(|c| c.get_ref().clone()),
            parent_path_maps: self
                .vm
                .parent_path_maps
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    async fn release(&self, cx: &VmContext, outcome: Option<&BackupReport>) -> Result<()> {
        let Some(cmd) = &self.vm.release else {
            return Ok(());
        };
        let mut env = cx.env();
        env.push((
            "BLOCKVAULT_STATUS",
            if outcome.is_some() {
                "success"
            } else {
                "failed"
            }
            .into(),
        ));
        if let Some(r) = outcome {
            env.push(("BLOCKVAULT_POINT", r.point.to_string()));
        }
        // A release must run even when the run is being cancelled: it drops the snapshot.
        let never = CancellationToken::new();
        run_hook("release", cmd, &env, self.hook_timeout, &cx.log, &never).await
    }
}
