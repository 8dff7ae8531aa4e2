//! Incremental planning: decides, per disk, whether a backup may read only the ranges an RCT
//! changed-ranges file reports, or must read the whole disk — and if so, records exactly why.
//!
//! An incremental stores the parent's chunk map with the changed chunks replaced, so it is only
//! correct when the changes really are relative to that parent. Every doubt therefore becomes a
//! full backup with a reason (docs/changed-ranges.md), never an incremental on a guess.

use blockvault_chunker::{ChunkId, RangeSet};
use blockvault_engine::ReadPlan;
use blockvault_repo::{PointId, PointManifest, Repository};

use crate::rct::parse_changes;

/// What to do with one disk, and what to record with it.
#[derive(Clone, Debug)]
pub struct DiskPlan {
    pub plan: ReadPlan,
    /// The changed-ranges file's `new_rct_id`: the next run's `limit_id`. Kept on a fallback full
    /// too, because a full read is consistent with the new reference point.
    pub rct_id: Option<String>,
}

impl DiskPlan {
    fn full(reason: impl Into<String>, rct_id: Option<String>) -> Self {
        Self {
            plan: ReadPlan::Full {
                reason: Some(reason.into()),
            },
            rct_id,
        }
    }

    /// The reason a full backup is taken, if one was needed.
    pub fn full_reason(&self) -> Option<&str> {
        match &self.plan {
            ReadPlan::Full { reason } => reason.as_deref(),
            ReadPlan::Incremental { .. } => None,
        }
    }

    pub fn is_incremental(&self) -> bool {
        matches!(self.plan, ReadPlan::Incremental { .. })
    }
}

/// The newest point of `vm` that has a disk named `disk`.
pub fn find_parent<'a>(
    points: &'a [PointManifest],
    vm: &str,
    disk: &str,
) -> Option<&'a PointManifest> {
    points
        .iter()
        .filter(|p| p.vm == vm && p.disk(disk).is_some())
        .max_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)))
}

/// Plans one disk from the points already in the repository. `changes` is the content of the
/// changed-ranges file, if the user gave one; without it the disk is read in full (there is
/// nothing to say which ranges changed), and no reason is recorded because none was asked for.
pub fn plan_from_points(
    points: &[PointManifest],
    vm: &str,
    disk: &str,
    disk_size: u64,
    disk_id: Option<&str>,
    changes: Option<&[u8]>,
) -> DiskPlan {
    let Some(json) = changes else {
        return DiskPlan {
            plan: ReadPlan::Full { reason: None },
            rct_id: None,
        };
    };
    let doc = match parse_changes(json) {
        Ok(d) => d,
        // Without a valid document there is no trustworthy new_rct_id to record either.
        Err(e) => return DiskPlan::full(format!("changed-ranges file refused: {e}"), None),
    };
    // A document about another disk (its size or its id differ) says nothing about this one:
    // the disk is read in full, and its reference point is not recorded, or the next run
    // would take that disk's changes for this one's.
    if doc.disk.virtual_size != disk_size {
        // check_against reports this rule with the exact sizes.
        let e = doc.check_against(None, disk_size).unwrap_err();
        return DiskPlan::full(format!("changed-ranges file refused: {e}"), None);
    }
    if let (Some(theirs), Some(ours)) = (doc.disk.virtual_disk_id.as_deref(), disk_id) {
        if !same_guid(theirs, ours) {
            return DiskPlan::full(
                format!(
                    "changed-ranges file refused: rule disk-id: the document is about disk \
                     {theirs}, the disk being backed up is {ours}"
                ),
                None,
            );
        }
    }
    let rct_id = Some(doc.new_rct_id.clone());
    if doc.full {
        let why = if doc.limit_id.is_none() {
            "the changed-ranges file has limit_id null (no reference point): full backup requested"
        } else {
            "the changed-ranges file says full: true"
        };
        return DiskPlan::full(why, rct_id);
    }
    let Some(parent) = find_parent(points, vm, disk) else {
        return DiskPlan::full(
            format!("rule parent: no earlier restore point of VM '{vm}' has a disk '{disk}'"),
            rct_id,
        );
    };
    let pd = parent.disk(disk).expect("find_parent checked the disk");
    if pd.size != disk_size {
        return DiskPlan::full(
            format!(
                "rule disk-size: the parent restore point {} recorded disk '{disk}' with {} bytes, the disk now has {disk_size}",
                parent.id, pd.size
            ),
            rct_id,
        );
    }
    if let Err(e) = doc.check_against(pd.rct_id.as_deref(), disk_size) {
        return DiskPlan::full(
            format!(
                "changed-ranges file refused against parent {}: {e}",
                parent.id
            ),
            rct_id,
        );
    }
    let parent_pages: Vec<Option<ChunkId>> = pd.pages.iter().map(|p| p.map(|h| h.0)).collect();
    DiskPlan {
        plan: ReadPlan::Incremental {
            parent: parent.id,
            parent_pages,
            changed: RangeSet::from_ranges(doc.ranges.iter().cloned()),
        },
        rct_id,
    }
}

