//! Files qemu cannot make, crafted with `vhdx::testing::ImageBuilder`:
//! differencing chains, 4 KiB sectors, PARTIALLY_PRESENT blocks, every BAT
//! state, pending logs with stale entries, unusual layouts. Checked against
//! the content the builder was told to store, and against qemu and libvhdi
//! where those can read the file.
#![allow(clippy::single_range_in_vec_init)] // single ranges are the data here

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault_vhdx::testing::*;
use blockvault_vhdx::*;
use common::*;
use rand::Rng;

const MIB: u64 = 1 << 20;

fn rand_block(r: &mut TestRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.fill(&mut v[..]);
    v
}

/// The content a chain of builders describes, computed sector by sector
/// straight from MS-VHDX §2.5.1.1 / §2.4 (independent of the reader).
fn model(layers: &[&ImageBuilder]) -> Vec<u8> {
    let size = layers[0].virtual_size;
    let lss = layers[0].logical_sector_size as u64;
    let mut out = vec![0u8; size as usize];
    for s in 0..size / lss {
        let mut level = 0;
        while let Some(l) = layers.get(level) {
            let bs = l.block_size as u64;
            let pos = s * lss;
            let b = pos / bs;
            let diff = l.parent_locator.is_some();
            let spec = l.blocks.get(&b);
            let state = spec.map_or(PAYLOAD_BLOCK_NOT_PRESENT, |x| x.state);
            let from_file = |o: &mut [u8]| {
                if let Some(d) = spec.and_then(|x| x.data.as_ref()) {
                    let inb = (pos - b * bs) as usize;
                    if inb < d.len() {
                        let n = (d.len() - inb).min(lss as usize);
                        o[..n].copy_from_slice(&d[inb..inb + n]);
                    }
                }
            };
            let dst = &mut out[pos as usize..(pos + lss) as usize];
            match state {
                PAYLOAD_BLOCK_FULLY_PRESENT => {
                    from_file(dst);
                    break;
                }
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    let chunk = s >> 23;
                    let bit = s & ((1 << 23) - 1);
                    let bm = l.sector_bitmaps.get(&chunk).unwrap();
                    let set = bm
                        .get((bit / 8) as usize)
                        .is_some_and(|x| x >> (bit % 8) & 1 == 1);
                    if set {
                        from_file(dst);
                        break;
                    }
                    level += 1;
                }
                PAYLOAD_BLOCK_NOT_PRESENT if diff => level += 1,
                _ => break,
            }
        }
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open(p: &Path) -> Result<VhdxDisk, Error> {
    VhdxDisk::open(p, &VhdxOpenOptions::default())
}

#[test]
fn every_bat_state_in_a_dynamic_disk() {
    let dir = tmp();
    let mut r = rng(11);
    let mut b = ImageBuilder::new(24 * MIB, MIB as u32, 512);
    b.set_block(0, BlockSpec::present(rand_block(&mut r, MIB as usize)));
    b.set_block(1, BlockSpec::state(PAYLOAD_BLOCK_ZERO));
    b.set_block(2, BlockSpec::state(PAYLOAD_BLOCK_UNDEFINED));
    b.set_block(3, BlockSpec::state(PAYLOAD_BLOCK_UNMAPPED));
    b.set_block(4, BlockSpec::state(5)); // UNMAPPED of the 0.95 draft
                                         // States that carry a (reserved) offset pointing at real data still read zeros.
    b.set_block(
        5,
        BlockSpec {
            state: PAYLOAD_BLOCK_UNMAPPED,
            data: None,
            raw_offset: Some(b.layout().file_size),
        },
    );
    b.set_block(7, BlockSpec::present(vec![0x5a; 1000])); // rest of the block zero
    b.set_block(23, BlockSpec::present(rand_block(&mut r, MIB as usize)));
    let img = b.build();
    let p = write(dir.path(), "states.vhdx", &img);
    let want = model(&[&b]);
    let disk = open(&p).unwrap();
    assert_same("states", &read_all(&disk, 3 * MIB as usize / 2), &want);
    assert_ranges_cover("states", &disk.allocated_ranges(), &want);
    assert_eq!(
        disk.allocated_ranges(),
        vec![0..MIB, 7 * MIB..8 * MIB, 23 * MIB..24 * MIB]
    );
    let st = disk.info().bat;
    assert_eq!(
        (
            st.fully_present,
            st.zero,
            st.undefined,
            st.unmapped,
            st.not_present
        ),
        (3, 1, 1, 3, 16)
    );
    assert_same("states via qemu", &qemu_to_raw(&p, dir.path()), &want);
    assert_same("states via libvhdi", &libvhdi_read(&p), &want);
}

#[test]
fn four_k_logical_sectors() {
    let dir = tmp();
    let mut r = rng(12);
    for (bs, size) in [(MIB as u32, 20 * MIB + 4096), (8 * MIB as u32, 40 * MIB)] {
        let mut b = ImageBuilder::new(size, bs, 4096);
        for i in [0u64, 2, (size - 1) / bs as u64] {
            b.set_block(i, BlockSpec::present(rand_block(&mut r, bs as usize)));
        }
        let p = write(dir.path(), &format!("4k-{bs}.vhdx"), &b.build());
        let disk = open(&p).unwrap();
        assert_eq!(disk.logical_sector_size(), 4096);
        let want = model(&[&b]);
        assert_same("4k", &read_all(&disk, 5 * MIB as usize / 4), &want);
        assert_ranges_cover("4k", &disk.allocated_ranges(), &want);
        assert_same("4k via libvhdi", &libvhdi_read(&p), &want);
    }
}

#[test]
fn unusual_region_layouts_and_metadata_order() {
    let dir = tmp();
    let mut r = rng(13);
    let mut b = ImageBuilder::new(16 * MIB, 2 * MIB as u32, 512);
    b.log_offset = 9 * MIB;
    b.log_length = 2 * MIB as u32;
    b.bat_offset = MIB;
    b.metadata_offset = 5 * MIB;
    b.data_offset = 16 * MIB;
    b.regions_reversed = true;
    b.metadata_items_reversed = true;
    // An unknown optional item and a user item: both ignored.
    b.extra_metadata.push((Guid::random(), vec![1, 2, 3, 4], 0));
    b.extra_metadata.push((Guid::random(), vec![9; 16], 1));
    b.header_sequences = [7, 7]; // equal and identical, as Disk2VHD writes them
    b.set_block(1, BlockSpec::present(rand_block(&mut r, 2 * MIB as usize)));
    b.set_block(6, BlockSpec::present(rand_block(&mut r, 2 * MIB as usize)));
    let img = b.build();
    let want = model(&[&b]);
    let p = write(dir.path(), "layout.vhdx", &img);
    let disk = open(&p).unwrap();
    assert_same("layout", &read_all(&disk, MIB as usize), &want);
    let info = disk.info();
    assert_eq!(info.regions[0].name, "metadata");
    assert_eq!(info.regions[1].file_offset, MIB);
    assert_same("layout via qemu", &qemu_to_raw(&p, dir.path()), &want);

    // Header 1 damaged: header 2 is used.
    let mut bad = img.clone();
    bad[64 * 1024 + 200] ^= 0xff;
    let d = VhdxDisk::open_source(
        std::sync::Arc::new(bad),
        "h1bad",
        &VhdxOpenOptions::default(),
    )
    .unwrap();
    assert_eq!(d.info().current_header, 2);
    // Region table 1 damaged: table 2 is used.
    let mut bad = img.clone();
    bad[192 * 1024 + 20] ^= 0xff;
    let d = VhdxDisk::open_source(
        std::sync::Arc::new(bad),
        "rt1bad",
        &VhdxOpenOptions::default(),
    )
    .unwrap();
    assert_same("rt2", &read_all(&d, MIB as usize), &want);
    // Equal sequence numbers but different headers: no current header.
    let mut bad = img.clone();
    rewrite_headers(&mut bad, |i, h| {
        if i == 1 {
            h.data_write_guid = Guid::random();
        }
    });
    let e = VhdxDisk::open_source(std::sync::Arc::new(bad), "eq", &VhdxOpenOptions::default())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("both valid with sequence number 7 but differ"),
        "{e}"
    );
    // The larger sequence number wins.
    let mut two = img.clone();
    rewrite_headers(&mut two, |i, h| {
        h.sequence_number = if i == 0 { 3 } else { 4 }
    });
    let d = VhdxDisk::open_source(std::sync::Arc::new(two), "seq", &VhdxOpenOptions::default())
        .unwrap();
    assert_eq!((d.info().current_header, d.info().header_sequence), (2, 4));
}

