//! `source = "hyperv"` (Windows hosts): a production checkpoint (falling back to a standard, i.e.
//! crash-consistent, checkpoint when allowed, and recording which), one changed-ranges file per
//! disk queried against the RCT id of the VM's previous point, the checkpoint's disks and
//! configuration handed to the backup, then the checkpoint turned into a reference point and the
//! previous reference points removed. Whatever fails, no checkpoint made by blockvault is left.
//!
//! The agent drives each step as one PowerShell command ([`Step`], whose exact text is
//! [`script`]); the ordering and cleanup logic here is tested with a fake runner. docs/AGENT.md
//! lists the commands and says what was exercised on a real host (nothing, so far).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::config::HypervConfig;
use super::sources::{Captured, VmContext, VmSource};
use crate::error::{Error, Result};
use crate::vm_backup::BackupReport;

/// The prefix of every checkpoint blockvault makes; anything with it is blockvault's to remove.
pub const CHECKPOINT_PREFIX: &str = "blockvault-";

/// One PowerShell step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Names of the VM's checkpoints that start with [`CHECKPOINT_PREFIX`] (left by a killed run).
    ListOwnCheckpoints { vm: String },
    /// `Checkpoint-VM` with the VM's checkpoint type set to ProductionOnly (`production`) or
    /// Standard for the duration of the call, then restored.
    Checkpoint {
        vm: String,
        name: String,
        production: bool,
    },
    /// The checkpoint's disk files and configuration files (`.vmcx`, `.vmrs`).
    CheckpointFiles { vm: String, name: String },
    /// `GetVirtualDiskChanges` over the whole disk against `limit_id` (or none: a full), written as
    /// a changed-ranges document (docs/changed-ranges.md) to `out`.
    QueryChanges {
        vm: String,
        name: String,
        disk_path: String,
        limit_id: Option<String>,
        out: String,
    },
    /// `ConvertToReferencePoint` of the checkpoint; returns the new reference point's id.
    ConvertToReference { vm: String, name: String },
    /// The VM's reference points other than `keep`, destroyed.
    RemoveOtherReferencePoints { vm: String, keep: String },
    /// `Remove-VMSnapshot` of the checkpoint.
    RemoveCheckpoint { vm: String, name: String },
}

/// Runs a step and returns its JSON output (steps print one JSON value, or nothing).
#[async_trait]
pub trait PowerShell: Send + Sync {
    async fn run(&self, step: &Step) -> std::result::Result<serde_json::Value, String>;
}

/// A PowerShell single-quoted string literal.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Selects the VM named `vm` into `$vm`, matching the name exactly (`Get-VM -Name` and
/// `-VMName` take wildcards, so `web*` or `a[1]` would select other VMs too) and insisting on
/// exactly one (Hyper-V allows two VMs with one name; a step must never act on the wrong one).
/// The name only ever appears single-quoted: a double-quoted string would expand `$(...)` in it.
fn select_vm(vm: &str) -> String {
    format!(
        "$vm = @(Get-VM | Where-Object {{ $_.Name -eq {n} }})\nif ($vm.Count -ne 1) {{ throw ('expected one VM named ' + {n} + ', found ' + $vm.Count) }}\n$vm = $vm[0]\n",
        n = q(vm)
    )
}

