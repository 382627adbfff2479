#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::xml_restore`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::xml_restore(data));
