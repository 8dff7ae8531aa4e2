//! Throughput against qemu-img (ignored by default; prints timings):
//! `BV_PERF_MIB=3800 cargo test -p blockvault-agent --release --test perf -- --ignored --nocapture`

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use blockvault_vhdx::{VhdxDisk, VhdxOpenOptions, VhdxWriter};
use rand::RngCore;

#[test]
#[ignore]
fn writer_and_reader_vs_qemu() {
    let mib: u64 = std::env::var("BV_PERF_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let dir =
        tempfile::tempdir_in(std::env::var("BV_PERF_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let raw = dir.path().join("src.raw");
    // 3/4 of every 4 MiB holds random data, the rest is zero.
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&raw).unwrap());
        let mut r = common::rng(1);
        let mut buf = vec![0u8; 4 << 20];
        for i in 0..mib / 4 {
            buf.fill(0);
            if i % 4 != 3 {
                r.fill_bytes(&mut buf[..3 << 20]);
            }
            f.write_all(&buf).unwrap();
        }
    }
    let size = (mib / 4) * (4 << 20);
    let q = dir.path().join("qemu.vhdx");
    let t = Instant::now();
    common::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=32M",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let qemu_write = t.elapsed();
    // qemu-img does not fsync its output; VhdxWriter::finish does. Time the
    // flush of qemu's dirty pages separately for a like-for-like figure.
    let t = Instant::now();
    common::run(std::process::Command::new("sync").arg(&q));
    let qemu_sync = t.elapsed();

    let o = dir.path().join("ours.vhdx");
    let t = Instant::now();
    let mut w = VhdxWriter::create(&o, size, 32 << 20, 512).unwrap();
    // The engine feeds the writer from a pipeline; a producer thread with a
    // bounded queue stands in for it (qemu-img overlaps its reads the same way).
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..6 {
        back_tx.send(vec![0u8; 4 << 20]).unwrap();
    }
    let rawp = raw.clone();
    let producer = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&rawp).unwrap();
        let mut off = 0u64;
        while let Ok(mut buf) = back_rx.recv() {
            buf.resize(4 << 20, 0);
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            buf.truncate(n);
            tx.send((off, buf)).unwrap();
            off += n as u64;
        }
    });
    for (off, buf) in rx {
        w.write_at(off, &buf).unwrap();
        let _ = back_tx.send(buf);
    }
    producer.join().unwrap();
    let ours_data = t.elapsed();
    w.finish().unwrap();
    let ours_write = t.elapsed();

    let t = Instant::now();
    common::qemu_img(&[
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        q.to_str().unwrap(),
        dir.path().join("back.raw").to_str().unwrap(),
    ]);
    let qemu_read = t.elapsed();
    std::fs::remove_file(dir.path().join("back.raw")).ok();

    let t = Instant::now();
    let disk = Arc::new(VhdxDisk::open(&o, &VhdxOpenOptions::default()).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|k| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4 << 20];
                let mut sum = 0u64;
                let mut p = k * (4 << 20);
                while p < size {
                    disk.read_at(p, &mut buf).unwrap();
                    sum = sum.wrapping_add(buf[12345] as u64);
                    p += 8 << 20;
                }
                sum
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ours_read = t.elapsed();
    let cmp = common::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vhdx",
        raw.to_str().unwrap(),
        o.to_str().unwrap(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    println!(
        "{mib} MiB: write qemu-img convert {qemu_write:?} (+ sync {qemu_sync:?}) / VhdxWriter {ours_write:?} (data {ours_data:?}, finish+fsync {:?}); read qemu-img convert -O raw {qemu_read:?} / VhdxDisk 2 threads x 4 MiB {ours_read:?}",
        ours_write - ours_data
    );
}