/// base (1 MiB blocks) <- mid (4 MiB blocks, PARTIALLY_PRESENT, ZERO masking)
/// <- top (2 MiB blocks), as Hyper-V checkpoints stack them.
struct Chain {
    base: ImageBuilder,
    mid: ImageBuilder,
    top: ImageBuilder,
}

fn chain(r: &mut TestRng, dir: &Path, mid_abs: &str) -> Chain {
    let size = 48 * MIB;
    let mut base = ImageBuilder::new(size, MIB as u32, 512);
    for i in 0..48 {
        if i % 3 != 2 {
            base.set_block(i, BlockSpec::present(rand_block(r, MIB as usize)));
        }
    }
    let mut mid = ImageBuilder::new(size, 4 * MIB as u32, 512);
    mid.parent_locator = Some(vec![
        ("parent_linkage".into(), base.data_write_guid.to_string()),
        ("relative_path".into(), r".\base.vhdx".into()),
        (
            "absolute_win32_path".into(),
            r"\\?\C:\ClusterStorage\vms\base.vhdx".into(),
        ),
    ]);
    mid.set_block(0, BlockSpec::present(rand_block(r, 4 * MIB as usize)));
    mid.set_block(2, BlockSpec::state(PAYLOAD_BLOCK_ZERO)); // hides the parent
                                                            // Block 3: sectors 10..300 and 5000..5001 and the block's last sector present.
    let mut garbage = vec![0xEEu8; 4 * MIB as usize];
    r.fill(&mut garbage[10 * 512..300 * 512]);
    let first = 3 * 4 * MIB / 512;
    mid.set_block(3, BlockSpec::partial(garbage));
    mid.set_sectors_present(first + 10, 290);
    mid.set_sectors_present(first + 5000, 1);
    mid.set_sectors_present(first + 8191, 1);
    let mut top = ImageBuilder::new(size, 2 * MIB as u32, 512);
    top.parent_locator = Some(vec![
        ("parent_linkage".into(), mid.data_write_guid.to_string()),
        ("absolute_win32_path".into(), mid_abs.into()),
    ]);
    top.set_block(1, BlockSpec::present(rand_block(r, 2 * MIB as usize)));
    top.set_block(10, BlockSpec::state(PAYLOAD_BLOCK_UNMAPPED));
    let mut g = vec![0xEEu8; 2 * MIB as usize];
    r.fill(&mut g[..4096]);
    top.set_block(20, BlockSpec::partial(g));
    top.set_sectors_present(20 * 2 * MIB / 512, 8);
    let _ = dir;
    Chain { base, mid, top }
}

