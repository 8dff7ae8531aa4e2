//! The reader against qemu: images made and mutated by qemu-img / qemu-io,
//! read back by `qemu-img convert -O raw` as the oracle.

mod common;

use std::process::Command;
use std::sync::Arc;

use blockvault_vhdx::{VhdxDisk, VhdxOpenOptions};
use common::*;
use rand::Rng;

/// Creates an image with qemu-img and scatters qemu-io writes over it.
fn qemu_image(
    dir: &std::path::Path,
    name: &str,
    opts: &str,
    size_mib: u64,
    seed: u64,
) -> std::path::PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        opts,
        p.to_str().unwrap(),
        &format!("{size_mib}M"),
    ]);
    let mut r = rng(seed);
    let size = size_mib << 20;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "vhdx"]);
    for i in 0..24 {
        // 512-byte granularity, any length up to 3 MiB.
        let len = r.gen_range(1..(6 * 1024)) * 512u64;
        let off = r.gen_range(0..(size - len) / 512) * 512;
        if i % 6 == 5 {
            cmd.args(["-c", &format!("write -z {off} {len}")]);
        } else {
            let pat: u8 = r.gen_range(1..=255);
            cmd.args(["-c", &format!("write -P {pat:#04x} {off} {len}")]);
        }
    }
    // The very first and last sectors too.
    cmd.args(["-c", "write -P 0x11 0 512"]);
    cmd.args(["-c", &format!("write -P 0x22 {} 512", size - 512)]);
    cmd.arg(p.to_str().unwrap());
    run(&mut cmd);
    p
}

fn check_against_qemu(p: &std::path::Path, dir: &std::path::Path) -> VhdxDisk {
    let want = qemu_to_raw(p, dir);
    let disk = VhdxDisk::open(p, &VhdxOpenOptions::default()).unwrap();
    assert_eq!(disk.virtual_size(), want.len() as u64);
    // Odd piece size so reads straddle block boundaries.
    let got = read_all(&disk, 3 * 1024 * 1024 + 4096 + 512);
    assert_same(&p.display().to_string(), &got, &want);
    assert_ranges_cover(&p.display().to_string(), &disk.allocated_ranges(), &want);
    disk
}

#[test]
fn qemu_images_all_block_sizes_and_subformats() {
    let dir = tmp();
    let cases = [
        ("dynamic", "1M", "off", 40),
        ("dynamic", "1M", "on", 40),
        ("dynamic", "8M", "off", 48),
        ("dynamic", "8M", "on", 48),
        ("dynamic", "32M", "off", 70),
        ("dynamic", "32M", "on", 70),
        ("fixed", "1M", "off", 24),
        ("fixed", "8M", "on", 24),
        ("fixed", "32M", "off", 40),
    ];
    for (i, (sub, bs, zero, size)) in cases.iter().enumerate() {
        let name = format!("q-{sub}-{bs}-{zero}.vhdx");
        let opts = format!("subformat={sub},block_size={bs},log_size=1M,block_state_zero={zero}");
        let p = qemu_image(dir.path(), &name, &opts, *size, 1000 + i as u64);
        let disk = check_against_qemu(&p, dir.path());
        let info = disk.info();
        assert_eq!(
            info.block_size as u64,
            bs.trim_end_matches('M').parse::<u64>().unwrap() << 20
        );
        assert!(!info.has_parent);
        assert!(!info.log.replayed, "qemu flushes its log");
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains("\"fully_present\""));
    }
}

#[test]
fn qemu_convert_of_real_data() {
    let dir = tmp();
    let mut r = rng(7);
    // Real-looking data: text, random bytes, zero gaps, at odd offsets.
    let size = 33 << 20;
    let mut raw = sparse_content(&mut r, size, 8);
    let text = b"The quick brown fox jumps over the lazy dog. ".repeat(4000);
    raw[5_000_000..5_000_000 + text.len()].copy_from_slice(&text);
    let rawp = dir.path().join("src.raw");
    std::fs::write(&rawp, &raw).unwrap();
    for (sub, bs) in [("dynamic", "1M"), ("dynamic", "16M"), ("fixed", "4M")] {
        let out = dir.path().join(format!("conv-{sub}-{bs}.vhdx"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &format!("subformat={sub},block_size={bs}"),
            rawp.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let disk = VhdxDisk::open(&out, &VhdxOpenOptions::default()).unwrap();
        let got = read_all(&disk, 1 << 20);
        assert_same(&out.display().to_string(), &got, &raw);
        assert_ranges_cover("convert", &disk.allocated_ranges(), &raw);
        if sub == "dynamic" && bs == "1M" {
            // Zero blocks stay unallocated: allocated bytes well below the size.
            let alloc: u64 = disk
                .allocated_ranges()
                .iter()
                .map(|r| r.end - r.start)
                .sum();
            assert!(alloc < size, "dynamic convert allocated everything");
        }
    }
}

#[test]
fn concurrent_reads_from_threads() {
    let dir = tmp();
    let p = qemu_image(
        dir.path(),
        "mt.vhdx",
        "subformat=dynamic,block_size=1M",
        40,
        99,
    );
    let want = Arc::new(qemu_to_raw(&p, dir.path()));
    let disk = Arc::new(VhdxDisk::open(&p, &VhdxOpenOptions::default()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = disk.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                let mut r = rng(t);
                let mut buf = vec![0u8; 4 << 20];
                for _ in 0..200 {
                    let n = r.gen_range(256 * 1024..=4 << 20usize);
                    let off = r.gen_range(0..=want.len() - n);
                    disk.read_at(off as u64, &mut buf[..n]).unwrap();
                    assert!(
                        buf[..n] == want[off..off + n],
                        "thread {t} mismatch at {off}+{n}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut b = [0u8; 1];
    assert!(
        disk.read_at(want.len() as u64, &mut b).is_err(),
        "read past end must fail"
    );
}

#[test]
fn truncated_qemu_file_is_an_error() {
    let dir = tmp();
    let p = qemu_image(
        dir.path(),
        "trunc.vhdx",
        "subformat=dynamic,block_size=1M",
        40,
        5,
    );
    let len = std::fs::metadata(&p).unwrap().len();
    // Cut into the last payload block: open must refuse, naming the BAT entry.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 4096).unwrap();
    let e = VhdxDisk::open(&p, &VhdxOpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("BAT entry") && e.contains("past end of file"),
        "{e}"
    );
    // Opened first, truncated after: reads error out, never return garbage.
    let p2 = qemu_image(
        dir.path(),
        "trunc2.vhdx",
        "subformat=dynamic,block_size=1M",
        40,
        6,
    );
    let disk = VhdxDisk::open(&p2, &VhdxOpenOptions::default()).unwrap();
    let ranges = disk.allocated_ranges();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p2)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let last = ranges.last().unwrap().clone();
    let mut buf = vec![0u8; (last.end - last.start).min(1 << 20) as usize];
    let e = disk.read_at(last.start, &mut buf).unwrap_err();
    assert!(e.to_string().contains("payload block"), "{e}");
}
