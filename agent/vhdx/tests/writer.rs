//! VhdxWriter against qemu: `qemu-img check` must find the output clean and
//! `qemu-img compare` identical to the source; our reader must agree too.
#![allow(clippy::single_range_in_vec_init)] // single ranges are the data here

mod common;

use blockvault_vhdx::{VhdxDisk, VhdxOpenOptions, VhdxWriter};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;

fn write_and_check(size: u64, block_size: u32, lss: u32, seed: u64, shuffled: bool) {
    let dir = tmp();
    let mut r = rng(seed);
    let raw = sparse_content(&mut r, size, 12);
    let rawp = dir.path().join("src.raw");
    std::fs::write(&rawp, &raw).unwrap();
    let out = dir.path().join("out.vhdx");
    let mut w = VhdxWriter::create(&out, size, block_size, lss).unwrap();
    // Pieces of 256 KiB..4 MiB (not block aligned), sequential or shuffled.
    let mut pieces = Vec::new();
    let mut p = 0u64;
    while p < size {
        let n = r.gen_range(256 * 1024..=4u64 << 20).min(size - p);
        pieces.push(p..p + n);
        p += n;
    }
    if shuffled {
        pieces.shuffle(&mut r);
    }
    for pc in &pieces {
        w.write_at(pc.start, &raw[pc.start as usize..pc.end as usize])
            .unwrap();
    }
    w.finish().unwrap();

    if lss == 512 {
        let check = qemu_img(&["check", "-f", "vhdx", out.to_str().unwrap()]);
        assert!(
            check.contains("No errors were found"),
            "qemu-img check: {check}"
        );
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "vhdx",
            rawp.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert!(
            cmp.contains("Images are identical"),
            "qemu-img compare: {cmp}"
        );
    } else {
        // qemu refuses 4 KiB logical sectors ("Operation not supported");
        // libvhdi is the outside reader for those.
        let (ok, msg) = try_run(std::process::Command::new("qemu-img").args([
            "check",
            "-f",
            "vhdx",
            out.to_str().unwrap(),
        ]));
        assert!(
            !ok && msg.contains("not supported"),
            "qemu now reads 4K VHDX? {msg}"
        );
    }
    assert_same("writer output via libvhdi", &libvhdi_read(&out), &raw);

    let disk = VhdxDisk::open(&out, &VhdxOpenOptions::default()).unwrap();
    assert_eq!(disk.virtual_size(), size);
    assert_eq!(disk.block_size(), block_size);
    assert_eq!(disk.logical_sector_size(), lss);
    let got = read_all(&disk, 1 << 20);
    assert_same("writer output via our reader", &got, &raw);
    assert_ranges_cover("writer", &disk.allocated_ranges(), &raw);
    // Zero blocks stay NOT_PRESENT.
    let bs = block_size as u64;
    let zero_blocks = raw
        .chunks(bs as usize)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64;
    assert_eq!(disk.info().bat.not_present, zero_blocks);

    {
        // A second, independent reader agrees on the geometry.
        assert!(
            have("vhdiinfo"),
            "vhdiinfo is not installed: run scripts/install-deps.sh"
        );
        let info = run(std::process::Command::new("vhdiinfo").arg(&out));
        assert!(info.contains(&format!("{size} bytes")), "vhdiinfo: {info}");
    }
}

#[test]
fn writer_1m_blocks_sequential() {
    write_and_check(40 << 20, 1 << 20, 512, 1, false);
}

#[test]
fn writer_8m_blocks_shuffled() {
    write_and_check(72 << 20, 8 << 20, 512, 2, true);
}

#[test]
fn writer_32m_blocks_odd_size() {
    // Not a multiple of the block size: the last block is partial.
    write_and_check((70 << 20) + 3 * 512, 32 << 20, 512, 3, true);
}

#[test]
fn writer_2m_blocks_4k_sectors() {
    write_and_check((30 << 20) + 4096, 2 << 20, 4096, 4, false);
}

#[test]
fn writer_overwrites_and_write_block() {
    let dir = tmp();
    let out = dir.path().join("ow.vhdx");
    let size = 9u64 << 20;
    let mut w = VhdxWriter::create(&out, size, 1 << 20, 512).unwrap();
    let mut want = vec![0u8; size as usize];
    w.write_at(100, &[7u8; 5000]).unwrap();
    want[100..5100].fill(7);
    // Overwrite part of it with zeros: must read back as zeros.
    w.write_at(1000, &[0u8; 1000]).unwrap();
    want[1000..2000].fill(0);
    let blk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    w.write_block(3, &blk).unwrap();
    want[3 << 20..4 << 20].copy_from_slice(&blk);
    // All-zero block: stays unallocated.
    w.write_block(5, &vec![0u8; 1 << 20]).unwrap();
    assert!(w.write_block(9, &blk).is_err(), "block past the end");
    assert!(
        w.write_at(size - 10, &[1u8; 11]).is_err(),
        "write past the end"
    );
    w.finish().unwrap();
    let disk = VhdxDisk::open(&out, &VhdxOpenOptions::default()).unwrap();
    assert_same("overwrites", &read_all(&disk, 1 << 20), &want);
    assert_eq!(disk.info().bat.fully_present, 2);
    assert_eq!(disk.allocated_ranges(), vec![0..1 << 20, 3 << 20..4 << 20]);
    let check = qemu_img(&["check", "-f", "vhdx", out.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn writer_rejects_bad_parameters() {
    let dir = tmp();
    let p = dir.path().join("bad.vhdx");
    assert!(VhdxWriter::create(&p, 1 << 20, 3 << 20, 512).is_err());
    assert!(VhdxWriter::create(&p, 1 << 20, 512 << 20, 512).is_err());
    assert!(VhdxWriter::create(&p, 1 << 20, 1 << 20, 1024).is_err());
    assert!(VhdxWriter::create(&p, 1000, 1 << 20, 512).is_err());
    assert!(VhdxWriter::create(&p, 0, 1 << 20, 512).is_err());
}
