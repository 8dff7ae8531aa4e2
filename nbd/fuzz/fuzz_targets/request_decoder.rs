#![no_main]
//! Transmission-phase bytes: request framing, validation and reply normalization.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockvault_nbd::fuzzing::request_stream(data);
});