#[test]
fn differencing_chain_through_relative_and_absolute_paths() {
    let dir = tmp();
    let mut r = rng(14);
    let mid_abs = dir.path().join("mid.avhdx");
    let c = chain(&mut r, dir.path(), mid_abs.to_str().unwrap());
    write(dir.path(), "base.vhdx", &c.base.build());
    write(dir.path(), "mid.avhdx", &c.mid.build());
    let top = write(dir.path(), "top.avhdx", &c.top.build());
    let want = model(&[&c.top, &c.mid, &c.base]);
    let disk = open(&top).unwrap();
    assert!(disk.has_parent());
    assert_eq!(
        disk.parent_chain(),
        vec![mid_abs.clone(), dir.path().join("./base.vhdx")]
    );
    assert_same("chain", &read_all(&disk, 3 * MIB as usize), &want);
    assert_ranges_cover("chain", &disk.allocated_ranges(), &want);
    let info = disk.info();
    assert_eq!(info.parent_chain.len(), 2);
    assert_eq!(info.bat.partially_present, 1);
    assert_eq!(info.bat.sector_bitmaps_present, 1);
    // Block 2 of mid is ZERO: the base data under it must not show through.
    let mut b = vec![1u8; 4096];
    disk.read_at(8 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));

    // qemu does not read differencing VHDX: check that it says so.
    let (ok, msg) = try_run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        top.to_str().unwrap(),
        dir.path().join("x.raw").to_str().unwrap(),
    ]));
    assert!(!ok, "qemu now reads differencing VHDX? {msg}");
    // libvhdi is no oracle here: version 20210425 returns the parent's data
    // for every block of a VHDX differencing disk (even FULLY_PRESENT blocks
    // with every bitmap bit set), so chains are checked against `model`.
    // The same chain with top's locator relative instead of absolute:
    let mut top = c.top.clone();
    top.parent_locator = Some(vec![
        ("parent_linkage".into(), c.mid.data_write_guid.to_string()),
        ("relative_path".into(), r".\mid.avhdx".into()),
        ("absolute_win32_path".into(), r"\\?\C:\VMs\mid.avhdx".into()),
    ]);
    let top_rel = write(dir.path(), "top-rel.avhdx", &top.build());
    assert_same(
        "relative top",
        &read_all(&open(&top_rel).unwrap(), 3 * MIB as usize),
        &want,
    );
}

