#![no_main]
//! cargo fuzz target: see `thinpool::fuzzing::nbd_client_bytes`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| thinpool::fuzzing::nbd_client_bytes(data));
