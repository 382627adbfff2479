#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::open_pool`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::open_pool(data));
