#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::btree_node`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::btree_node(data));
