#![no_main]
//! Handshake-phase bytes: client flags, option framing and option payload parsing.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockvault_nbd::fuzzing::option_stream(data);
});
