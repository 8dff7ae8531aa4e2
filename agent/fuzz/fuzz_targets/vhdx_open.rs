#![no_main]
//! Arbitrary bytes as a VHDX file (raw, or a sparse image description),
//! opened from memory and read end to end.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockvault_vhdx::fuzz_vhdx_input(data);
});