/// Two GUIDs written alike but for case and braces (`{5BFD...}` and `5bfd...`).
fn same_guid(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase()
    };
    norm(a) == norm(b)
}

/// [`plan_from_points`] over the repository's readable points.
pub async fn plan_disk(
    repo: &Repository,
    vm: &str,
    disk: &str,
    disk_size: u64,
    disk_id: Option<&str>,
    changes: Option<&[u8]>,
) -> Result<DiskPlan, blockvault_repo::Error> {
    let points = if changes.is_some() {
        // Unreadable manifests cannot be parents; list_points reports them separately.
        repo.list_points().await?.0
    } else {
        Vec::new()
    };
    Ok(plan_from_points(
        &points, vm, disk, disk_size, disk_id, changes,
    ))
}

/// The id of the parent an incremental plan starts from.
pub fn parent_of(plan: &DiskPlan) -> Option<PointId> {
    match &plan.plan {
        ReadPlan::Incremental { parent, .. } => Some(*parent),
        ReadPlan::Full { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_repo::{BackupKind, ChunkIdHex, DiskManifest, DiskStats, SourceInfo};

    const SIZE: u64 = 64 << 20;

    fn point(n: u8, vm: &str, created: &str, rct: Option<&str>, size: u64) -> PointManifest {
        let id: PointId = format!("{:02x}{}", n, "00".repeat(7)).parse().unwrap();
        PointManifest {
            version: 1,
            id,
            vm: vm.into(),
            host: String::new(),
            created: created.into(),
            tags: vec![],
            chunk_size: 1 << 20,
            slots_per_page: blockvault_repo::SLOTS_PER_PAGE,
            disks: vec![DiskManifest {
                name: "disk0".into(),
                size,
                source: SourceInfo {
                    format: "vhdx".into(),
                    path: "x".into(),
                    logical_sector_size: None,
                },
                pages: vec![Some(ChunkIdHex(ChunkId([n; 32])))],
                kind: BackupKind::Full,
                full_reason: None,
                parent: None,
                rct_id: rct.map(String::from),
                consistency: None,
                stats: DiskStats::default(),
            }],
            configs: vec![],
            duration_ms: 0,
        }
    }

    fn doc(limit: Option<&str>, full: bool, size: u64) -> Vec<u8> {
        serde_json::json!({"format": "hyperv-rct-changes", "version": 1, "vm_id": "v",
            "disk": {"path": "d.vhdx", "virtual_size": size, "logical_sector_size": 512},
            "limit_id": limit, "new_rct_id": "rct:2", "full": full,
            "queries": [{"byte_offset": 0, "byte_length": size, "processed_byte_length": size,
                         "changed_byte_offsets": [4096], "changed_byte_lengths": [100]}]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn chain_intact_gives_an_incremental_on_the_newest_parent() {
        let pts = vec![
            point(1, "vm", "2026-01-01T00:00:00Z", Some("rct:0"), SIZE),
            point(2, "vm", "2026-01-02T00:00:00Z", Some("rct:1"), SIZE),
            point(3, "other", "2026-01-03T00:00:00Z", Some("rct:1"), SIZE),
        ];
        let p = plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), false, SIZE)),
        );
        assert_eq!(p.rct_id.as_deref(), Some("rct:2"));
        match p.plan {
            ReadPlan::Incremental {
                parent,
                parent_pages,
                changed,
            } => {
                assert_eq!(parent, pts[1].id);
                assert_eq!(parent_pages, vec![Some(ChunkId([2; 32]))]);
                assert_eq!(changed.ranges(), std::slice::from_ref(&(4096..4196)));
            }
            other => panic!("expected an incremental, got {other:?}"),
        }
    }

    #[test]
    fn every_doubt_falls_back_to_full_with_its_reason() {
        let pts = vec![point(1, "vm", "2026-01-01T00:00:00Z", Some("rct:1"), SIZE)];
        let reason = |p: DiskPlan| {
            p.full_reason()
                .map(String::from)
                .expect("a full with a reason")
        };
        let d = doc(Some("rct:9"), false, SIZE);
        let r = reason(plan_from_points(&pts, "vm", "disk0", SIZE, None, Some(&d)));
        assert!(
            r.contains("rule chain") && r.contains("rct:9") && r.contains("rct:1"),
            "{r}"
        );
        let r = reason(plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), true, SIZE)),
        ));
        assert!(r.contains("full: true"), "{r}");
        let r = reason(plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(None, false, SIZE)),
        ));
        assert!(r.contains("limit_id null"), "{r}");
        let r = reason(plan_from_points(
            &[],
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), false, SIZE)),
        ));
        assert!(r.contains("rule parent"), "{r}");
        let r = reason(plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE * 2,
            None,
            Some(&doc(Some("rct:1"), false, SIZE * 2)),
        ));
        assert!(r.contains("rule disk-size") && r.contains("parent"), "{r}");
        let r = reason(plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), false, SIZE * 2)),
        ));
        assert!(r.contains("rule disk-size"), "{r}");
        let p = plan_from_points(&pts, "vm", "disk0", SIZE, None, Some(b"{not json"));
        assert!(p.rct_id.is_none());
        assert!(reason(p).contains("rule malformed-json"));
        let pts = vec![point(1, "vm", "2026-01-01T00:00:00Z", None, SIZE)];
        let r = reason(plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), false, SIZE)),
        ));
        assert!(r.contains("rule chain"), "{r}");
    }

    /// A document about another disk (another id, another size) is refused, and its reference
    /// point is not recorded, so the next run cannot take that disk's changes for this one's.
    #[test]
    fn a_document_for_another_disk_is_refused_and_its_chain_not_recorded() {
        let pts = vec![point(1, "vm", "2026-01-01T00:00:00Z", Some("rct:1"), SIZE)];
        let mut d: serde_json::Value =
            serde_json::from_slice(&doc(Some("rct:1"), false, SIZE)).unwrap();
        d["disk"]["virtual_disk_id"] = "{5BFDE23B-CE75-4303-B54F-6C18394F105C}".into();
        let d = serde_json::to_vec(&d).unwrap();
        let ours = "{5bfde23b-ce75-4303-b54f-6c18394f105c}";
        let p = plan_from_points(&pts, "vm", "disk0", SIZE, Some(ours), Some(&d));
        assert!(
            matches!(p.plan, ReadPlan::Incremental { .. }),
            "same id, other case"
        );
        let other = "{00000000-ce75-4303-b54f-6c18394f105c}";
        let p = plan_from_points(&pts, "vm", "disk0", SIZE, Some(other), Some(&d));
        assert!(
            p.full_reason().unwrap().contains("rule disk-id"),
            "{:?}",
            p.full_reason()
        );
        assert!(p.rct_id.is_none());
        let p = plan_from_points(
            &pts,
            "vm",
            "disk0",
            SIZE,
            None,
            Some(&doc(Some("rct:1"), false, SIZE * 2)),
        );
        assert!(p.full_reason().unwrap().contains("rule disk-size"));
        assert!(p.rct_id.is_none());
    }

    #[test]
    fn no_changes_file_is_a_plain_full() {
        let p = plan_from_points(&[], "vm", "disk0", SIZE, None, None);
        assert!(p.full_reason().is_none() && !p.is_incremental() && p.rct_id.is_none());
    }
}
