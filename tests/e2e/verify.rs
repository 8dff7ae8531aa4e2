//! Verification: sampled and recorded runs, damage of every kind found and attributed to the
//! right points and disk byte ranges, on a local directory and on an S3 server (s3s-fs, whose
//! objects are files the tests can damage in place).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;
use crate::s3_support::{DiskS3Server, S3World};

/// Chunk size of these tests' repositories; images are random, so every chunk is stored
/// uncompressed: blob `i` of a pack starts at `24 + i * BLOB` (header 24 bytes, blob overhead 32).
const CHUNK: u64 = 64 * 1024;
const BLOB: u64 = CHUNK + 32;

/// A repository on a local directory or on s3s-fs, with its objects reachable as files.
enum Place {
    Local(World),
    S3 {
        world: S3World,
        server: DiskS3Server,
        _data: tempfile::TempDir,
    },
}

impl Place {
    fn local() -> Self {
        Place::Local(World::with_repo("64KiB"))
    }

    fn s3(prefix: &str) -> Self {
        let data = tempfile::tempdir().unwrap();
        let server = DiskS3Server::start(data.path());
        let world = S3World::new(&server.endpoint(), prefix);
        world.init();
        Place::S3 {
            world,
            server,
            _data: data,
        }
    }

    /// Runs `f` on a local repository, then on one on s3s-fs.
    fn both(name: &str, f: impl Fn(&Place)) {
        f(&Self::local());
        f(&Self::s3(name));
    }

