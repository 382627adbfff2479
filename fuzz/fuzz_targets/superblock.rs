#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::superblock`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::superblock(data));
