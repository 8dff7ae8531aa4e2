use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rand::{Rng, RngCore, SeedableRng};

pub const BIN: &str = env!("CARGO_BIN_EXE_blockvault");

/// A scratch world: a repository directory, a cache directory and a password file.
pub struct World {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub cache: PathBuf,
    pub password_file: PathBuf,
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        let cache = dir.path().join("cache");
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, "correct horse battery staple\n").unwrap();
        Self {
            dir,
            repo,
            cache,
            password_file,
        }
    }

    /// A world with an initialised repository (cheap KDF so tests stay fast).
    pub fn with_repo(chunk: &str) -> Self {
        let w = Self::new();
        w.ok(&[
            "repo",
            "init",
            "--chunk-size",
            chunk,
            "--kdf-memory-kib",
            "8192",
        ]);
        w
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--repo")
            .arg(&self.repo)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--password-file")
            .arg(&self.password_file)
            .env_remove("BLOCKVAULT_PASSWORD")
            .env_remove("BLOCKVAULT_REPO")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running blockvault")
    }

    /// Runs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        json_of(args, |a| self.ok(a))
    }

    /// Backs up `disks` (name, path) as VM `vm`; returns the JSON summary.
    pub fn backup(&self, vm: &str, disks: &[(&str, &Path)]) -> serde_json::Value {
        let specs: Vec<String> = disks
            .iter()
            .map(|(n, p)| format!("{n}={}", p.display()))
            .collect();
        let mut args = vec!["backup", "--vm", vm];
        for s in &specs {
            args.push("--disk");
            args.push(s);
        }
        self.json(&args)
    }

    pub fn export(&self, point: &str, disk: &str, out: &Path) {
        self.ok(&[
            "restore",
            "export",
            "--overwrite",
            point,
            "--disk",
            disk,
            "--out",
            out.to_str().unwrap(),
        ]);
    }

    pub fn packs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        let dir = self.repo.join("packs");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for sub in rd.flatten() {
                for f in std::fs::read_dir(sub.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if !f.file_name().to_string_lossy().contains('#') {
                        v.push(f.path());
                    }
                }
            }
        }
        v.sort();
        v
    }
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A sparse disk image of `size` bytes with `extents` random-content extents, some compressible
/// text-like data, some random, some explicit zeros.
pub fn make_image(path: &Path, size: u64, seed: u64, extents: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for i in 0..extents {
        let len = rng.gen_range(1..(size / 8).max(2)).min(4 << 20);
        let off = rng.gen_range(0..size - len);
        let mut buf = vec![0u8; len as usize];
        match i % 3 {
            0 => rng.fill_bytes(&mut buf),
            1 => {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[j % 44];
                }
            }
            _ => {}
        }
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Overwrites `count` random ranges of an image with random bytes.
pub fn mutate_image(path: &Path, seed: u64, count: usize, max_len: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let size = f.seek(SeekFrom::End(0)).unwrap();
    for _ in 0..count {
        let len = rng.gen_range(1..max_len.min(size));
        let off = rng.gen_range(0..size - len);
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.len() == y.len() && x == y
}

/// Bytes a file really occupies on disk.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// An image of incompressible random bytes (slow to back up, useful to interrupt).
pub fn make_random_image(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// The stdout of a blockvault run that must have succeeded (else a panic showing both streams).
pub fn succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "blockvault {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `ok` with `--json` added and parses what it printed.
pub fn json_of(args: &[&str], ok: impl FnOnce(&[&str]) -> String) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let s = ok(&a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{s}"))
}
