#![no_main]
//! Arbitrary bytes as a changed-ranges document.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = blockvault_vhdx::rct::parse_changes(data) {
        let _ = c.check_against(c.limit_id.as_deref(), c.disk.virtual_size);
    }
});
