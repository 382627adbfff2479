#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::space_map_blocks`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::space_map_blocks(data));
