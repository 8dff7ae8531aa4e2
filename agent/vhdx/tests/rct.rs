//! Every rule of docs/changed-ranges.md for the changed-ranges file.
#![allow(clippy::single_range_in_vec_init)] // single ranges are the data here

use blockvault_vhdx::rct::{parse_changes, RctError};
use serde_json::{json, Value};

const SIZE: u64 = 137_438_953_472;

fn doc() -> Value {
    json!({"format": "hyperv-rct-changes", "version": 1,
        "vm_id": "5bfde23b-ce75-4303-b54f-6c18394f105c",
        "disk": {"path": "D:\\VMs\\app\\disk0.vhdx", "virtual_disk_id": "0e6a3c1e-0000-4000-8000-000000000001",
                 "virtual_size": SIZE, "logical_sector_size": 512},
        "limit_id": "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001",
        "new_rct_id": "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000002", "full": false,
        "queries": [
            {"byte_offset": 0, "byte_length": SIZE, "processed_byte_length": 68_719_476_736u64,
             "changed_byte_offsets": [8388608, 1048576, 1081344],
             "changed_byte_lengths": [4194304, 65536, 65536]},
            {"byte_offset": 68_719_476_736u64, "byte_length": 68_719_476_736u64, "processed_byte_length": 68_719_476_736u64,
             "changed_byte_offsets": [SIZE - 4096], "changed_byte_lengths": [4096]}]})
}

fn parse(v: &Value) -> Result<blockvault_vhdx::rct::ChangedRanges, RctError> {
    parse_changes(serde_json::to_vec(v).unwrap().as_slice())
}

fn rule(v: &Value) -> (&'static str, String) {
    let e = parse(v).unwrap_err();
    (e.rule(), e.to_string())
}

#[test]
fn valid_document_sorted_and_merged() {
    let c = parse(&doc()).unwrap();
    assert!(!c.full);
    assert_eq!(
        c.limit_id.as_deref(),
        Some("rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001")
    );
    // 1 MiB+64 KiB and 1 MiB+32 KiB.. overlap/touch -> merged; then sorted.
    assert_eq!(
        c.ranges,
        vec![1048576..1146880, 8388608..12582912, SIZE - 4096..SIZE]
    );
    assert_eq!(c.disk.virtual_size, SIZE);
    c.check_against(
        Some("rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"),
        SIZE,
    )
    .unwrap();
}

/// Windows PowerShell 5.1 writes UTF-8 with a byte-order mark: it is skipped.
#[test]
fn a_leading_utf8_byte_order_mark_is_skipped() {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(serde_json::to_vec(&doc()).unwrap());
    let c = parse_changes(&bytes).unwrap();
    assert_eq!(c, parse(&doc()).unwrap());
}

#[test]
fn arrays_of_unequal_length() {
    let mut v = doc();
    v["queries"][1]["changed_byte_lengths"] = json!([4096, 1]);
    let (r, m) = rule(&v);
    assert_eq!(r, "arrays-equal-length");
    assert!(m.contains("query 1"), "{m}");
}

#[test]
fn range_outside_virtual_size() {
    let mut v = doc();
    v["queries"][1]["changed_byte_offsets"] = json!([SIZE - 4096]);
    v["queries"][1]["changed_byte_lengths"] = json!([8192]);
    let (r, m) = rule(&v);
    assert_eq!(r, "range-inside-disk");
    assert!(m.contains("query 1 range 0"), "{m}");
    // Overflowing offset + length.
    v["queries"][1]["changed_byte_offsets"] = json!([u64::MAX]);
    v["queries"][1]["changed_byte_lengths"] = json!([2]);
    assert_eq!(rule(&v).0, "range-inside-disk");
}