/// The exact PowerShell text of a step (documented in docs/AGENT.md).
pub fn script(step: &Step) -> String {
    let head = "$ErrorActionPreference = 'Stop'\n";
    let vm = match step {
        Step::ListOwnCheckpoints { vm }
        | Step::Checkpoint { vm, .. }
        | Step::CheckpointFiles { vm, .. }
        | Step::QueryChanges { vm, .. }
        | Step::ConvertToReference { vm, .. }
        | Step::RemoveOtherReferencePoints { vm, .. }
        | Step::RemoveCheckpoint { vm, .. } => select_vm(vm),
    };
    let body = match step {
        Step::ListOwnCheckpoints { .. } => format!(
            "@(Get-VMSnapshot -VM $vm | Where-Object {{ $_.Name -like {} }} | ForEach-Object {{ $_.Name }}) | ConvertTo-Json -Compress",
            q(&format!("{CHECKPOINT_PREFIX}*"))
        ),
        Step::Checkpoint {
            name, production, ..
        } => format!(
            "$old = $vm.CheckpointType\nSet-VM -VM $vm -CheckpointType {kind}\ntry {{ Checkpoint-VM -VM $vm -SnapshotName {name} }} finally {{ Set-VM -VM $vm -CheckpointType $old }}",
            name = q(name),
            kind = if *production { "ProductionOnly" } else { "Standard" }
        ),
        Step::CheckpointFiles { name, .. } => format!(
            "$s = Get-VMSnapshot -VM $vm -Name {}\n$cfg = @(Get-ChildItem -Path (Join-Path $s.ConfigurationLocation 'Snapshots') -Filter ($s.Id.ToString() + '.*') | Where-Object {{ $_.Extension -in '.vmcx','.vmrs' }} | ForEach-Object {{ $_.FullName }})\n@{{ disks = @($s.HardDrives | ForEach-Object {{ $_.Path }}); configs = $cfg }} | ConvertTo-Json -Compress",
            q(name)
        ),
        Step::QueryChanges {
            name,
            disk_path,
            limit_id,
            out,
            ..
        } => format!(
            "$s = Get-VMSnapshot -VM $vm -Name {name}\n$ims = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_ImageManagementService\n$vhd = Get-VHD -Path {path}\n$sd = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_VirtualSystemSettingData -Filter (\"ConfigurationID='\" + $s.Id + \"'\")\n$sasd = Get-CimAssociatedInstance -InputObject $sd -ResultClassName Msvm_StorageAllocationSettingData | Where-Object {{ $_.HostResource -contains {path} }}\n$limit = {limit}\n$doc = [ordered]@{{ format = 'hyperv-rct-changes'; version = 1; vm_id = $s.VMId.ToString(); disk = [ordered]@{{ path = {path}; virtual_disk_id = $vhd.DiskIdentifier; virtual_size = $vhd.Size; logical_sector_size = $vhd.LogicalSectorSize }}; limit_id = $limit; new_rct_id = @($sasd.RcTId)[0]; full = ($null -eq $limit); queries = @() }}\nif ($null -ne $limit) {{\n  $off = 0\n  while ($off -lt $vhd.Size) {{\n    $r = Invoke-CimMethod -InputObject $ims -MethodName GetVirtualDiskChanges -Arguments @{{ Path = {path}; LimitId = $limit; TargetSnapshotId = $sd.InstanceID; ByteOffset = [uint64]$off; ByteLength = [uint64]($vhd.Size - $off) }}\n    if ($r.ReturnValue -ne 0) {{ throw \"GetVirtualDiskChanges returned $($r.ReturnValue)\" }}\n    $doc.queries += [ordered]@{{ byte_offset = $off; byte_length = $vhd.Size - $off; processed_byte_length = $r.ProcessedByteLength; changed_byte_offsets = @($r.ChangedByteOffsets); changed_byte_lengths = @($r.ChangedByteLengths) }}\n    if ($r.ProcessedByteLength -eq 0) {{ throw 'GetVirtualDiskChanges made no progress' }}\n    $off += $r.ProcessedByteLength\n  }}\n}}\n[IO.File]::WriteAllText({out}, ($doc | ConvertTo-Json -Depth 6 -Compress), (New-Object Text.UTF8Encoding $false))",
            name = q(name),
            path = q(disk_path),
            limit = limit_id.as_deref().map(q).unwrap_or_else(|| "$null".into()),
            out = q(out)
        ),
        Step::ConvertToReference { name, .. } => format!(
            "$s = Get-VMSnapshot -VM $vm -Name {}\n$sd = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_VirtualSystemSettingData -Filter (\"ConfigurationID='\" + $s.Id + \"'\")\n$svc = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_VirtualSystemSnapshotService\n$r = Invoke-CimMethod -InputObject $svc -MethodName ConvertToReferencePoint -Arguments @{{ AffectedSnapshot = $sd }}\nif ($r.ReturnValue -ne 0 -and $r.ReturnValue -ne 4096) {{ throw \"ConvertToReferencePoint returned $($r.ReturnValue)\" }}\n@{{ reference_point = [string]$r.ResultingReferencePoint.InstanceID }} | ConvertTo-Json -Compress",
            q(name)
        ),
        Step::RemoveOtherReferencePoints { keep, .. } => format!(
            "$keep = {keep}\nif ([string]::IsNullOrEmpty($keep)) {{ throw 'no reference point to keep: none removed' }}\n$cs = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_ComputerSystem -Filter (\"Name='\" + $vm.Id.ToString() + \"'\")\n$svc = Get-CimInstance -Namespace root\\virtualization\\v2 -ClassName Msvm_VirtualSystemReferencePointService\nGet-CimAssociatedInstance -InputObject $cs -ResultClassName Msvm_VirtualSystemReferencePoint | Where-Object {{ $_.InstanceID -ne $keep }} | ForEach-Object {{ $r = Invoke-CimMethod -InputObject $svc -MethodName DestroyReferencePoint -Arguments @{{ AffectedReferencePoint = $_ }}; if ($r.ReturnValue -ne 0 -and $r.ReturnValue -ne 4096) {{ throw \"DestroyReferencePoint returned $($r.ReturnValue)\" }} }}",
            keep = q(keep)
        ),
        Step::RemoveCheckpoint { name, .. } => format!(
            "Remove-VMSnapshot -VM $vm -Name {} -Confirm:$false",
            q(name)
        ),
    };
    format!("{head}{vm}{body}\n")
}