#[test]
fn moved_chain_found_through_path_map_and_search_dirs() {
    let dir = tmp();
    let mut r = rng(15);
    let c = chain(&mut r, dir.path(), r"\\?\D:\Hyper-V\app\mid.avhdx");
    let want = model(&[&c.top, &c.mid, &c.base]);
    let moved = dir.path().join("moved");
    std::fs::create_dir_all(moved.join("app")).unwrap();
    let other = dir.path().join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    // base is not next to mid any more: relative_path fails.
    std::fs::write(other.join("base.vhdx"), c.base.build()).unwrap();
    std::fs::write(moved.join("app/mid.avhdx"), c.mid.build()).unwrap();
    let top = write(dir.path(), "top.avhdx", &c.top.build());

    let e = open(&top).unwrap_err();
    assert!(matches!(e, Error::ParentNotFound { .. }), "{e}");
    assert!(e.to_string().contains("parent disk not found"), "{e}");

    let opts = VhdxOpenOptions::new()
        .map_parent_path(r"d:\hyper-v", &moved)
        .parent_search_dir(&other);
    let disk = VhdxDisk::open(&top, &opts).unwrap();
    assert_same("moved chain", &read_all(&disk, 2 * MIB as usize), &want);
    assert_eq!(disk.parent_chain()[1], other.join("base.vhdx"));
}

#[test]
fn parent_linkage_mismatch_is_refused() {
    let dir = tmp();
    let mut r = rng(16);
    let mid_abs = dir.path().join("mid.avhdx");
    let mut c = chain(&mut r, dir.path(), mid_abs.to_str().unwrap());
    let expected = c.base.data_write_guid;
    // The parent was written to after the child was made: new DataWriteGuid.
    c.base.data_write_guid = Guid::random();
    write(dir.path(), "base.vhdx", &c.base.build());
    let mid = write(dir.path(), "mid.avhdx", &c.mid.build());
    let e = open(&mid).unwrap_err();
    match &e {
        Error::ParentMismatch {
            expected: x, found, ..
        } => {
            assert_eq!(*x, expected.to_string());
            assert_eq!(*found, c.base.data_write_guid.to_string());
        }
        other => panic!("wanted ParentMismatch, got {other}"),
    }
    // parent_linkage2 is accepted as the alternative identity.
    c.mid
        .parent_locator
        .as_mut()
        .unwrap()
        .push(("parent_linkage2".into(), c.base.data_write_guid.to_string()));
    let mid = write(dir.path(), "mid.avhdx", &c.mid.build());
    open(&mid).unwrap();
}