#[test]
fn processed_spans_must_tile_the_disk() {
    // Gap.
    let mut v = doc();
    v["queries"][1]["byte_offset"] = json!(68_719_476_736u64 + 512);
    let (r, m) = rule(&v);
    assert_eq!(r, "processed-tiles-disk");
    assert!(m.contains("query 1"), "{m}");
    // Overlap.
    let mut v = doc();
    v["queries"][1]["byte_offset"] = json!(68_719_476_736u64 - 512);
    assert_eq!(rule(&v).0, "processed-tiles-disk");
    // Short of the end.
    let mut v = doc();
    v["queries"][1]["processed_byte_length"] = json!(1024);
    let (r, m) = rule(&v);
    assert_eq!(r, "processed-tiles-disk");
    assert!(m.contains("not the whole disk"), "{m}");
    // No queries at all for an incremental.
    let mut v = doc();
    v["queries"] = json!([]);
    assert_eq!(rule(&v).0, "processed-tiles-disk");
    // Not starting at 0.
    let mut v = doc();
    v["queries"][0]["byte_offset"] = json!(4096);
    assert_eq!(rule(&v).0, "processed-tiles-disk");
    // Processed more than asked.
    let mut v = doc();
    v["queries"][0]["processed_byte_length"] = json!(SIZE + 1);
    assert_eq!(rule(&v).0, "processed-within-query");
}

#[test]
fn full_true_or_null_limit_means_full() {
    let mut v = doc();
    v["full"] = json!(true);
    let c = parse(&v).unwrap();
    assert!(c.full);
    assert_eq!(c.ranges, vec![0..SIZE]);
    c.check_against(None, SIZE).unwrap();
    c.check_against(Some("anything"), SIZE).unwrap();

    let mut v = doc();
    v["limit_id"] = Value::Null;
    v["queries"] = json!([]); // a full needs no queries
    let c = parse(&v).unwrap();
    assert!(c.full && c.limit_id.is_none());
    assert_eq!(c.ranges, vec![0..SIZE]);

    let mut v = doc();
    v.as_object_mut().unwrap().remove("limit_id");
    assert!(parse(&v).unwrap().full);
    let mut v = doc();
    v["limit_id"] = json!("");
    assert_eq!(rule(&v).0, "limit-id");
}

#[test]
fn wrong_format_or_version() {
    let mut v = doc();
    v["format"] = json!("vmware-cbt");
    assert_eq!(rule(&v).0, "format");
    let mut v = doc();
    v["version"] = json!(2);
    let (r, m) = rule(&v);
    assert_eq!(r, "version");
    assert!(m.contains("version"), "{m}");
}

#[test]
fn malformed_json() {
    for bad in [&b"{"[..], b"", b"[]", b"{\"format\": 1}", b"null"] {
        let e = parse_changes(bad).unwrap_err();
        assert_eq!(e.rule(), "malformed-json", "{e}");
    }
    let mut v = doc();
    v["queries"][0]["changed_byte_offsets"] = json!(["1048576"]);
    assert_eq!(rule(&v).0, "malformed-json");
    let mut v = doc();
    v.as_object_mut().unwrap().remove("new_rct_id");
    assert_eq!(rule(&v).0, "malformed-json");
    let mut v = doc();
    v["disk"]["virtual_size"] = json!(-1);
    assert_eq!(rule(&v).0, "malformed-json");
    let mut v = doc();
    v["disk"]["virtual_size"] = json!(0);
    assert_eq!(rule(&v).0, "disk-size");
    let mut v = doc();
    v["new_rct_id"] = json!("");
    assert_eq!(rule(&v).0, "new-rct-id");
}

#[test]
fn chain_and_size_checks() {
    let c = parse(&doc()).unwrap();
    let e = c
        .check_against(Some("rctX:other:00000001"), SIZE)
        .unwrap_err();
    assert_eq!(e.rule(), "chain");
    assert!(e.to_string().contains("does not match"), "{e}");
    assert_eq!(c.check_against(None, SIZE).unwrap_err().rule(), "chain");
    let e = c
        .check_against(
            Some("rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"),
            SIZE - 512,
        )
        .unwrap_err();
    assert_eq!(e.rule(), "disk-size");
}

#[test]
fn zero_length_ranges_are_dropped_and_adjacent_merged() {
    let mut v = doc();
    v["queries"][0]["changed_byte_offsets"] = json!([0, 4096, 100, 8192]);
    v["queries"][0]["changed_byte_lengths"] = json!([4096, 4096, 0, 4096]);
    v["queries"][1]["changed_byte_offsets"] = json!([]);
    v["queries"][1]["changed_byte_lengths"] = json!([]);
    assert_eq!(parse(&v).unwrap().ranges, vec![0..12288]);
}
