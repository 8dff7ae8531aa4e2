//! The committed fuzz corpus (engine/restore/fuzz/corpus) run through the fuzz target's entry
//! point, every seed a regression test; then seeded mutations of the valid seeds, a small fuzz
//! run on every test pass. `write_seed_corpus` (ignored) regenerates the seeds with real tools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockvault_restore::*;

mod common;
use common::run;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/disk_image");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn corpus_runs_clean_and_valid_seeds_stay_valid() {
    let files = corpus();
    assert!(files.len() >= 6, "seed corpus missing");
    let mut valid = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        assert!(
            data.len() < 256 * 1024,
            "{} is too large for the corpus",
            f.display()
        );
        fuzz_disk_image(&data);
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("ok-") {
            let img = decode_sparse(&data).expect("seeds are sparse-encoded");
            let dev: Arc<dyn ReadAt> = Arc::new(MemDisk::new(img));
            let t = partitions(&dev).unwrap_or_else(|e| panic!("{name}: {e}"));
            let p = t
                .partitions
                .iter()
                .find(|p| p.filesystem.readable())
                .unwrap();
            let mut v =
                open_volume(&dev, &t, &p.selector()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let l = v.list(&[], 100).unwrap();
            assert!(
                l.entries.iter().any(|e| e.name == "hello.txt"),
                "{name}: {l:?}"
            );
            let mut got = Vec::new();
            v.read_file(&[b"hello.txt".to_vec()], 4096, &mut |_, b| {
                got.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(got, b"hello, fuzzer\n", "{name}");
            valid += 1;
        }
    }
    assert!(valid >= 3, "the ext4, NTFS and MBR seeds all open");
}

/// A deterministic mutation run: byte flips, runs of 0xff and zeroed sectors over the metadata
/// of each valid seed. None may panic, hang, or grow memory past the image's own scale.
#[test]
fn mutated_seeds_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for f in corpus() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("ok-") {
            continue;
        }
        let img = decode_sparse(&std::fs::read(&f).unwrap()).unwrap();
        // Non-zero 512-byte sectors: where the structures are.
        let sectors: Vec<usize> = (0..img.len() / 512)
            .filter(|s| img[s * 512..s * 512 + 512].iter().any(|b| *b != 0))
            .collect();
        for _ in 0..400 {
            let mut m = img.clone();
            for _ in 0..1 + next() % 8 {
                let s = sectors[(next() % sectors.len() as u64) as usize] * 512;
                let at = s + (next() % 512) as usize;
                match next() % 4 {
                    0 => m[at] ^= 1 << (next() % 8),
                    1 => m[at] = (next() & 0xff) as u8,
                    2 => {
                        let end = (at + 8).min(m.len());
                        m[at..end].fill(0xff)
                    }
                    _ => m[s..s + 512].fill(0),
                }
            }
            fuzz_disk_image(&m);
        }
    }
}

/// Regenerates the seeds: `BV_WRITE_CORPUS=1 cargo test -p blockvault-restore --test
/// fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    if std::env::var("BV_WRITE_CORPUS").is_err() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/disk_image");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let save = |name: &str, img: &[u8]| {
        let enc = encode_sparse(img);
        // NTFS seeds carry the 128 KiB $UpCase table; everything else is far smaller.
        assert!(enc.len() < 256 * 1024, "{name}: {}", enc.len());
        std::fs::write(dir.join(name), enc).unwrap();
    };
    let content = t("content");
    std::fs::create_dir_all(content.join("dir/sub")).unwrap();
    std::fs::write(content.join("hello.txt"), "hello, fuzzer\n").unwrap();
    std::fs::write(content.join("dir/sub/data.bin"), vec![7u8; 5000]).unwrap();
    std::os::unix::fs::symlink("../hello.txt", content.join("dir/link")).unwrap();
    let ext = t("ext.img");
    std::fs::File::create(&ext)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-N", "32", "-O", "^has_journal", "-d"])
        .arg(&content)
        .arg(&ext));
    let ext_img = std::fs::read(&ext).unwrap();
    save("ok-ext4-whole-disk", &ext_img);

    let gpt = t("gpt.img");
    std::fs::File::create(&gpt)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+1M", "-t", "1:8300"])
        .arg(&gpt));
    let mut g = std::fs::read(&gpt).unwrap();
    g[1 << 20..2 << 20].copy_from_slice(&ext_img);
    save("ok-ext4-in-gpt", &g);
    // The GPT header declaring 256-byte entries (CRC fixed so only that field is wrong).
    let mut bad = g.clone();
    bad[512 + 84..512 + 88].copy_from_slice(&256u32.to_le_bytes());
    bad[512 + 16..512 + 20].fill(0);
    let crc = crc32(&bad[512..512 + 92]);
    bad[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    save("gpt-entry-size-256", &bad);

    let ntfs = t("ntfs.img");
    std::fs::File::create(&ntfs)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    run(Command::new("mkntfs")
        .args(["-F", "-Q", "-q", "-c", "4096"])
        .arg(&ntfs));
    run(Command::new("ntfscp")
        .arg(&ntfs)
        .arg(content.join("hello.txt"))
        .arg("hello.txt"));
    run(Command::new("ntfscp")
        .arg(&ntfs)
        .arg(content.join("dir/sub/data.bin"))
        .arg("data.bin"));
    let mbr = t("mbr.img");
    std::fs::File::create(&mbr)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut c = Command::new("sfdisk");
    c.arg(&mbr)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut ch = c.spawn().unwrap();
    use std::io::Write;
    ch.stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=4096, type=7\n")
        .unwrap();
    assert!(ch.wait().unwrap().success());
    let mut m = std::fs::read(&mbr).unwrap();
    m[1 << 20..3 << 20].copy_from_slice(&std::fs::read(&ntfs).unwrap());
    save("ok-ntfs-in-mbr", &m);

    // A truncated ext4 and an MBR whose partition runs past the disk.
    save("ext4-truncated", &ext_img[..600 << 10]);
    let mut past = m.clone();
    past[1 << 20..3 << 20].fill(0);
    past[1 << 20..2 << 20].copy_from_slice(&ext_img);
    past[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    save("mbr-past-end", &past);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