/// Runs steps with `powershell.exe -NoProfile -NonInteractive -Command -`, the script on stdin.
pub struct RealPowerShell {
    pub exe: String,
}

#[async_trait]
impl PowerShell for RealPowerShell {
    async fn run(&self, step: &Step) -> std::result::Result<serde_json::Value, String> {
        let mut child = super::hooks::without_secrets(&mut tokio::process::Command::new(&self.exe))
            .args(["-NoProfile", "-NonInteractive", "-Command", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script(step).as_bytes())
                .await
                .map_err(|e| format!("writing to {}: {e}", self.exe))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("{}: {e}", self.exe))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "{} failed: {}",
                self.exe,
                err.lines().last().unwrap_or("no message")
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.trim();
        if text.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(text).map_err(|e| format!("unexpected output of {}: {e}", self.exe))
    }
}

/// The Hyper-V source over a [`PowerShell`] runner.
pub struct HypervSource {
    pub config: HypervConfig,
    pub ps: Arc<dyn PowerShell>,
}

fn checkpoint_name(cx: &VmContext) -> String {
    format!("{CHECKPOINT_PREFIX}{}-run{}", cx.job, cx.run)
}

/// A disk name for the repository from a host path: the file stem, with other characters than
/// letters, digits, `.`, `_`, `-` replaced. Stable across runs, which incrementals need.
pub fn disk_name(path: &str) -> String {
    let file = path.rsplit(['\\', '/']).next().unwrap_or(path);
    let stem = file
        .rsplit_once('.')
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty())
        .unwrap_or(file);
    let n: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty() {
        "disk".into()
    } else {
        n
    }
}

#[derive(Deserialize)]
struct Files {
    disks: Vec<String>,
    #[serde(default)]
    configs: Vec<String>,
}

impl HypervSource {
    async fn step(&self, cx: &VmContext, step: Step) -> Result<serde_json::Value> {
        cx.log.push(format!("hyperv: {}", step_label(&step)));
        self.ps.run(&step).await.map_err(|e| {
            cx.log.push(format!("hyperv: failed: {e}"));
            Error::Source(format!("VM '{}': {}: {e}", cx.vm, step_label(&step)))
        })
    }

    /// Removes the checkpoint; a failure is logged and returned, never hidden.
    async fn remove_checkpoint(&self, cx: &VmContext, name: &str) -> Result<()> {
        self.step(
            cx,
            Step::RemoveCheckpoint {
                vm: cx.vm.clone(),
                name: name.into(),
            },
        )
        .await
        .map(|_| ())
    }

