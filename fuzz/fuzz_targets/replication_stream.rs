#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::replication_stream`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::replication_stream(data));
