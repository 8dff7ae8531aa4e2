//! VHDX files qemu cannot make (differencing chains, a pending log), built with the agent's test
//! image builder and taken through `disk info`, `backup` and `restore export`.

use blockvault_agent::vhdx::testing::{
    log_entry_bytes, place_log_entry, BlockSpec, ImageBuilder, LogDescriptor, LogEntrySpec,
};
use blockvault_agent::vhdx::Guid;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Exports disk `d` of the only point and returns its bytes.
fn exported(w: &World, point: &str) -> Vec<u8> {
    let out = w.path("out.raw");
    w.export(point, "d", &out);
    std::fs::read(out).unwrap()
}

#[test]
fn differencing_disk_with_a_moved_parent() {
    let w = World::with_repo("64KiB");
    let parents = w.path("parents");
    std::fs::create_dir_all(&parents).unwrap();
    let mut base = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    base.set_block(0, BlockSpec::present(vec![0x11; MIB as usize]));
    base.set_block(2, BlockSpec::present(vec![0x12; MIB as usize]));
    std::fs::write(parents.join("base.vhdx"), base.build()).unwrap();
    let mut child = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    child.parent_locator = Some(vec![
        ("parent_linkage".into(), base.data_write_guid.to_string()),
        (
            "absolute_win32_path".into(),
            r"C:\VMs\gone\base.vhdx".into(),
        ),
    ]);
    child.set_block(2, BlockSpec::present(vec![0x22; MIB as usize]));
    let c = w.path("child.avhdx");
    std::fs::write(&c, child.build()).unwrap();
    let map = format!(r"C:\VMs\gone={}", parents.display());

    let out = w.run(&["disk", "info", c.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("parent disk not found"),
        "{}",
        stderr(&out)
    );

    let info = w.json(&[
        "disk",
        "info",
        c.to_str().unwrap(),
        "--parent-path-map",
        &map,
    ]);
    assert_eq!(info["has_parent"], true);
    let chain = info["parent_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 1);
    assert!(chain[0].as_str().unwrap().ends_with("base.vhdx"), "{info}");

    let spec = format!("d={}", c.display());
    let p = w.json(&[
        "backup",
        "--vm",
        "v",
        "--disk",
        &spec,
        "--parent-path-map",
        &map,
    ]);
    let data = exported(&w, p["point"].as_str().unwrap());
    let mut want = vec![0u8; 8 * MIB as usize];
    want[..MIB as usize].fill(0x11);
    want[2 * MIB as usize..3 * MIB as usize].fill(0x22);
    assert!(
        data == want,
        "the child's block hides its parent's, the rest reads through"
    );
}

#[test]
fn pending_log_is_replayed_in_memory() {
    let w = World::with_repo("64KiB");
    let mut b = ImageBuilder::new(8 * MIB, MIB as u32, 512);
    b.set_block(3, BlockSpec::present(vec![0x42; MIB as usize]));
    b.log_guid = Guid::random();
    let f = b.build();
    // The BAT on disk lacks block 3; only the log's copy of the BAT sector has it.
    let mut img = f.clone();
    let e = b.bat_entry_offset(3) as usize;
    img[e..e + 8].fill(0);
    let at = b.bat_offset as usize;
    let entry = LogEntrySpec {
        position: 0,
        sequence: 40,
        tail: 0,
        log_guid: b.log_guid,
        flushed_file_offset: f.len() as u64,
        last_file_offset: f.len() as u64,
        descriptors: vec![LogDescriptor::Data {
            file_offset: b.bat_offset,
            sector: f[at..at + 4096].to_vec(),
        }],
    };
    place_log_entry(
        &mut img,
        b.log_offset,
        b.log_length as u64,
        0,
        &log_entry_bytes(&entry),
    );
    let path = w.path("logged.vhdx");
    std::fs::write(&path, &img).unwrap();

    let info = w.json(&["disk", "info", path.to_str().unwrap()]);
    assert_eq!(info["log"]["replayed"], true, "{info}");
    assert_eq!(info["log"]["entries_replayed"], 1);
    assert_eq!(info["bat"]["fully_present"], 1);

    let spec = format!("d={}", path.display());
    let p = w.json(&["backup", "--vm", "v", "--disk", &spec]);
    let data = exported(&w, p["point"].as_str().unwrap());
    let mut want = vec![0u8; 8 * MIB as usize];
    want[3 * MIB as usize..4 * MIB as usize].fill(0x42);
    assert!(data == want);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        img,
        "reading must not write the file"
    );
}