    async fn capture_inner(&self, cx: &VmContext, name: &str) -> Result<Captured> {
        let files: Files = serde_json::from_value(
            self.step(
                cx,
                Step::CheckpointFiles {
                    vm: cx.vm.clone(),
                    name: name.into(),
                },
            )
            .await?,
        )
        .map_err(|e| Error::Source(format!("VM '{}': checkpoint files: {e}", cx.vm)))?;
        if files.disks.is_empty() {
            return Err(Error::Source(format!(
                "VM '{}': the checkpoint has no disk",
                cx.vm
            )));
        }
        let mut cap = Captured::default();
        let dir = self.config.work_dir.join(&cx.vm);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        for path in &files.disks {
            let disk = disk_name(path);
            if cap.disks.iter().any(|(d, _)| *d == disk) {
                return Err(Error::Source(format!(
                    "VM '{}': two disks are named '{disk}' ({path})",
                    cx.vm
                )));
            }
            let out = dir.join(format!("{disk}.changes.json"));
            let out_s = out.display().to_string();
            let limit = cx
                .parent_rct_ids
                .iter()
                .find(|(d, _)| *d == disk)
                .map(|(_, r)| r.clone());
            let q = |limit_id: Option<String>| Step::QueryChanges {
                vm: cx.vm.clone(),
                name: name.into(),
                disk_path: path.clone(),
                limit_id,
                out: out_s.clone(),
            };
            if let Err(e) = self.step(cx, q(limit.clone())).await {
                if limit.is_none() {
                    return Err(e);
                }
                // The baseline is gone (RCT id invalid, tracking disabled): the document for a
                // full backup still records the new RCT id, so the chain restarts here.
                cx.log.push(format!(
                    "hyperv: change query against {} failed, taking a full backup",
                    limit.as_deref().unwrap_or_default()
                ));
                self.step(cx, q(None)).await?;
            }
            cap.disks.push((disk.clone(), PathBuf::from(path)));
            cap.changes.push((disk, out));
        }
        cap.configs = files.configs.iter().map(PathBuf::from).collect();
        Ok(cap)
    }
}

fn step_label(s: &Step) -> String {
    match s {
        Step::ListOwnCheckpoints { .. } => "list blockvault checkpoints".into(),
        Step::Checkpoint {
            name, production, ..
        } => format!(
            "{} checkpoint {name}",
            if *production {
                "production"
            } else {
                "standard (crash-consistent)"
            }
        ),
        Step::CheckpointFiles { name, .. } => format!("files of checkpoint {name}"),
        Step::QueryChanges {
            disk_path,
            limit_id,
            ..
        } => format!(
            "changes of {disk_path} since {}",
            limit_id.as_deref().unwrap_or("nothing (full)")
        ),
        Step::ConvertToReference { name, .. } => {
            format!("convert checkpoint {name} to a reference point")
        }
        Step::RemoveOtherReferencePoints { keep, .. } => {
            format!("remove reference points other than {keep}")
        }
        Step::RemoveCheckpoint { name, .. } => format!("remove checkpoint {name}"),
    }
}

#[async_trait]
impl VmSource for HypervSource {
    async fn capture(&self, cx: &VmContext) -> Result<Captured> {
        // Checkpoints left by a run that was killed are removed first.
        let stray = self
            .step(cx, Step::ListOwnCheckpoints { vm: cx.vm.clone() })
            .await?;
        let stray: Vec<String> = match stray {
            serde_json::Value::Null => vec![],
            serde_json::Value::String(s) => vec![s],
            v => serde_json::from_value(v).unwrap_or_default(),
        };
        for s in stray {
            self.remove_checkpoint(cx, &s).await?;
        }
        let name = checkpoint_name(cx);
        let consistency = match self
            .step(
                cx,
                Step::Checkpoint {
                    vm: cx.vm.clone(),
                    name: name.clone(),
                    production: true,
                },
            )
            .await
        {
            Ok(_) => "application",
            Err(e) if self.config.allow_crash_consistent => {
                cx.log.push(format!(
                    "hyperv: production checkpoint failed ({e}); falling back to crash-consistent"
                ));
                // A failed Checkpoint-VM may still have left a checkpoint of that name.
                let _ = self.remove_checkpoint(cx, &name).await;
                self.step(
                    cx,
                    Step::Checkpoint {
                        vm: cx.vm.clone(),
                        name: name.clone(),
                        production: false,
                    },
                )
                .await
                .map_err(|e2| {
                    Error::Source(format!(
                        "VM '{}': production checkpoint failed ({e}) and crash-consistent too ({e2})",
                        cx.vm
                    ))
                })?;
                "crash"
            }
            Err(e) => {
                let _ = self.remove_checkpoint(cx, &name).await;
                return Err(e);
            }
        };
        match self.capture_inner(cx, &name).await {
            Ok(mut cap) => {
                cap.consistency = Some(consistency.into());
                Ok(cap)
            }
            Err(e) => {
                if let Err(r) = self.remove_checkpoint(cx, &name).await {
                    return Err(Error::Source(format!(
                        "{e}; and the checkpoint could not be removed: {r}"
                    )));
                }
                Err(e)
            }
        }
    }

