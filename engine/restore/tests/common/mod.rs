//! Helpers the integration tests share: running the real tools, and opening an image the way a
//! restore does.
// Each test file uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockvault_restore::{open_volume, partitions, FileDisk, ReadAt, Volume};

/// Runs a tool, fails the test loudly if it is missing or fails, and returns its stdout.
pub fn run(c: &mut Command) -> Vec<u8> {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{c:?}: {e} (install it with scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An ext4 image of `mib` MiB at `dir/fs.img` holding `content` (`mkfs.ext4 -d`), with the
/// extra `mkfs.ext4` options given.
pub fn ext4(dir: &Path, mib: u64, content: &Path, options: &[&str]) -> PathBuf {
    let img = dir.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(options)
        .arg("-d")
        .arg(content)
        .arg(&img));
    img
}

/// The file system of a whole-disk image.
pub fn volume(img: &Path) -> Box<dyn Volume> {
    let dev: Arc<dyn ReadAt> = Arc::new(FileDisk::open(img).unwrap());
    let t = partitions(&dev).unwrap();
    open_volume(&dev, &t, "disk").unwrap()
}