#[test]
fn parent_chain_loops_and_size_mismatch() {
    let dir = tmp();
    // a -> b -> a.
    let mut a = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    let mut b = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    a.parent_locator = Some(vec![
        ("parent_linkage".into(), b.data_write_guid.to_string()),
        ("relative_path".into(), "b.avhdx".into()),
    ]);
    b.parent_locator = Some(vec![
        ("parent_linkage".into(), a.data_write_guid.to_string()),
        ("relative_path".into(), "a.avhdx".into()),
    ]);
    let pa = write(dir.path(), "a.avhdx", &a.build());
    write(dir.path(), "b.avhdx", &b.build());
    let e = open(&pa).unwrap_err();
    assert!(
        matches!(e, Error::ParentChain { .. }) && e.to_string().contains("loop"),
        "{e}"
    );
    // A disk that names itself as parent.
    let mut s = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    s.parent_locator = Some(vec![
        ("parent_linkage".into(), s.data_write_guid.to_string()),
        ("relative_path".into(), "self.avhdx".into()),
    ]);
    let ps = write(dir.path(), "self.avhdx", &s.build());
    assert!(open(&ps).unwrap_err().to_string().contains("loop"));
    // Parent of another size.
    let base = ImageBuilder::new(16 * MIB, MIB as u32, 512);
    let mut child = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    child.parent_locator = Some(vec![
        ("parent_linkage".into(), base.data_write_guid.to_string()),
        ("relative_path".into(), "big.vhdx".into()),
    ]);
    write(dir.path(), "big.vhdx", &base.build());
    let pc = write(dir.path(), "small.avhdx", &child.build());
    assert!(open(&pc).unwrap_err().to_string().contains("virtual size"));
    // Depth limit.
    let opts = VhdxOpenOptions {
        max_chain_depth: 1,
        ..Default::default()
    };
    let mid_abs = dir.path().join("mid.avhdx");
    let c = chain(&mut rng(1), dir.path(), mid_abs.to_str().unwrap());
    write(dir.path(), "base.vhdx", &c.base.build());
    write(dir.path(), "mid.avhdx", &c.mid.build());
    let e = VhdxDisk::open(&mid_abs, &opts).unwrap_err();
    assert!(e.to_string().contains("deeper"), "{e}");
}

fn sector(img: &[u8], off: u64) -> Vec<u8> {
    img[off as usize..off as usize + 4096].to_vec()
}

/// A file whose BAT and some data live only in a pending log: the final
/// image `f`, the "old" file on disk, and the log that turns one into the other.
fn pending_log_image(r: &mut TestRng) -> (ImageBuilder, Vec<u8>, Vec<u8>) {
    let mut b = ImageBuilder::new(32 * MIB, MIB as u32, 512);
    let mut d0 = rand_block(r, MIB as usize);
    d0[..8192].fill(0); // made zero by a zero descriptor
    b.set_block(0, BlockSpec::present(d0));
    b.set_block(1, BlockSpec::present(rand_block(r, MIB as usize)));
    b.set_block(2, BlockSpec::present(rand_block(r, MIB as usize)));
    b.set_block(5, BlockSpec::present(rand_block(r, MIB as usize)));
    b.log_guid = Guid::random();
    let f = b.build();
    let layout = b.layout();
    let bat = b.bat_offset;
    let mut old = f.clone();
    // On disk: blocks 2 and 5 not yet in the BAT, stale bytes in block 0 and 1.
    for blk in [2u64, 5] {
        let o = b.bat_entry_offset(blk) as usize;
        old[o..o + 8].fill(0);
    }
    let b0 = layout.block_offsets[&0];
    old[b0 as usize..b0 as usize + 8192].fill(0xEE);
    let b1 = layout.block_offsets[&1] + 12288;
    old[b1 as usize..b1 as usize + 4096].fill(0xEE);

    let size = f.len() as u64;
    let guid = b.log_guid;
    let e = |position, sequence, tail, descriptors| LogEntrySpec {
        position,
        sequence,
        tail,
        log_guid: guid,
        flushed_file_offset: size,
        last_file_offset: size,
        descriptors,
    };
    // Active sequence 7, 8, 9 from log offset 0.
    let e7 = e(
        0,
        7,
        0,
        vec![LogDescriptor::Data {
            file_offset: bat,
            sector: sector(&f, bat),
        }],
    );
    let l7 = log_entry_bytes(&e7).len() as u64;
    let e8 = e(
        l7,
        8,
        0,
        vec![LogDescriptor::Zero {
            file_offset: b0,
            length: 8192,
        }],
    );
    let l8 = log_entry_bytes(&e8).len() as u64;
    let e9 = e(
        l7 + l8,
        9,
        0,
        vec![LogDescriptor::Data {
            file_offset: b1,
            sector: sector(&f, b1),
        }],
    );
    // Stale, older sequence 3, 4 (same LogGuid) further on: replaying it
    // would drop block 1 from the BAT and scribble over block 2.
    let mut stale_bat = sector(&f, bat);
    stale_bat[8..16].fill(0);
    let b2 = layout.block_offsets[&2];
    let e3 = e(
        512 * 1024,
        3,
        512 * 1024,
        vec![LogDescriptor::Data {
            file_offset: bat,
            sector: stale_bat,
        }],
    );
    let l3 = log_entry_bytes(&e3).len() as u64;
    let e4 = e(
        512 * 1024 + l3,
        4,
        512 * 1024,
        vec![LogDescriptor::Data {
            file_offset: b2,
            sector: vec![0xAB; 4096],
        }],
    );
    // A newer entry of another log session (other LogGuid): ignored.
    let mut e100 = e(
        768 * 1024,
        100,
        768 * 1024,
        vec![LogDescriptor::Zero {
            file_offset: b2,
            length: MIB,
        }],
    );
    e100.log_guid = Guid::random();
    b.log_entries = vec![e7, e8, e9, e3, e4, e100];
    for en in &b.log_entries {
        place_log_entry(
            &mut old,
            b.log_offset,
            b.log_length as u64,
            en.position,
            &log_entry_bytes(en),
        );
    }
    let want = model(&[&b]);
    (b, old, want)
}

