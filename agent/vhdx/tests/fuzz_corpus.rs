//! Runs the committed fuzz corpus (agent/fuzz/corpus) through the fuzz
//! targets' entry points, so every seed and every crasher found so far is a
//! regression test in CI. `write_seed_corpus` (ignored) regenerates seeds.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockvault_vhdx::testing::*;
use blockvault_vhdx::*;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn vhdx_corpus_runs_clean() {
    let files = corpus("vhdx_open");
    assert!(files.len() >= 8, "seed corpus missing");
    let mut opened = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        assert!(
            data.len() < 100 * 1024,
            "{} is too large for the corpus",
            f.display()
        );
        fuzz_vhdx_input(&data);
        let name = f.file_name().unwrap().to_string_lossy();
        if name.starts_with("ok-") {
            // Valid seeds must stay valid, or the fuzzer starts from nothing.
            let img = if data.starts_with(b"vhdxfile") {
                data.clone()
            } else {
                decode_sparse(&data)
            };
            VhdxDisk::open_source(Arc::new(img), &name, &VhdxOpenOptions::default())
                .unwrap_or_else(|e| panic!("seed {name} no longer opens: {e}"));
            opened += 1;
        }
    }
    assert!(opened >= 5);
}

#[test]
fn rct_corpus_runs_clean() {
    let files = corpus("rct_parse");
    assert!(files.len() >= 4, "seed corpus missing");
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Ok(c) = blockvault_vhdx::rct::parse_changes(&data) {
            let _ = c.check_against(c.limit_id.as_deref(), c.disk.virtual_size);
        }
    }
}

#[test]
fn sparse_encoding_round_trips() {
    let mut b = ImageBuilder::new(8 << 20, 1 << 20, 512);
    b.set_block(2, BlockSpec::present(vec![7; 100]));
    let img = b.build();
    let enc = encode_sparse(&img);
    assert!(enc.len() < 20 * 1024, "{}", enc.len());
    assert_eq!(decode_sparse(&enc), img);
    assert!(decode_sparse(&[1, 2]).is_empty());
    let _ = decode_sparse(&[255, 255, 255, 255, 0, 0, 0, 0, 255, 255, 1]);
}

fn small_block(seed: u8) -> Vec<u8> {
    (0..64u8).map(|i| i.wrapping_mul(seed) | 1).collect()
}

