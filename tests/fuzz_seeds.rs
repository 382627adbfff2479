//! Runs every fuzz-target body over the checked-in seed corpus (`fuzz/seeds/`),
//! and over deterministic mutations of each seed, so a plain `cargo test` catches a
//! panic or hang that `cargo fuzz` would.

use std::path::Path;

use thinpool::fuzzing;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {} missing: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("entry").path();
            (p.display().to_string(), std::fs::read(&p).expect("read seed"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

/// The seed, then copies with one byte changed at spread-out positions.
fn variants(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut v = vec![seed.to_vec()];
    if seed.is_empty() {
        return v;
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..48 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut m = seed.to_vec();
        let at = (x as usize) % m.len();
        m[at] ^= (x >> 32) as u8 | 1;
        v.push(m);
    }
    v
}

fn run(target: &str, f: fn(&[u8])) -> usize {
    let mut n = 0;
    for (name, seed) in seeds(target) {
        for input in variants(&seed) {
            let r = std::panic::catch_unwind(|| f(&input));
            assert!(r.is_ok(), "{target} panicked on a variant of {name}");
            n += 1;
        }
    }
    n
}

#[test]
fn superblock_target_survives_the_seed_corpus() {
    assert!(run("superblock", fuzzing::superblock) > 10);
}

#[test]
fn btree_node_target_survives_the_seed_corpus() {
    assert!(run("btree_node", fuzzing::btree_node) > 10);
}

#[test]
fn space_map_target_survives_the_seed_corpus() {
    assert!(run("space_map_blocks", fuzzing::space_map_blocks) > 10);
}

#[test]
fn open_pool_target_survives_the_seed_corpus() {
    assert!(run("open_pool", fuzzing::open_pool) > 10);
}

#[test]
fn the_unmutated_base_image_opens_and_audits_clean() {
    let img = fuzzing::base_image();
    let blocks: Vec<Box<[u8; 4096]>> = img
        .chunks_exact(4096)
        .map(|c| {
            let mut b = Box::new([0u8; 4096]);
            b.copy_from_slice(c);
            b
        })
        .collect();
    let mut md =
        thinpool::thin::Metadata::open(Box::new(thinpool::io::CrashStorage::from_blocks(blocks)), true).expect("opens");
    assert_eq!(md.device_ids(), vec![0, 1, 7]);
    thinpool::check::audit(&mut md).expect("audit");
}

#[test]
fn nbd_server_target_survives_the_seed_corpus() {
    assert!(run("nbd_client_bytes", fuzzing::nbd_client_bytes) > 10);
}

#[test]
fn xml_restore_target_survives_the_seed_corpus() {
    assert!(run("xml_restore", fuzzing::xml_restore) > 10);
}

#[test]
fn the_valid_xml_seeds_restore_and_the_broken_ones_do_not() {
    for (name, seed) in seeds("xml_restore") {
        let restored = fuzzing::xml_restore_in_memory(&seed).map(|(r, _, _)| (r.devices, r.mappings));
        if name.contains("broken") {
            assert_eq!(restored, None, "{name}");
        } else {
            assert!(restored.is_some(), "{name}");
        }
    }
}

#[test]
fn replication_stream_target_survives_the_seed_corpus() {
    assert!(run("replication_stream", fuzzing::replication_stream) > 10);
}

#[test]
fn the_valid_stream_seeds_read_and_the_broken_ones_do_not() {
    // The seeds are written by tools/make-stream-seeds.py from the documented byte
    // tables, independently of the Rust writer.
    for (name, seed) in seeds("replication_stream") {
        let broken = ["truncated", "overlap", "huge_claim"].iter().any(|b| name.ends_with(b));
        assert_eq!(fuzzing::replication_stream_records(&seed).is_none(), broken, "{name}");
    }
}