#[test]
fn pending_log_replayed_in_memory_matches_qemu_replay() {
    let dir = tmp();
    let mut r = rng(17);
    let (_b, old, want) = pending_log_image(&mut r);
    let p = write(dir.path(), "dirty.vhdx", &old);
    let disk = open(&p).unwrap();
    let info = disk.info();
    assert!(info.log.replayed);
    assert_eq!(info.log.entries_replayed, 3);
    assert_eq!(info.log.sequence_range, Some((7, 9)));
    let got = read_all(&disk, MIB as usize);
    assert_same("replayed in memory", &got, &want);
    assert_ranges_cover("replayed", &disk.allocated_ranges(), &want);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        old,
        "the reader modified the file"
    );

    // qemu refuses the dirty file read-only; `check -r all` replays a copy.
    let (ok, msg) = try_run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        p.to_str().unwrap(),
        dir.path().join("n.raw").to_str().unwrap(),
    ]));
    assert!(!ok && msg.contains("qemu-img check -r all"), "{msg}");
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&p, &copy).unwrap();
    let (_, chk) = try_run(Command::new("qemu-img").args([
        "check",
        "-r",
        "all",
        "-f",
        "vhdx",
        copy.to_str().unwrap(),
    ]));
    let qemu = qemu_to_raw(&copy, dir.path());
    assert_same(&format!("qemu replay ({chk})"), &qemu, &got);
    // And our reader on qemu's replayed copy sees no log any more.
    let d2 = open(&copy).unwrap();
    assert!(!d2.info().log.replayed);
    assert_same("qemu-replayed copy", &read_all(&d2, MIB as usize), &want);
}