    async fn release(&self, cx: &VmContext, outcome: Option<&BackupReport>) -> Result<()> {
        let name = checkpoint_name(cx);
        if outcome.is_none() {
            return self.remove_checkpoint(cx, &name).await;
        }
        let converted = self
            .step(
                cx,
                Step::ConvertToReference {
                    vm: cx.vm.clone(),
                    name: name.clone(),
                },
            )
            .await;
        let reference = match converted {
            Ok(v) => v
                .get("reference_point")
                .and_then(|r| r.as_str())
                .map(String::from)
                .unwrap_or_default(),
            Err(e) => {
                // The point is stored; without a reference point the next run is a full one.
                self.remove_checkpoint(cx, &name).await?;
                return Err(e);
            }
        };
        if reference.trim().is_empty() {
            // "Every reference point but none" is every reference point, the new one included:
            // nothing is removed without an id to keep.
            cx.log
                .push("hyperv: the conversion returned no reference point id");
            return Err(Error::Source(format!(
                "VM '{}': converting checkpoint {name} returned no reference point id; the VM's \
                 other reference points were left in place",
                cx.vm
            )));
        }
        self.step(
            cx,
            Step::RemoveOtherReferencePoints {
                vm: cx.vm.clone(),
                keep: reference,
            },
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A failure predicate (a plain function, so a test can list several).
    fn when(f: fn(&Step) -> bool) -> fn(&Step) -> bool {
        f
    }

    /// Records every step; fails the steps a test names; simulates the host's checkpoints.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<Step>>,
        fail: Vec<fn(&Step) -> bool>,
        checkpoints: Mutex<Vec<String>>,
        /// The conversion answers without a reference point id.
        no_reference_id: bool,
    }

    #[async_trait]
    impl PowerShell for Fake {
        async fn run(&self, step: &Step) -> std::result::Result<serde_json::Value, String> {
            self.calls.lock().unwrap().push(step.clone());
            if self.fail.iter().any(|f| f(step)) {
                return Err("simulated failure".into());
            }
            let mut cps = self.checkpoints.lock().unwrap();
            Ok(match step {
                Step::ListOwnCheckpoints { .. } => serde_json::json!(cps.clone()),
                Step::Checkpoint { name, .. } => {
                    cps.push(name.clone());
                    serde_json::Value::Null
                }
                Step::CheckpointFiles { .. } => serde_json::json!({
                    "disks": ["D:\\VMs\\web\\os.vhdx", "D:\\VMs\\web\\data disk.vhdx"],
                    "configs": ["D:\\VMs\\web\\Snapshots\\1.vmcx"]}),
                Step::QueryChanges { .. } => serde_json::Value::Null,
                Step::ConvertToReference { name, .. } => {
                    cps.retain(|c| c != name);
                    let id = if self.no_reference_id { "" } else { "ref-2" };
                    serde_json::json!({ "reference_point": id })
                }
                Step::RemoveOtherReferencePoints { .. } => serde_json::Value::Null,
                Step::RemoveCheckpoint { name, .. } => {
                    cps.retain(|c| c != name);
                    serde_json::Value::Null
                }
            })
        }
    }

    fn cx(dir: &std::path::Path, rct: &[(&str, &str)]) -> (HypervConfig, VmContext) {
        (
            HypervConfig {
                powershell: "powershell.exe".into(),
                work_dir: dir.to_path_buf(),
                allow_crash_consistent: true,
            },
            VmContext {
                job: "nightly".into(),
                run: 7,
                vm: "web".into(),
                parent_rct_ids: rct
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
                log: Default::default(),
                cancel: Default::default(),
            },
        )
    }

    fn report() -> BackupReport {
        BackupReport {
            point: "0011223344556677".parse().unwrap(),
            vm: "web".into(),
            created: String::new(),
            bytes_read: 0,
            bytes_new: 0,
            bytes_stored: 0,
            duration_ms: 0,
            storage: Default::default(),
            disks: vec![],
            configs: vec![],
        }
    }

    #[tokio::test]
    async fn success_path_orders_steps_and_leaves_one_reference_point() {
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        fake.checkpoints
            .lock()
            .unwrap()
            .push("blockvault-nightly-run3".into());
        let (config, cx) = cx(d.path(), &[("os", "rct:1")]);
        let src = HypervSource {
            config,
            ps: fake.clone(),
        };
        let cap = src.capture(&cx).await.unwrap();
        assert_eq!(cap.consistency.as_deref(), Some("application"));
        let names: Vec<&str> = cap.disks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["os", "data_disk"]);
        assert_eq!(cap.changes.len(), 2);
        assert_eq!(cap.configs.len(), 1);
        src.release(&cx, Some(&report())).await.unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        // The stray checkpoint of a killed run goes first.
        assert!(
            matches!(&calls[1], Step::RemoveCheckpoint { name, .. } if name == "blockvault-nightly-run3")
        );
        assert!(matches!(
            &calls[2],
            Step::Checkpoint {
                production: true,
                ..
            }
        ));
        let limits: Vec<Option<String>> = calls
            .iter()
            .filter_map(|s| match s {
                Step::QueryChanges { limit_id, .. } => Some(limit_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(limits, [Some("rct:1".to_string()), None]);
        assert!(
            matches!(calls.last().unwrap(), Step::RemoveOtherReferencePoints { keep, .. } if keep == "ref-2")
        );
        assert!(fake.checkpoints.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn production_failure_falls_back_to_crash_consistent_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            fail: vec![when(|s| {
                matches!(
                    s,
                    Step::Checkpoint {
                        production: true,
                        ..
                    }
                )
            })],
            ..Default::default()
        });
        let (config, cx) = cx(d.path(), &[]);
        let src = HypervSource {
            config,
            ps: fake.clone(),
        };
        let cap = src.capture(&cx).await.unwrap();
        assert_eq!(cap.consistency.as_deref(), Some("crash"));
        assert!(cx.log.text().contains("falling back to crash-consistent"));
        // Not allowed: the VM fails and nothing is left.
        let (mut config, cx2) = self::cx(d.path(), &[]);
        config.allow_crash_consistent = false;
        let fake2 = Arc::new(Fake {
            fail: vec![when(|s| {
                matches!(
                    s,
                    Step::Checkpoint {
                        production: true,
                        ..
                    }
                )
            })],
            ..Default::default()
        });
        let src = HypervSource {
            config,
            ps: fake2.clone(),
        };
        assert!(src.capture(&cx2).await.is_err());
        assert!(fake2.checkpoints.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn every_failure_after_the_checkpoint_removes_it() {
        let fails = [
            when(|s| matches!(s, Step::CheckpointFiles { .. })),
            when(|s| matches!(s, Step::QueryChanges { .. })),
        ];
        for f in fails {
            let d = tempfile::tempdir().unwrap();
            let fake = Arc::new(Fake {
                fail: vec![f],
                ..Default::default()
            });
            let (config, cx) = cx(d.path(), &[]);
            let src = HypervSource {
                config,
                ps: fake.clone(),
            };
            assert!(src.capture(&cx).await.is_err());
            assert!(
                fake.checkpoints.lock().unwrap().is_empty(),
                "{:?}",
                fake.calls.lock().unwrap()
            );
        }
        // A failed backup: release removes the checkpoint, converts nothing.
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let (config, cx) = cx(d.path(), &[]);
        let src = HypervSource {
            config,
            ps: fake.clone(),
        };
        src.capture(&cx).await.unwrap();
        src.release(&cx, None).await.unwrap();
        assert!(fake.checkpoints.lock().unwrap().is_empty());
        assert!(!fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s, Step::ConvertToReference { .. })));
        // Conversion fails: the checkpoint is still removed and the error reported.
        let fake = Arc::new(Fake {
            fail: vec![when(|s| matches!(s, Step::ConvertToReference { .. }))],
            ..Default::default()
        });
        let src = HypervSource {
            config: src.config.clone(),
            ps: fake.clone(),
        };
        src.capture(&cx).await.unwrap();
        assert!(src.release(&cx, Some(&report())).await.is_err());
        assert!(fake.checkpoints.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lost_baseline_falls_back_to_a_full_query() {
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            fail: vec![when(|s| {
                matches!(
                    s,
                    Step::QueryChanges {
                        limit_id: Some(_),
                        ..
                    }
                )
            })],
            ..Default::default()
        });
        let (config, cx) = cx(d.path(), &[("os", "rct:old")]);
        let src = HypervSource {
            config,
            ps: fake.clone(),
        };
        src.capture(&cx).await.unwrap();
        assert!(cx.log.text().contains("taking a full backup"));
    }

    /// A conversion that names no reference point removes none: an empty id to keep would
    /// keep nothing.
    #[tokio::test]
    async fn no_reference_point_id_removes_no_reference_point() {
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            no_reference_id: true,
            ..Default::default()
        });
        let (config, cx) = cx(d.path(), &[]);
        let src = HypervSource {
            config,
            ps: fake.clone(),
        };
        src.capture(&cx).await.unwrap();
        let e = src.release(&cx, Some(&report())).await.unwrap_err();
        assert!(
            e.to_string().contains("VM 'web'") && e.to_string().contains("no reference point"),
            "{e}"
        );
        assert!(!fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s, Step::RemoveOtherReferencePoints { .. })));
        // The script refuses an empty id too, and reads the new point's InstanceID.
        let s = script(&Step::RemoveOtherReferencePoints {
            vm: "web".into(),
            keep: String::new(),
        });
        assert!(s.contains("IsNullOrEmpty($keep)) { throw"), "{s}");
        let s = script(&Step::ConvertToReference {
            vm: "web".into(),
            name: "blockvault-x".into(),
        });
        assert!(s.contains("$r.ResultingReferencePoint.InstanceID"), "{s}");
    }

    #[test]
    fn scripts_quote_names() {
        let s = script(&Step::RemoveCheckpoint {
            vm: "it's".into(),
            name: "blockvault-x".into(),
        });
        assert!(s.contains("$_.Name -eq 'it''s' }"), "{s}");
        // Names are matched exactly, never as wildcards, and never inside a double-quoted
        // string, where `$(...)` would run; one VM or the step fails.
        let steps = [
            Step::ListOwnCheckpoints { vm: "web*".into() },
            Step::Checkpoint {
                vm: "web*".into(),
                name: "blockvault-x".into(),
                production: true,
            },
            Step::CheckpointFiles {
                vm: "web*".into(),
                name: "blockvault-x".into(),
            },
            Step::QueryChanges {
                vm: "web*".into(),
                name: "blockvault-x".into(),
                disk_path: "D:\\a.vhdx".into(),
                limit_id: None,
                out: "C:\\t.json".into(),
            },
            Step::ConvertToReference {
                vm: "web*".into(),
                name: "blockvault-x".into(),
            },
            Step::RemoveOtherReferencePoints {
                vm: "web*".into(),
                keep: "rp".into(),
            },
            Step::RemoveCheckpoint {
                vm: "web*".into(),
                name: "blockvault-x".into(),
            },
        ];
        for step in &steps {
            let s = script(step);
            assert_eq!(s.matches("'web*'").count(), 2, "{s}");
            assert!(s.contains("Where-Object { $_.Name -eq 'web*' }"), "{s}");
            assert!(s.contains("if ($vm.Count -ne 1) { throw"), "{s}");
            assert!(!s.contains("-VMName") && !s.contains("Get-VM -Name"), "{s}");
            assert!(!s.contains("ElementName"), "{s}");
        }
        let s = script(&Step::RemoveCheckpoint {
            vm: "$(Remove-Item C:\\x)".into(),
            name: "blockvault-x".into(),
        });
        assert!(!s.contains("\"$(Remove-Item"), "{s}");
        assert_eq!(disk_name("D:\\VMs\\a b.vhdx"), "a_b");
    }
}