/// Regenerates the seed corpus: `BV_WRITE_CORPUS=1 cargo test -p
/// blockvault-agent --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    if std::env::var("BV_WRITE_CORPUS").is_err() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let vd = root.join("vhdx_open");
    std::fs::create_dir_all(&vd).unwrap();
    let save = |name: &str, img: &[u8]| {
        let enc = encode_sparse(img);
        assert!(enc.len() < 100 * 1024, "{name}: {}", enc.len());
        std::fs::write(vd.join(name), enc).unwrap();
    };
    const MIB: u64 = 1 << 20;
    let mut b = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    b.set_block(0, BlockSpec::present(small_block(3)));
    b.set_block(5, BlockSpec::present(small_block(5)));
    b.set_block(6, BlockSpec::state(PAYLOAD_BLOCK_ZERO));
    b.set_block(7, BlockSpec::state(PAYLOAD_BLOCK_UNMAPPED));
    save("ok-dynamic", &b.build());

    let mut l = ImageBuilder::new(6 * MIB, 2 * MIB as u32, 4096);
    l.set_block(1, BlockSpec::present(small_block(7)));
    save("ok-4k-sectors", &l.build());

    let mut u = b.clone();
    u.log_offset = 6 * MIB;
    u.bat_offset = MIB;
    u.metadata_offset = 4 * MIB;
    u.regions_reversed = true;
    u.metadata_items_reversed = true;
    u.header_sequences = [9, 9];
    save("ok-layout", &u.build());

    // Pending log: two entries, BAT sector and a zero descriptor.
    let mut p = b.clone();
    p.log_guid = Guid::random();
    let f = p.build();
    let size = f.len() as u64;
    let bat = p.bat_offset;
    let mut bat_sector = f[bat as usize..bat as usize + 4096].to_vec();
    bat_sector[8 * 3..8 * 3 + 8].copy_from_slice(&(2u64).to_le_bytes());
    let e1 = LogEntrySpec {
        position: 0,
        sequence: 5,
        tail: 0,
        log_guid: p.log_guid,
        flushed_file_offset: size,
        last_file_offset: size,
        descriptors: vec![LogDescriptor::Data {
            file_offset: bat,
            sector: bat_sector,
        }],
    };
    let l1 = log_entry_bytes(&e1).len() as u64;
    let e2 = LogEntrySpec {
        position: l1,
        sequence: 6,
        descriptors: vec![LogDescriptor::Zero {
            file_offset: p.layout().block_offsets[&0],
            length: 4096,
        }],
        ..e1.clone()
    };
    p.log_entries = vec![e1, e2];
    save("ok-pending-log", &p.build());

    // Differencing disk whose parent cannot be found, with a PARTIALLY_PRESENT block.
    let mut d = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    d.parent_locator = Some(vec![
        ("parent_linkage".into(), Guid::random().to_string()),
        ("relative_path".into(), r"..\base.vhdx".into()),
        ("absolute_win32_path".into(), r"\\?\C:\VMs\base.vhdx".into()),
    ]);
    d.set_block(1, BlockSpec::partial(small_block(9)));
    d.set_sectors_present(2048, 16);
    save("diff-no-parent", &d.build());

    // Broken variants that exercise error paths.
    let mut img = b.build();
    img[64 * 1024 + 10] ^= 1;
    save("header1-bad-crc", &img);
    let mut img = b.build();
    img[(3 * MIB) as usize + 8 * 2..(3 * MIB) as usize + 8 * 3]
        .copy_from_slice(&((64 * MIB) | 6).to_le_bytes());
    save("bat-past-eof", &img);

    // qemu-made images.
    let dir = common::tmp();
    for (name, opts, io) in [
        (
            "ok-qemu-dynamic",
            "subformat=dynamic,block_size=1M",
            "write -P 0x61 1M 512",
        ),
        (
            "ok-qemu-fixed",
            "subformat=fixed,block_size=1M,block_state_zero=on",
            "write -P 0x62 0 512",
        ),
    ] {
        let pth = dir.path().join(name);
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            opts,
            pth.to_str().unwrap(),
            "4M",
        ]);
        common::run(std::process::Command::new("qemu-io").args([
            "-f",
            "vhdx",
            "-c",
            io,
            pth.to_str().unwrap(),
        ]));
        save(name, &std::fs::read(&pth).unwrap());
    }

    let rd = root.join("rct_parse");
    std::fs::create_dir_all(&rd).unwrap();
    let docs = [
        (
            "ok-incremental.json",
            r#"{"format":"hyperv-rct-changes","version":1,"vm_id":"vm","disk":{"path":"D:\\d.vhdx","virtual_disk_id":"x","virtual_size":1073741824,"logical_sector_size":512},"limit_id":"rctX:1","new_rct_id":"rctX:2","full":false,"queries":[{"byte_offset":0,"byte_length":1073741824,"processed_byte_length":536870912,"changed_byte_offsets":[0,4096],"changed_byte_lengths":[4096,65536]},{"byte_offset":536870912,"byte_length":536870912,"processed_byte_length":536870912,"changed_byte_offsets":[],"changed_byte_lengths":[]}]}"#,
        ),
        (
            "ok-full.json",
            r#"{"format":"hyperv-rct-changes","version":1,"vm_id":"vm","disk":{"path":"d","virtual_size":4096},"limit_id":null,"new_rct_id":"rctX:1","full":true,"queries":[]}"#,
        ),
        (
            "gap.json",
            r#"{"format":"hyperv-rct-changes","version":1,"vm_id":"vm","disk":{"path":"d","virtual_size":8192},"limit_id":"a","new_rct_id":"b","full":false,"queries":[{"byte_offset":4096,"byte_length":4096,"processed_byte_length":4096,"changed_byte_offsets":[4096],"changed_byte_lengths":[1]}]}"#,
        ),
        (
            "unequal.json",
            r#"{"format":"hyperv-rct-changes","version":1,"vm_id":"vm","disk":{"path":"d","virtual_size":8192},"limit_id":"a","new_rct_id":"b","full":false,"queries":[{"byte_offset":0,"byte_length":8192,"processed_byte_length":8192,"changed_byte_offsets":[0,1],"changed_byte_lengths":[1]}]}"#,
        ),
        (
            "malformed.json",
            r#"{"format":"hyperv-rct-changes","version":1,"#,
        ),
    ];
    for (n, d) in docs {
        std::fs::write(rd.join(n), d).unwrap();
    }
}