    fn run_in(&self, cache: &str, args: &[&str]) -> Output {
        match self {
            Place::Local(w) => std::process::Command::new(BIN)
                .args(args)
                .arg("--repo")
                .arg(&w.repo)
                .arg("--cache-dir")
                .arg(if cache == "cache" {
                    w.cache.clone()
                } else {
                    w.path(cache)
                })
                .arg("--password-file")
                .arg(&w.password_file)
                .env_remove("BLOCKVAULT_PASSWORD")
                .env_remove("BLOCKVAULT_REPO")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap(),
            Place::S3 { world, .. } => world.cmd_in(cache, args).output().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_in("cache", args)
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        json_of(args, |a| self.ok(a))
    }

    /// Runs verify with `--json`; returns the exit code and the report.
    fn verify(&self, args: &[&str]) -> (i32, serde_json::Value) {
        self.verify_in("cache", args)
    }

    fn verify_in(&self, cache: &str, args: &[&str]) -> (i32, serde_json::Value) {
        let mut a = vec!["verify", "--json"];
        a.extend_from_slice(args);
        let out = self.run_in(cache, &a);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "verify {args:?}: bad JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            )
        });
        (code(&out), v)
    }

    fn path(&self, name: &str) -> PathBuf {
        match self {
            Place::Local(w) => w.path(name),
            Place::S3 { world, .. } => world.path(name),
        }
    }

    /// Where the repository's objects are, as files.
    fn root(&self) -> PathBuf {
        match self {
            Place::Local(w) => w.repo.clone(),
            Place::S3 { world, server, .. } => server
                .bucket_dir()
                .join(world.location.rsplit('/').next().unwrap()),
        }
    }

    /// Pack files in name order.
    fn packs(&self) -> Vec<PathBuf> {
        let mut v = files(&self.root().join("packs"));
        v.retain(|p| !p.to_string_lossy().contains('#'));
        v.sort();
        v
    }

    fn backup(&self, vm: &str, disk: &str, img: &Path) -> String {
        self.backup_in("cache", vm, disk, img)["point"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Backs up `img` as disk `disk` of `vm` from the host whose cache is `cache`; returns the
    /// backup's JSON report.
    fn backup_in(&self, cache: &str, vm: &str, disk: &str, img: &Path) -> serde_json::Value {
        let spec = format!("{disk}={}", img.display());
        let args = [
            "backup",
            "--vm",
            vm,
            "--pack-size",
            "1MiB",
            // One worker: blobs enter the pack in disk order, so blob i is chunk i.
            "--workers",
            "1",
            "--disk",
            &spec,
            "--json",
        ];
        let o = self.run_in(cache, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn export(&self, point: &str, disk: &str, out: &Path, extra: &[&str]) -> Output {
        self.export_in("cache", point, disk, out, extra)
    }

    fn export_in(
        &self,
        cache: &str,
        point: &str,
        disk: &str,
        out: &Path,
        extra: &[&str],
    ) -> Output {
        let mut a = vec![
            "restore",
            "export",
            "--overwrite",
            point,
            "--disk",
            disk,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        self.run_in(cache, &a)
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                v.extend(files(&e.path()));
            } else {
                v.push(e.path());
            }
        }
    }
    v
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

/// The pack holding the first chunks of the first backup: the one whose first blob decodes as
/// chunk 0 is not knowable without the key, so the tests use a single-pack backup for blob damage.
fn only_pack(p: &Place) -> PathBuf {
    let packs = p.packs();
    assert_eq!(packs.len(), 1, "expected one pack: {packs:?}");
    packs[0].clone()
}

/// The damaged ranges the report gives for `point`'s disk `disk` (all problems together).
fn ranges_of(report: &serde_json::Value, point: &str, disk: &str) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for p in report["problems"].as_array().unwrap() {
        for d in p["damage"].as_array().unwrap() {
            if d["point"] == point && d["disk"] == disk {
                for r in d["ranges"].as_array().unwrap() {
                    v.push((r[0].as_u64().unwrap(), r[1].as_u64().unwrap()));
                }
            }
        }
    }
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn state_of<'a>(report: &'a serde_json::Value, point: &str) -> &'a serde_json::Value {
    report["point_states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["point"] == point)
        .unwrap_or_else(|| panic!("no state for {point}: {report}"))
}

/// Size of the one-pack test disk: 15 random chunks, which with their page fill one 1 MiB pack.
const DISK: u64 = 15 * CHUNK;

/// A random disk of 15 chunks (one pack, its page the last blob) backed up once.
fn one_pack_point(p: &Place, seed: u64) -> (PathBuf, String) {
    let img = p.path("d.raw");
    make_random_image(&img, DISK, seed);
    let point = p.backup("vm1", "d", &img);
    (img, point)
}

#[test]
fn verify_damage_kinds_are_found_and_attributed() {
    Place::both("kinds", |p| damage_kinds(p, 1));
}

fn damage_kinds(p: &Place, seed: u64) {
    // Clean first, and the point is verified afterwards.
    let (_img, point) = one_pack_point(p, 100 + seed);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["verdict"], "clean");
    assert_eq!(state_of(&v, &point)["state"], "verified");
    let pack = only_pack(p);
    let pristine = std::fs::read(&pack).unwrap();

    // 1. A flipped byte in blob 3: chunk 3 of the disk, nothing else.
    flip(&pack, 24 + 3 * BLOB + 100);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(
        ranges_of(&v, &point, "d"),
        vec![(3 * CHUNK, 4 * CHUNK)],
        "{v}"
    );
    assert_eq!(state_of(&v, &point)["state"], "damaged");
    std::fs::write(&pack, &pristine).unwrap();

    // 2. A blob moved to another position: blobs 5 and 6 swapped; both chunks are lost.
    let mut b = pristine.clone();
    let (x, y) = ((24 + 5 * BLOB) as usize, (24 + 6 * BLOB) as usize);
    let blob5 = b[x..y].to_vec();
    let blob6 = b[y..y + BLOB as usize].to_vec();
    b[x..y].copy_from_slice(&blob6);
    b[y..y + BLOB as usize].copy_from_slice(&blob5);
    std::fs::write(&pack, &b).unwrap();
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(
        ranges_of(&v, &point, "d"),
        vec![(5 * CHUNK, 7 * CHUNK)],
        "{v}"
    );
    std::fs::write(&pack, &pristine).unwrap();

    // 3. A flipped byte in the table of contents: reported, but no data is lost.
    let n = pristine.len() as u64;
    flip(&pack, n - 13);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert!(
        problems[0]["detail"]
            .as_str()
            .unwrap()
            .contains("table of contents"),
        "{v}"
    );
    assert!(problems[0]["affected_points"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(ranges_of(&v, &point, "d").is_empty());
    std::fs::write(&pack, &pristine).unwrap();

    // 4. A flipped byte in the chunk-map page (the pack's last blob, right before the table):
    //    the whole disk's map is lost.
    let toc_len = u32::from_le_bytes(
        pristine[pristine.len() - 12..pristine.len() - 8]
            .try_into()
            .unwrap(),
    ) as u64;
    flip(&pack, n - 12 - toc_len - 40);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(ranges_of(&v, &point, "d"), vec![(0, DISK)], "{v}");
    std::fs::write(&pack, &pristine).unwrap();

    // 5. A truncated pack: the blobs past the cut are lost, the ones before it are not.
    let cut = 24 + 10 * BLOB + 7;
    std::fs::write(&pack, &pristine[..cut as usize]).unwrap();
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    // Chunks 10..15 and the page (which names every chunk: the whole disk).
    assert_eq!(ranges_of(&v, &point, "d"), vec![(0, DISK)], "{v}");
    let chunk_problems: Vec<_> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["object"].as_str().unwrap().starts_with("pack"))
        .collect();
    assert!(!chunk_problems.is_empty(), "{v}");
    std::fs::write(&pack, &pristine).unwrap();

    // 6. A missing pack: even a metadata-only run finds it.
    std::fs::remove_file(&pack).unwrap();
    let (c, v) = p.verify(&[]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(ranges_of(&v, &point, "d"), vec![(0, DISK)], "{v}");
    std::fs::write(&pack, &pristine).unwrap();

    // 7. A flipped byte in the manifest: the point is damaged as a whole. Its modification time
    // is put back, as when a disk damages a file in place: a local directory's entity tag (inode,
    // time, size) is then unchanged, and only reading the store finds it.
    let manifest = p.root().join("points").join(&point);
    let m = std::fs::read(&manifest).unwrap();
    let mtime = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    flip(&manifest, m.len() as u64 / 2);
    std::fs::File::options()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (c, v) = p.verify(&[]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(
        v["problems"][0]["object"],
        format!("restore point {point} manifest")
    );
    assert_eq!(state_of(&v, &point)["state"], "damaged");
    std::fs::write(&manifest, &m).unwrap();

    // Repaired: clean again.
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
}

#[test]
fn verify_records_are_seen_by_every_host_and_list_point_states() {
    let p = Place::local();
    let (_img, point) = one_pack_point(&p, 7);
    let list = p.json(&["points", "list"]);
    assert_eq!(list[0]["verify"]["state"], "never");
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    let record = v["record"].as_str().unwrap().to_string();
    assert!(p.root().join("verify").join(&record).is_file());
    // Another host (its own cache) sees the state.
    let out = p.run_in("cache2", &["points", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["verify"]["state"], "verified", "{list}");
    let text = p.ok(&["points", "show", &point]);
    assert!(text.contains("verify    verified"), "{text}");

    // Damage found on one host is what the other hosts' lists show, with the ranges.
    let pack = only_pack(&p);
    flip(&pack, 24 + 2 * BLOB + 9);
    let (c, _) = p.verify(&["--read-data"]);
    assert_eq!(c, 7);
    let out = p.run_in("cache2", &["points", "show", &point, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(show["verify"]["state"], "damaged", "{show}");
    assert_eq!(show["verify"]["damage"][0]["disk"], "d");
    assert_eq!(
        show["verify"]["damage"][0]["ranges"][0],
        serde_json::json!([2 * CHUNK, 3 * CHUNK])
    );
    let text = String::from_utf8(p.run_in("cache2", &["points", "list"]).stdout).unwrap();
    assert!(
        text.contains("damaged: d (65536 bytes in 1 ranges)"),
        "{text}"
    );
}

#[test]
fn verify_subset_rotation_reads_everything_within_its_runs() {
    let p = Place::local();
    // 6 MiB of random data in 1 MiB packs: 6 or 7 packs.
    let img = p.path("big.raw");
    make_random_image(&img, 6 << 20, 3);
    let point = p.backup("vm1", "d", &img);
    let packs = p.packs().len();
    assert!(packs >= 6, "{packs}");
    let total: u64 = p
        .packs()
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    // 25 %: every pack within 4 runs, about a quarter each run, whatever point-scoped runs
    // happen between them (they read single blobs and move no pack's deadline).
    for run in 1..=4 {
        if run > 1 {
            let (c, v) = p.verify(&["--point", &point]);
            assert_eq!(c, 0, "{v}");
            assert_eq!(v["run"], serde_json::Value::Null, "{v}");
        }
        let (c, v) = p.verify(&["--read-data-subset", "25%"]);
        assert_eq!(c, 0, "{v}");
        assert_eq!(v["run"], run);
        let bytes = v["bytes_read"].as_u64().unwrap();
        assert!(
            bytes >= total / 4 && bytes <= total / 4 + (2 << 20),
            "run {run}: {bytes} of {total}"
        );
        let state = &state_of(&v, &point)["state"];
        if run == 1 {
            assert_eq!(state, "partly", "{v}");
        } else if run == 4 {
            assert_eq!(state, "verified", "{v}");
        }
    }
    // A fixed slice covers its share and nothing else, whatever was read before.
    let mut slice_total = 0;
    for n in 1..=3 {
        let s = format!("{n}/3");
        let (c, v) = p.verify(&["--read-data-subset", &s]);
        assert_eq!(c, 0);
        slice_total += v["packs_read"].as_u64().unwrap();
    }
    assert_eq!(slice_total as usize, packs);
    // Everything was verified just now: a 30-day re-verify reads nothing; 0s reads all, capped.
    let (_, v) = p.verify(&["--reverify-after", "30d"]);
    assert_eq!(v["packs_read"], 0);
    let (_, v) = p.verify(&["--reverify-after", "0s", "--max-bytes", "2MiB"]);
    assert!(v["bytes_read"].as_u64().unwrap() <= 2 << 20, "{v}");
    assert!(v["packs_read"].as_u64().unwrap() >= 1);
    // Bad values are usage errors.
    let out = p.run(&["verify", "--read-data-subset", "0%"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
}

#[test]
fn verify_point_scope_reads_only_that_points_blobs() {
    let p = Place::local();
    let a = p.path("a.raw");
    let b = p.path("b.raw");
    make_random_image(&a, 2 << 20, 11);
    make_random_image(&b, 2 << 20, 12);
    let pa = p.backup("vma", "d", &a);
    let pb = p.backup("vmb", "d", &b);
    let (c, v) = p.verify(&["--point", &pa[..6]]);
    assert_eq!(c, 0, "{v}");
    let read = v["bytes_read"].as_u64().unwrap();
    // Its 32 chunks and its page, no more.
    assert!((32 * BLOB..33 * BLOB + 4096).contains(&read), "{read}");
    assert_eq!(state_of(&v, &pa)["state"], "verified");
    assert_eq!(state_of(&v, &pb)["state"], "never");
    let (c, v) = p.verify(&["--vm", "vmb"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(state_of(&v, &pb)["state"], "verified");
}

#[test]
fn verify_writes_nothing_but_its_record() {
    let p = Place::local();
    let (_img, _point) = one_pack_point(&p, 21);
    let before: Vec<PathBuf> = files(&p.root());
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0);
    let mut after: Vec<PathBuf> = files(&p.root());
    let record = p.root().join("verify").join(v["record"].as_str().unwrap());
    after.retain(|f| *f != record);
    let mut b = before.clone();
    b.sort();
    after.sort();
    assert_eq!(b, after);
}

#[test]
fn verify_damaged_chunk_heals_with_the_next_backup_that_holds_it() {
    Place::both("heal", heal);
}

fn heal(p: &Place) {
    // One content, three points of two VMs: vm1 twice, vm2 once (a copy of the same disk).
    let (img, p1) = one_pack_point(p, 31);
    let copy = p.path("copy.raw");
    std::fs::copy(&img, &copy).unwrap();
    let p2 = p.backup("vm1", "d", &img);
    let p3 = p.backup("vm2", "sys", &copy);
    assert_eq!(
        p.packs().len(),
        1,
        "the later points deduplicate everything"
    );
    // Another host has seen the repository (its index has the chunk's only copy).
    p.run_in("host2", &["points", "list"]);

    let pack = only_pack(p);
    flip(&pack, 24 + 4 * BLOB + 77);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    for (pt, disk) in [(&p1, "d"), (&p2, "d"), (&p3, "sys")] {
        assert_eq!(ranges_of(&v, pt, disk), vec![(4 * CHUNK, 5 * CHUNK)], "{v}");
    }
    // A damaged point does not export by default, and names the lost range.
    let out = p.path("out.raw");
    let o = p.export(&p1, "d", &out, &[]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{}-{}", 4 * CHUNK, 5 * CHUNK)),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "a partial export must not be left behind");
    // A stream cannot be taken back: it stops at the lost chunk, so a reader of the pipe sees a
    // short image instead of one with zeros where the data was.
    let o = p.run(&["restore", "export", &p1, "--disk", "d", "--out", "-"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert_eq!(o.stdout.len() as u64, 4 * CHUNK, "{}", stderr(&o));
    // With --allow-damaged: zeros exactly there, everything else exact.
    let o = p.export(&p1, "d", &out, &["--allow-damaged"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("zeros written"), "{}", stderr(&o));
    let (orig, got) = (std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
    let (a, b) = ((4 * CHUNK) as usize, (5 * CHUNK) as usize);
    assert_eq!(orig[..a], got[..a]);
    assert_eq!(orig[b..], got[b..]);
    assert!(got[a..b].iter().all(|x| *x == 0));

    // The other host backs up a disk that still holds the content: only that chunk is stored
    // again (dedup treats the damaged copy as absent, learnt from the verify record).
    let b = p.backup_in("host2", "vm1", "d", &img);
    assert_eq!(b["bytes_new"], CHUNK, "{b}");
    assert_eq!(b["disks"][0]["stats"]["new_chunks"], 1, "{b}");

    // Every point is whole again, verifies clean, and restores exactly (from both hosts).
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    for pt in [&p1, &p2, &p3] {
        assert_eq!(state_of(&v, pt)["state"], "verified", "{v}");
    }
    for (pt, disk) in [(&p1, "d"), (&p2, "d"), (&p3, "sys")] {
        let o = p.export(pt, disk, &out, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(same_content(&img, &out));
    }
    let o = p.export_in("host3", &p3, "sys", &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_content(&img, &out));
}

/// A pack removed by hand (not by a prune): verify names it, and from its record every host
/// stops deduplicating against it, so another host's next backup of the same content stores
/// the data again and the old point is whole.
#[test]
fn a_lost_pack_is_recorded_and_the_next_backup_from_another_host_stores_its_data_again() {
    Place::both("lost", lost_pack);
}

fn lost_pack(p: &Place) {
    let (img, p1) = one_pack_point(p, 51);
    // Another host has seen the repository (its index has the pack).
    p.run_in("host2", &["points", "list"]);
    let pack = only_pack(p);
    let pack_id = pack.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(&pack).unwrap();

    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    let named = v["problems"].as_array().unwrap().iter().any(|q| {
        q["object"] == format!("pack {pack_id}")
            && q["detail"]
                .as_str()
                .unwrap()
                .contains("no prune deleted it")
    });
    assert!(named, "the lost pack is named: {v}");
    assert_eq!(ranges_of(&v, &p1, "d"), vec![(0, DISK)], "{v}");

    let b = p.backup_in("host2", "vm1", "d", &img);
    assert_eq!(
        b["bytes_new"], DISK,
        "nothing deduplicated against the lost pack: {b}"
    );

    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(state_of(&v, &p1)["state"], "verified", "{v}");
    let out = p.path("out.raw");
    let o = p.export(&p1, "d", &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_content(&img, &out));
}

/// A chunk stored twice (two hosts that had not seen each other's packs): when verification
/// finds the indexed copy damaged, every host reads the other copy from then on, so no point
/// loses data and no backup is needed to heal it.
#[test]
fn a_damaged_chunk_with_a_good_copy_in_another_pack_is_read_from_that_copy() {
    let p = Place::local();
    let (img, p1) = one_pack_point(&p, 61);
    let first = only_pack(&p);
    // Host 2 sees none of the repository's packs while it backs up the same content, as when
    // two hosts store it at once: it stores a second copy of every chunk.
    let (root, hidden) = (p.root(), p.path("hidden"));
    std::fs::create_dir(&hidden).unwrap();
    for d in ["packs", "index"] {
        std::fs::rename(root.join(d), hidden.join(d)).unwrap();
    }
    let b = p.backup_in("host2", "vm2", "d", &img);
    assert_eq!(b["bytes_new"], DISK, "{b}");
    let p2 = b["point"].as_str().unwrap().to_string();
    for f in files(&hidden) {
        let to = root.join(f.strip_prefix(&hidden).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(&f, &to).unwrap();
    }
    let packs = p.packs();
    assert_eq!(packs.len(), 2, "{packs:?}");
    let second = packs.into_iter().find(|q| *q != first).unwrap();

    // The copy indexed (the newest) is damaged; the first pack still holds a good one.
    p.ok(&["points", "list"]);
    flip(&second, 24 + 4 * BLOB + 77);
    let o = p.run(&["verify", "--json", "--read-data"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(code(&o), 7, "the damaged blob is reported: {v}");
    let second_id = second.file_name().unwrap().to_string_lossy().into_owned();
    let named = v["problems"].as_array().unwrap().iter().any(|q| {
        q["object"] == format!("pack {second_id}")
            && q["affected_points"].as_array().unwrap().is_empty()
    });
    assert!(named, "{v}");
    // No point is damaged: each is judged by the copy read from now on, and the switch to it
    // is logged.
    for pt in [&p1, &p2] {
        assert!(ranges_of(&v, pt, "d").is_empty(), "{v}");
    }
    let first_id = first.file_name().unwrap().to_string_lossy().into_owned();
    let log = stderr(&o);
    assert!(
        log.contains(&format!("its copy in pack {first_id} is read from now on")),
        "{log}"
    );

    // Both points restore exactly, here and on a host that never saw either backup.
    let out = p.path("out.raw");
    for (cache, pt) in [("cache", &p1), ("cache", &p2), ("host3", &p1)] {
        let o = p.export_in(cache, pt, "d", &out, &[]);
        assert!(o.status.success(), "{cache} {pt}: {}", stderr(&o));
        assert!(same_content(&img, &out), "{cache} {pt}");
    }
    // The next run finds both points whole (no point reads the damaged copy), and nothing was
    // stored again.
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    for pt in [&p1, &p2] {
        assert_eq!(state_of(&v, pt)["state"], "verified", "{v}");
    }
    assert_eq!(p.packs().len(), 2);
}

/// Blobs no restore point reads any more (their point forgotten, gc not yet run) are still
/// read by `--read-data`: damage there is news about the store, reported once on its pack with
/// no point affected; later runs that find it again are clean.
#[test]
fn damage_in_blobs_no_point_reads_is_reported_once() {
    let p = Place::local();
    let (_, gone) = one_pack_point(&p, 71);
    let garbage = only_pack(&p);
    let kept_img = p.path("kept.raw");
    make_random_image(&kept_img, DISK, 72);
    let kept = p.backup("vm2", "d", &kept_img);
    p.ok(&["forget", &gone]);
    flip(&garbage, 24 + 3 * BLOB + 40);

    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    let id = garbage.file_name().unwrap().to_string_lossy().into_owned();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["object"], format!("pack {id}"), "{v}");
    assert!(
        problems[0]["affected_points"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    assert_eq!(state_of(&v, &kept)["state"], "verified", "{v}");

    // Later runs read the damaged pack again (both packs, every run), and stay clean.
    for run in 2..4 {
        let (c, v) = p.verify(&["--read-data"]);
        assert_eq!(c, 0, "run {run}: {v}");
        assert_eq!(v["packs_read"], 2, "run {run}: {v}");
        assert!(
            v["problems"].as_array().unwrap().is_empty(),
            "run {run}: {v}"
        );
    }
}

fn verify_records(p: &Place) -> usize {
    files(&p.root().join("verify")).len()
}

#[test]
fn verify_records_are_merged_and_nothing_they_said_is_forgotten() {
    let p = Place::local();
    // Point a: one pack, blob 2 damaged. Point b: about 6 packs of its own.
    let (img_a, a) = one_pack_point(&p, 41);
    flip(&only_pack(&p), 24 + 2 * BLOB + 9);
    let img_b = p.path("b.raw");
    make_random_image(&img_b, 6 << 20, 42);
    let b = p.backup("vm2", "d", &img_b);

    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(v["run"], 1);
    // Then only b's blobs are read (a's pack never again, so only the records know its damage),
    // newer than the whole reads: b is verified by them alone. Records up to 16: none merged.
    for n in 2..=16 {
        let (c, v) = p.verify(&["--point", &b]);
        assert_eq!(c, 7, "a's damage is still reported: {v}");
        assert_eq!(v["records_merged"], 0, "{v}");
        assert_eq!(verify_records(&p), n);
    }
    // The 17th run merges the 16 before it into one summary.
    let (c, v) = p.verify(&[]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(v["records_merged"], 16, "{v}");
    assert_eq!(
        verify_records(&p),
        2,
        "the summary and the 17th run's record"
    );
    // Read with the summary, the history is what it was: a damaged, b verified, next run 2.
    let (c, v) = p.verify_in("host3", &[]);
    assert_eq!(c, 7, "{v}");
    assert_eq!(ranges_of(&v, &a, "d"), vec![(2 * CHUNK, 3 * CHUNK)], "{v}");
    assert_eq!(state_of(&v, &b)["state"], "verified", "{v}");
    // A host that never saw the merged records learns the damage from the summary: its list
    // shows it, and its backup of a disk holding the content stores the chunk again.
    let out = p.run_in("host2", &["points", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = |pt: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == pt)
            .unwrap_or_else(|| panic!("{pt} not in {list}"))["verify"]
            .clone()
    };
    assert_eq!(state(&a)["state"], "damaged", "{list}");
    assert_eq!(
        state(&a)["damage"][0]["ranges"][0],
        serde_json::json!([2 * CHUNK, 3 * CHUNK])
    );
    let spec = format!("d={}", img_a.display());
    let o = p.run_in(
        "host2",
        &["backup", "--vm", "vm1", "--disk", &spec, "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bk: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(bk["disks"][0]["stats"]["new_chunks"], 1, "{bk}");
    // Run numbers go on from the summary's.
    let (_, v) = p.verify(&["--read-data-subset", "1/7"]);
    assert_eq!(v["run"], 2, "{v}");
    let (c, v) = p.verify_in("host2", &["--read-data"]);
    assert_eq!(c, 0, "healed: {v}");
    assert_eq!(state_of(&v, &a)["state"], "verified", "{v}");
}

/// Starts `verify --read-data --json` on `w`'s repository, held after its listing, before it
/// reads, while `hold` exists; returns once it is there.
fn verify_held_while_reading(w: &World, hold: &Path) -> std::process::Child {
    verify_held_at(w, hold, "verify-reading")
}

/// Starts `verify --read-data --json` on `w`'s repository, held at hold point `at` while `hold`
/// exists; returns once it is there.
fn verify_held_at(w: &World, hold: &Path, at: &str) -> std::process::Child {
    std::fs::write(hold, b"").unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["verify", "--read-data", "--json", "--repo"])
        .arg(&w.repo)
        .arg("--cache-dir")
        .arg(&w.cache)
        .arg("--password-file")
        .arg(&w.password_file)
        .env_remove("BLOCKVAULT_PASSWORD")
        .env_remove("BLOCKVAULT_REPO")
        .env("BLOCKVAULT_TEST_HOLD", format!("{at}:{}", hold.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut reached = hold.as_os_str().to_owned();
    reached.push(".reached");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !Path::new(&reached).exists() {
        assert!(child.try_wait().unwrap().is_none(), "verify ended early");
        assert!(std::time::Instant::now() < deadline, "hold not reached");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// Verify killed at any moment leaves the repository as it was: killed before each of its object
/// writes (its lease, the lease's refresh, its record, the lease's removal), and with `kill -9`
/// while it reads packs. At most a stale lease is left, which expires by itself; every later
/// verify is clean and a prune runs.
#[test]
fn verify_killed_at_any_moment_leaves_the_repository_as_it_was() {
    let p = Place::local();
    let Place::Local(w) = &p else { unreachable!() };
    let (_img, _point) = one_pack_point(&p, 41);
    let verify_cmd = || {
        let mut c = std::process::Command::new(BIN);
        c.args(["verify", "--read-data", "--repo"])
            .arg(&w.repo)
            .arg("--cache-dir")
            .arg(&w.cache)
            .arg("--password-file")
            .arg(&w.password_file)
            .env_remove("BLOCKVAULT_PASSWORD")
            .env_remove("BLOCKVAULT_REPO");
        c
    };
    let unchanged = |before: &[PathBuf], when: &str| {
        let mut after = files(&p.root());
        after.retain(|f| !f.starts_with(p.root().join("leases")));
        let mut b = before.to_vec();
        b.sort();
        after.sort();
        assert_eq!(b, after, "{when}: only a lease may be left behind");
    };
    let before = files(&p.root());
    // Stopped before its 1st, 2nd, ... object write through the object layer, until a run has
    // no write left to stop before and completes.
    let mut step = 1;
    loop {
        let out = verify_cmd()
            .env("BLOCKVAULT_TEST_KILL_AT_STEP", step.to_string())
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            stderr(&out).contains("test hook: stopping"),
            "step {step}: {}",
            stderr(&out)
        );
        unchanged(&before, &format!("killed before write {step}"));
        step += 1;
        assert!(step < 10, "verify makes a handful of writes");
    }
    assert!(step > 1, "verify writes its lease through the object layer");
    let before = files(&p.root());
    // kill -9 while reading.
    let mut child = verify_held_while_reading(w, &p.path("hold"));
    assert!(
        !files(&p.root().join("leases")).is_empty(),
        "verify holds a lease while it reads"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    unchanged(&before, "killed while reading");
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    p.ok(&["prune", "--grace", "0s"]);
}

/// A failed export leaves no file that could pass for the disk, in any format: lost data
/// without --allow-damaged, and a pack gone from the store (exit 6 both).
#[test]
fn a_failed_export_leaves_no_image_behind() {
    let p = Place::local();
    let (_img, point) = one_pack_point(&p, 41);
    let pack = only_pack(&p);
    flip(&pack, 24 + 2 * BLOB + 77);
    for format in ["raw", "vhdx", "qcow2"] {
        let out = p.path(&format!("out.{format}"));
        let o = p.export(&point, "d", &out, &["--format", format]);
        assert_eq!(code(&o), 6, "{format}: {}", stderr(&o));
        assert!(
            !out.exists(),
            "{format}: a failed export left {}",
            out.display()
        );
    }
    // --allow-damaged fills zeros in a raw image only.
    let out = p.path("out.qcow2");
    let o = p.export(&point, "d", &out, &["--format", "qcow2", "--allow-damaged"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("raw image only"), "{}", stderr(&o));
    // The pack unreadable (a directory in its place: a store error, not lost data): no file.
    std::fs::remove_file(&pack).unwrap();
    std::fs::create_dir(&pack).unwrap();
    for format in ["raw", "vhdx", "qcow2"] {
        let out = p.path(&format!("unreadable.{format}"));
        let o = p.export(&point, "d", &out, &["--format", format]);
        assert_ne!(code(&o), 0, "{format}");
        assert!(
            !out.exists(),
            "{format}: a failed export left {}",
            out.display()
        );
    }
    // The pack deleted behind the index's back: the same.
    std::fs::remove_dir(&pack).unwrap();
    for format in ["raw", "vhdx", "qcow2"] {
        let out = p.path(&format!("gone.{format}"));
        let o = p.export(&point, "d", &out, &["--format", format]);
        assert_ne!(code(&o), 0, "{format}");
        assert!(
            !out.exists(),
            "{format}: a failed export left {}",
            out.display()
        );
    }
}

/// A pack deleted between verify's listing and its read is not counted as read and clean: the
/// point that needs it is damaged (exit 7), not verified.
#[test]
fn a_pack_gone_between_listing_and_reading_is_damage_not_clean() {
    let p = Place::local();
    let (_img, point) = one_pack_point(&p, 61);
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    let Place::Local(w) = &p else { unreachable!() };
    let hold = p.path("hold");
    let child = verify_held_while_reading(w, &hold);
    std::fs::remove_file(only_pack(&p)).unwrap();
    std::fs::remove_file(&hold).unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(code(&out), 7, "{v}");
    assert_eq!(v["packs_read"], 0, "{v}");
    assert_ne!(state_of(&v, &point)["state"], "verified", "{v}");
}

/// A point-scoped run reads blobs in coalesced ranges: on a truncated pack it finds the same
/// damage as a whole-pack read (the blobs past the cut), not every blob of a range that crosses
/// the cut. Two repositories with the same disk (and so the same pack layout), one checked each
/// way, since damage found stays reported.
#[test]
fn a_scoped_run_on_a_truncated_pack_finds_only_the_blobs_past_the_cut() {
    let lost = |scoped: bool| {
        let p = Place::local();
        let img = p.path("d.raw");
        // 32 chunks in 1 MiB packs: full packs of chunks only, the page in the last one.
        make_random_image(&img, 32 * CHUNK, 71);
        let point = p.backup("vm1", "d", &img);
        let packs = p.packs();
        assert!(packs.len() >= 2, "{packs:?}");
        // Every full pack cut after its fifth blob (the same packs in both repositories, whatever
        // order their random names list them in); the last, with the page, stays whole.
        let last = packs
            .iter()
            .min_by_key(|f| std::fs::metadata(f).unwrap().len())
            .unwrap();
        for pack in packs.iter().filter(|f| *f != last) {
            let bytes = std::fs::read(pack).unwrap();
            std::fs::write(pack, &bytes[..(24 + 5 * BLOB + 7) as usize]).unwrap();
        }
        let args: &[&str] = if scoped {
            &["--point", &point, "--read-data"]
        } else {
            &["--read-data"]
        };
        let (c, v) = p.verify(args);
        assert_eq!(c, 7, "{v}");
        ranges_of(&v, &point, "d")
    };
    let whole = lost(false);
    assert!(!whole.is_empty() && whole[0].0 > 0, "{whole:?}");
    assert_eq!(lost(true), whole);
}

/// Runs for some points are not numbered, so they go by when the blobs they want were last read:
/// two runs of 50 % for one VM read different packs (the point is verified after the second), and
/// a 30-day re-verify of that VM right after reads nothing. Judged by whole-pack reads only, each
/// such run read the same packs as the last.
#[test]
fn scoped_runs_read_what_earlier_scoped_runs_did_not() {
    let p = Place::local();
    let img = p.path("d.raw");
    make_random_image(&img, 4 << 20, 81);
    let point = p.backup("vm1", "d", &img);
    let packs = p.packs().len();
    assert!(packs >= 4, "{packs}");
    let half = ["--vm", "vm1", "--read-data-subset", "50%"];
    let (c, v) = p.verify(&half);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["run"], serde_json::Value::Null, "{v}");
    let first = v["packs_read"].as_u64().unwrap();
    assert!(first >= 2 && (first as usize) < packs, "{v}");
    assert_eq!(state_of(&v, &point)["state"], "partly", "{v}");
    let (c, v) = p.verify(&half);
    assert_eq!(c, 0, "{v}");
    assert_eq!(state_of(&v, &point)["state"], "verified", "{v}");
    let (c, v) = p.verify(&["--vm", "vm1", "--reverify-after", "30d"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["packs_read"], 0, "{v}");
}

/// `--read-data` under a cap reads the packs read longest ago (or never) first, so nightly capped
/// runs get through the whole repository, and it names the packs it left out as overdue. In id
/// order, every run read the same packs and reported nothing left out.
#[test]
fn capped_read_data_runs_move_through_every_pack() {
    let p = Place::local();
    let img = p.path("big.raw");
    make_random_image(&img, 6 << 20, 83);
    let point = p.backup("vm1", "d", &img);
    let packs = p.packs().len() as u64;
    assert!(packs >= 6, "{packs}");
    let capped = ["--read-data", "--max-bytes", "2MiB"];
    let mut read = 0;
    for run in 1.. {
        let (c, v) = p.verify(&capped);
        assert_eq!(c, 0, "{v}");
        let now = v["packs_read"].as_u64().unwrap();
        assert!(now >= 1, "{v}");
        read += now;
        if read < packs {
            assert_eq!(v["overdue_packs"], packs - now, "run {run}: {v}");
            assert_ne!(state_of(&v, &point)["state"], "verified", "{v}");
        } else {
            assert_eq!(state_of(&v, &point)["state"], "verified", "run {run}: {v}");
            break;
        }
        assert!(run < packs, "{read} of {packs} packs read in {run} runs");
    }
}

/// A backup from another host that finishes while verify starts (between its listing of the
/// points and its index sync) is not damage. With the index synced first, the new point's config
/// piece was unknown to the index, and the point was reported and recorded as damaged (exit 7).
#[test]
fn a_backup_finishing_while_verify_starts_is_not_damage() {
    let p = Place::local();
    let (_img, _point) = one_pack_point(&p, 91);
    let Place::Local(w) = &p else { unreachable!() };
    let hold = p.path("hold");
    let child = verify_held_at(w, &hold, "verify-listed-points");
    let img = p.path("e.raw");
    make_random_image(&img, 4 * CHUNK, 92);
    let cfg = p.path("vm2.vmcx");
    make_random_image(&cfg, 5000, 93);
    let disk = format!("d={}", img.display());
    let args = [
        "backup",
        "--vm",
        "vm2",
        "--disk",
        &disk,
        "--config",
        cfg.to_str().unwrap(),
    ];
    let out = p.run_in("host2", &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    std::fs::remove_file(&hold).unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(code(&out), 0, "{v}");
    // The next run checks the new point too.
    let (c, v) = p.verify(&["--read-data"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["points"], 2, "{v}");
}

/// A pack whose table of contents does not open and that no index segment lists has no blob
/// that can be checked: it is reported not checked (exit 10), not "every blob is intact", and
/// stays due (a 30-day re-verify reads it again). The copy of a pack under another id is one:
/// its table is sealed for the original's id.
#[test]
fn a_pack_with_an_unreadable_table_and_no_known_blobs_is_not_checked() {
    let p = Place::local();
    let (_img, _point) = one_pack_point(&p, 95);
    let pack = only_pack(&p);
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let last = if name.ends_with('0') { "1" } else { "0" };
    let copy_name = format!("{}{last}", &name[..name.len() - 1]);
    std::fs::copy(&pack, pack.with_file_name(&copy_name)).unwrap();
    for args in [&["--read-data"][..], &["--reverify-after", "30d"]] {
        let (c, v) = p.verify(args);
        assert_eq!(c, 10, "{args:?}: {v}");
        let unchecked = v["unchecked"].as_array().unwrap();
        assert!(
            unchecked
                .iter()
                .any(|u| u["object"] == format!("pack {copy_name}")
                    && u["detail"]
                        .as_str()
                        .unwrap()
                        .contains("none of them could be checked")),
            "{args:?}: {v}"
        );
        assert!(
            v["problems"].as_array().unwrap().is_empty(),
            "{args:?}: {v}"
        );
    }
}