#[test]
fn log_sequence_selection_rules() {
    let mut r = rng(18);
    let (b, old, want) = pending_log_image(&mut r);
    let name = "log";
    let opts = VhdxOpenOptions::default();
    let open_mem = |img: Vec<u8>| VhdxDisk::open_source(std::sync::Arc::new(img), name, &opts);

    // A torn newer entry (bad CRC) after the sequence: 7..9 is still active.
    let mut img = old.clone();
    let guid = b.log_guid;
    let size = old.len() as u64;
    let torn = LogEntrySpec {
        position: 3 * 8192,
        sequence: 10,
        tail: 0,
        log_guid: guid,
        flushed_file_offset: size,
        last_file_offset: size,
        descriptors: vec![LogDescriptor::Zero {
            file_offset: b.bat_offset,
            length: 4096,
        }],
    };
    let mut tb = log_entry_bytes(&torn);
    tb[100] ^= 1;
    place_log_entry(
        &mut img,
        b.log_offset,
        b.log_length as u64,
        torn.position,
        &tb,
    );
    let d = open_mem(img).unwrap();
    assert_eq!(d.info().log.sequence_range, Some((7, 9)));
    assert_same("torn head", &read_all(&d, MIB as usize), &want);

    // A newer head whose Tail points at garbage is not complete: skipped.
    let mut img = old.clone();
    let bad_tail = LogEntrySpec {
        tail: 256 * 1024,
        ..torn.clone()
    };
    place_log_entry(
        &mut img,
        b.log_offset,
        b.log_length as u64,
        bad_tail.position,
        &log_entry_bytes(&bad_tail),
    );
    let d = open_mem(img).unwrap();
    assert_eq!(d.info().log.sequence_range, Some((7, 9)));

    // A sequence that wraps around the end of the log.
    let mut b2 = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    b2.set_block(3, BlockSpec::present(vec![0x42; MIB as usize]));
    b2.log_guid = Guid::random();
    let f = b2.build();
    let mut img = f.clone();
    let bat_e = b2.bat_entry_offset(3) as usize;
    img[bat_e..bat_e + 8].fill(0);
    let l = b2.log_length as u64;
    let s = f.len() as u64;
    let w = LogEntrySpec {
        position: l - 4096,
        sequence: 40,
        tail: l - 4096,
        log_guid: b2.log_guid,
        flushed_file_offset: s,
        last_file_offset: s,
        descriptors: vec![LogDescriptor::Data {
            file_offset: b2.bat_offset,
            sector: sector(&f, b2.bat_offset),
        }],
    };
    place_log_entry(&mut img, b2.log_offset, l, w.position, &log_entry_bytes(&w));
    let d = open_mem(img).unwrap();
    assert_eq!(d.info().log.entries_replayed, 1);
    let mut buf = vec![0u8; 4096];
    d.read_at(3 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));

    // Only incomplete sequences: refused rather than guessed.
    let mut img = f.clone();
    img[bat_e..bat_e + 8].fill(0);
    let lone = LogEntrySpec {
        position: 0,
        tail: 8192,
        sequence: 5,
        ..w.clone()
    };
    place_log_entry(&mut img, b2.log_offset, l, 0, &log_entry_bytes(&lone));
    let e = open_mem(img).unwrap_err().to_string();
    assert!(e.contains("complete sequence"), "{e}");

    // FlushedFileOffset beyond the file: truncated.
    let mut img = f.clone();
    let tr = LogEntrySpec {
        position: 0,
        tail: 0,
        flushed_file_offset: s + MIB,
        ..w.clone()
    };
    place_log_entry(&mut img, b2.log_offset, l, 0, &log_entry_bytes(&tr));
    let e = open_mem(img).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    // LastFileOffset beyond the file: the file reads as extended with zeros;
    // the log allocates block 6 there.
    let mut img = f.clone();
    let mut bat_sector = sector(&f, b2.bat_offset);
    let i6 = (b2.bat_entry_offset(6) - b2.bat_offset) as usize;
    bat_sector[i6..i6 + 8].copy_from_slice(&(s | 6).to_le_bytes());
    let ext = LogEntrySpec {
        position: 0,
        tail: 0,
        last_file_offset: s + MIB,
        descriptors: vec![LogDescriptor::Data {
            file_offset: b2.bat_offset,
            sector: bat_sector,
        }],
        ..w.clone()
    };
    place_log_entry(&mut img, b2.log_offset, l, 0, &log_entry_bytes(&ext));
    let d = open_mem(img).unwrap();
    assert_eq!(d.info().bat.fully_present, 2);
    let mut buf = vec![1u8; MIB as usize];
    d.read_at(6 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    // Without LastFileOffset covering it, the same BAT entry points past EOF.
    let mut img = f.clone();
    let ext2 = LogEntrySpec {
        last_file_offset: s,
        ..ext.clone()
    };
    place_log_entry(&mut img, b2.log_offset, l, 0, &log_entry_bytes(&ext2));
    let e = open_mem(img).unwrap_err().to_string();
    assert!(
        e.contains("BAT entry 6") && e.contains("past end of file"),
        "{e}"
    );
}
