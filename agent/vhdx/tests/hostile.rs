//! Hostile and damaged files: every case must give a clear error naming the
//! structure and offset — never a panic, never a silently wrong read.
#![allow(clippy::single_range_in_vec_init)] // single ranges are the data here

mod common;

use std::sync::Arc;

use blockvault_vhdx::testing::*;
use blockvault_vhdx::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const MD: usize = 2 << 20; // metadata region of the builder's default layout
const BAT: usize = 3 << 20;

fn base() -> ImageBuilder {
    let mut b = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    b.set_block(0, BlockSpec::present(vec![0x11; MIB as usize]));
    b.set_block(3, BlockSpec::present(vec![0x33; MIB as usize]));
    b
}

fn open(img: Vec<u8>) -> Result<VhdxDisk, Error> {
    VhdxDisk::open_source(Arc::new(img), "hostile.vhdx", &VhdxOpenOptions::default())
}

fn err(img: Vec<u8>) -> String {
    match open(img) {
        Ok(_) => panic!("hostile image opened"),
        Err(e) => e.to_string(),
    }
}

fn put(img: &mut [u8], at: usize, v: &[u8]) {
    img[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn baseline_opens() {
    let d = open(base().build()).unwrap();
    assert_eq!(d.allocated_ranges(), vec![0..MIB, 3 * MIB..4 * MIB]);
}

#[test]
fn truncated_files() {
    let img = base().build();
    for len in [
        0usize,
        7,
        4096,
        100_000,
        300_000,
        MD + 100,
        BAT + 8,
        img.len() - MIB as usize,
        img.len() - 1,
    ] {
        let e = err(img[..len].to_vec());
        assert!(
            e.contains("too short")
                || e.contains("past the end")
                || e.contains("past end of file")
                || e.contains("I/O error"),
            "truncated to {len}: {e}"
        );
    }
}

#[test]
fn damaged_headers() {
    let mut img = base().build();
    img[64 * 1024 + 100] ^= 1;
    img[128 * 1024 + 100] ^= 1;
    let e = err(img.clone());
    assert!(
        e.contains("header 1 at offset 65536: CRC-32C mismatch"),
        "{e}"
    );
    assert!(
        e.contains("header 2 at offset 131072: CRC-32C mismatch"),
        "{e}"
    );
    let mut img = base().build();
    put(&mut img, 0, b"vhdxfilX");
    assert!(err(img).contains("file type identifier at offset 0"));
    let mut img = base().build();
    rewrite_headers(&mut img, |_, h| h.version = 2);
    assert!(err(img).contains("Version 2"));
    let mut img = base().build();
    img[192 * 1024 + 50] ^= 1;
    img[256 * 1024 + 50] ^= 1;
    let e = err(img);
    assert!(
        e.contains("region table 1 at offset 196608: CRC-32C mismatch"),
        "{e}"
    );
}

#[test]
fn bat_entries_pointing_outside() {
    let b = base();
    let len = b.build().len() as u64;
    let entry = |img: &mut Vec<u8>, block: u64, v: u64| {
        let o = b.bat_entry_offset(block) as usize;
        img[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    let mut img = b.build();
    entry(&mut img, 5, len | 6);
    let e = err(img);
    assert!(
        e.contains(&format!("BAT entry 5 at offset {}", BAT + 40))
            && e.contains("points past end of file"),
        "{e}"
    );
    let mut img = b.build();
    entry(&mut img, 5, (1u64 << 63) | 6);
    assert!(err(img).contains("past end of file"));
    let mut img = b.build();
    entry(&mut img, 5, 6); // offset 0: the header section
    assert!(err(img).contains("overlaps the header section"));
    let mut img = b.build();
    entry(&mut img, 5, BAT as u64 | 6);
    assert!(err(img).contains("overlaps the BAT region"));
    let mut img = b.build();
    let first = u64::from_le_bytes(img[BAT..BAT + 8].try_into().unwrap());
    entry(&mut img, 6, first); // two blocks at one place
    assert!(err(img).contains("overlaps the block of BAT entry 0"));
    let mut img = b.build();
    entry(&mut img, 2, 4 | (5 << 20)); // reserved state
    assert!(err(img).contains("reserved payload block state 4"));
    let mut img = b.build();
    entry(&mut img, 2, 7 | (5 << 20)); // PARTIALLY_PRESENT, no parent
    assert!(err(img).contains("PARTIALLY_PRESENT in a disk without parent"));
}

fn set_region(img: &mut [u8], i: usize, off: u64, len: u32, required: u32) {
    for t in [192 * 1024usize, 256 * 1024] {
        let o = t + 16 + i * 32;
        put(img, o + 16, &off.to_le_bytes());
        put(img, o + 24, &len.to_le_bytes());
        put(img, o + 28, &required.to_le_bytes());
    }
    reseal(img);
}

#[test]
fn bad_regions() {
    // Entry 0 is the BAT, entry 1 the metadata region.
    let mut img = base().build();
    set_region(&mut img, 1, 3 * MIB, MIB as u32, 1);
    let e = err(img);
    assert!(e.contains("overlaps"), "{e}");
    let mut img = base().build();
    set_region(&mut img, 0, 64 * MIB, MIB as u32, 1);
    assert!(err(img).contains("extends past the end"));
    let mut img = base().build();
    set_region(&mut img, 0, 3 * MIB + 4096, MIB as u32, 1);
    assert!(err(img).contains("not 1 MiB aligned"));
    let mut img = base().build();
    set_region(&mut img, 0, 3 * MIB, 0, 1);
    assert!(err(img).contains("not 1 MiB aligned"));
    // The log overlapping the metadata region.
    let mut img = base().build();
    rewrite_headers(&mut img, |_, h| h.log_offset = 2 * MIB);
    assert!(err(img).contains("overlaps"));
    // Unknown required region.
    let mut img = base().build();
    for t in [192 * 1024usize, 256 * 1024] {
        put(&mut img, t + 8, &3u32.to_le_bytes());
        let o = t + 16 + 64;
        put(&mut img, o, &Guid::random().0);
        put(&mut img, o + 16, &(5 * MIB).to_le_bytes());
        put(&mut img, o + 24, &(MIB as u32).to_le_bytes());
        put(&mut img, o + 28, &1u32.to_le_bytes());
    }
    reseal(&mut img);
    assert!(err(img).contains("unknown required region"));
    // Absurd entry count.
    let mut img = base().build();
    put(&mut img, 192 * 1024 + 8, &5000u32.to_le_bytes());
    put(&mut img, 256 * 1024 + 8, &5000u32.to_le_bytes());
    reseal(&mut img);
    assert!(err(img).contains("entry count 5000 exceeds"));
    // No BAT region at all.
    let mut img = base().build();
    put(&mut img, 192 * 1024 + 8, &1u32.to_le_bytes());
    put(&mut img, 256 * 1024 + 8, &1u32.to_le_bytes());
    reseal(&mut img);
    assert!(err(img).contains("no metadata region"));
}

#[test]
fn bad_metadata() {
    // Items: 0 File Parameters, 1 Virtual Disk Size, 2 ID, 3 logical, 4 physical.
    let item = |i: usize| MD + 32 + i * 32;
    let value = |img: &[u8], i: usize| {
        let o = u32::from_le_bytes(img[item(i) + 16..item(i) + 20].try_into().unwrap());
        MD + o as usize
    };
    let mut img = base().build();
    put(&mut img, MD, b"metadatX");
    assert!(err(img).contains("signature is not \"metadata\""));
    let mut img = base().build();
    put(&mut img, MD + 10, &60000u16.to_le_bytes());
    assert!(err(img).contains("entry count 60000 exceeds"));
    let mut img = base().build();
    let v = value(&img, 0);
    put(&mut img, v, &(3 * MIB as u32).to_le_bytes());
    assert!(err(img).contains("BlockSize 3145728"));
    let mut img = base().build();
    let v = value(&img, 1);
    put(&mut img, v, &(1u64 << 62).to_le_bytes());
    assert!(err(img).contains("VirtualDiskSize"));
    let mut img = base().build();
    let v = value(&img, 1);
    put(&mut img, v, &(60 * (1u64 << 40)).to_le_bytes());
    // A 60 TiB disk needs a 480 MiB BAT; the region has 1 MiB.
    assert!(err(img).contains("the disk needs"));
    let mut img = base().build();
    let v = value(&img, 3);
    put(&mut img, v, &1024u32.to_le_bytes());
    assert!(err(img).contains("neither 512 nor 4096"));
    let mut img = base().build();
    put(&mut img, item(3) + 16, &(2 * MIB as u32).to_le_bytes());
    assert!(err(img).contains("outside the metadata region"));
    let mut img = base().build();
    put(&mut img, item(3), &Guid::random().0); // logical sector size item gone
    put(&mut img, item(3) + 24, &0u32.to_le_bytes());
    assert!(err(img).contains("required item Logical Sector Size is missing"));
    let mut img = base().build();
    put(&mut img, item(2), &Guid::random().0);
    put(&mut img, item(2) + 24, &4u32.to_le_bytes()); // unknown, IsRequired
    assert!(err(img).contains("unsupported: unknown required metadata item"));
    let mut img = base().build();
    let id3 = img[item(3)..item(3) + 16].to_vec();
    put(&mut img, item(4), &id3);
    assert!(err(img).contains("listed twice"));
}

#[test]
fn bad_parent_locators() {
    let mut b = base();
    b.parent_locator = Some(vec![("parent_linkage".into(), "not a guid".into())]);
    assert!(err(b.build()).contains("is not a GUID"));
    b.parent_locator = Some(vec![("relative_path".into(), "x.vhdx".into())]);
    assert!(err(b.build()).contains("parent_linkage is missing"));
    b.parent_locator = Some(vec![
        ("parent_linkage".into(), Guid::random().to_string()),
        ("relative_path".into(), "nowhere.vhdx".into()),
    ]);
    let e = open(b.build()).unwrap_err();
    assert!(matches!(e, Error::ParentNotFound { .. }), "{e}");
    // Key offsets pointing outside the item.
    let img = b.build();
    let mut bad = img.clone();
    let at = (0..img.len() - 16)
        .find(|&i| img[i..i + 16] == blockvault_vhdx::testing::parent_locator_bytes(&[])[..16])
        .unwrap();
    put(&mut bad, at + 20, &0xFFFF_0000u32.to_le_bytes());
    assert!(err(bad).contains("outside the item"));
    // A locator item longer than any real one (inside the region): refused before it is read.
    let mut bad = img.clone();
    let entry = (MD + 32..MD + 32 + 32 * 8)
        .step_by(32)
        .find(|&e| img[e + 16..e + 20] == ((at - MD) as u32).to_le_bytes())
        .expect("the parent locator's entry");
    put(&mut bad, entry + 20, &(128u32 << 10).to_le_bytes());
    let e = err(bad);
    assert!(e.contains("length 131072 is longer than 65536"), "{e}");
}

#[test]
fn bad_logs() {
    let mut b = base();
    b.log_guid = Guid::random();
    let mut img = b.build();
    rewrite_headers(&mut img, |_, h| h.log_offset = 64 * MIB);
    assert!(err(img).contains("past the end"));
    let mut img = b.build();
    rewrite_headers(&mut img, |_, h| h.log_length = 4096);
    assert!(err(img).contains("LogLength 4096"));
    // LogGuid set but no entry carries it: nothing to replay.
    let d = open(b.build()).unwrap();
    assert!(!d.info().log.replayed);
    // An entry writing into the headers is refused.
    let size = b.build().len() as u64;
    b.log_entries = vec![LogEntrySpec {
        position: 0,
        sequence: 1,
        tail: 0,
        log_guid: b.log_guid,
        flushed_file_offset: size,
        last_file_offset: size,
        descriptors: vec![LogDescriptor::Zero {
            file_offset: 64 * 1024,
            length: 4096,
        }],
    }];
    assert!(err(b.build()).contains("inside the file identifier or headers"));
    // No log (LogGuid zero) but a log span at the top of the address space: it overlaps
    // nothing and the disk opens; checking it must not overflow.
    let mut img = base().build();
    rewrite_headers(&mut img, |_, h| {
        h.log_offset = 0xFFFF_FFFF_FFF0_0000;
        h.log_length = MIB as u32;
    });
    let d = open(img).unwrap();
    assert!(!d.info().log.replayed);
    // An absurd zero length.
    b.log_entries[0].descriptors = vec![LogDescriptor::Zero {
        file_offset: 4 * MIB,
        length: 1 << 50,
    }];
    assert!(err(b.build()).contains("past LastFileOffset"));
}

/// A log with an entry header claiming the whole log at every 4 KiB: each would be checksummed
/// over the whole log (16 GiB of work for this 8 MiB log). It is refused once four times the
/// log has been checked.
#[test]
fn a_log_of_overlapping_headers_is_refused_in_bounded_time() {
    let mut b = base();
    b.log_guid = Guid::random();
    b.log_length = 8 * MIB as u32;
    b.metadata_offset = 9 * MIB;
    b.bat_offset = 10 * MIB;
    let mut img = b.build();
    let log_len = 8 * MIB as usize;
    for pos in (0..log_len).step_by(4096) {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(b"loge");
        h[8..12].copy_from_slice(&(log_len as u32).to_le_bytes());
        h[16..24].copy_from_slice(&1u64.to_le_bytes());
        h[32..48].copy_from_slice(&b.log_guid.0);
        put(&mut img, MIB as usize + pos, &h);
    }
    let e = err(img);
    assert!(e.contains("more than 4 times the log's"), "{e}");
}

#[test]
fn reads_out_of_range() {
    let d = open(base().build()).unwrap();
    let mut b = [0u8; 16];
    assert!(matches!(
        d.read_at(8 * MIB - 8, &mut b),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read_at(u64::MAX - 4, &mut b),
        Err(Error::OutOfRange { .. })
    ));
    d.read_at(8 * MIB - 16, &mut b).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    /// Random damage to the structures never panics (the fuzz entry point).
    #[test]
    fn random_damage_never_panics(flips in prop::collection::vec((0usize..(4 << 20), any::<u8>()), 1..40)) {
        let mut img = base().build();
        img.truncate(4 << 20 | 4096);
        for (at, v) in flips {
            let at = at % img.len();
            img[at] ^= v;
        }
        reseal(&mut img);
        blockvault_vhdx::fuzz_open_bytes(&img);
    }
}
