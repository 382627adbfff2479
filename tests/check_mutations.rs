//! The strict checker finds damage and names the block: each test breaks one thing
//! in a clean engine-made pool and expects that exact problem, and no panic.

use thinpool::check::{check, CheckReport, ProblemKind};
use thinpool::format::checksum::{self, BlockKind};
use thinpool::format::node;
use thinpool::format::space_map as fsm;
use thinpool::format::superblock::Superblock;
use thinpool::io::{read_only_copy, CrashStorage};
use thinpool::thin::Metadata;

const B: usize = 4096;

/// A committed pool: device 0 with 600 mappings (an internal node), device 1 a
/// snapshot of it with changes, device 2 small.
fn image() -> Vec<u8> {
    let storage = CrashStorage::new(256);
    let img = storage.image.clone();
    let mut md = Metadata::format(Box::new(storage), 128, 5000).expect("format");
    md.create_thin(0).expect("thin");
    md.create_thin(2).expect("thin");
    for v in 0..600u64 {
        let b = md.alloc_data_block().expect("alloc").expect("space");
        md.insert_mapping(if v % 10 == 0 { 2 } else { 0 }, v, b).expect("map");
    }
    md.create_snap(1, 0).expect("snap");
    md.commit(&mut || Ok(())).expect("commit");
    for v in 0..50u64 {
        let b = md.alloc_data_block().expect("alloc").expect("space");
        md.insert_mapping(1, v * 3 + 1, b).expect("map");
    }
    md.commit(&mut || Ok(())).expect("commit");
    let durable = img.lock().expect("lock").durable.clone();
    durable.iter().flat_map(|b| b.iter().copied()).collect()
}

fn block(img: &[u8], b: u64) -> [u8; B] {
    let mut out = [0u8; B];
    out.copy_from_slice(&img[b as usize * B..(b as usize + 1) * B]);
    out
}

fn put(img: &mut [u8], b: u64, blk: &[u8; B]) {
    img[b as usize * B..(b as usize + 1) * B].copy_from_slice(blk);
}

fn sb(img: &[u8]) -> Superblock {
    Superblock::decode(&block(img, 0), 0).expect("superblock")
}

fn run(img: &[u8]) -> CheckReport {
    check(&read_only_copy(img)).expect("check runs")
}

/// Device `dev`'s bottom-level root, and its first leaf.
fn device_root_and_leaf(img: &[u8], dev: u64) -> (u64, u64) {
    let top = block(img, sb(img).data_mapping_root);
    let th = node::header(&top);
    let i = (0..th.nr_entries as usize).find(|&i| node::key(&top, i) == dev).expect("device in top-level leaf");
    let root = node::value_u64(&top, &th, i);
    let mut b = root;
    loop {
        let n = block(img, b);
        let h = node::header(&n);
        if h.is_leaf() {
            return (root, b);
        }
        b = node::value_u64(&n, &h, 0);
    }
}

fn problems(r: &CheckReport) -> Vec<String> {
    r.problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn the_unbroken_image_is_clean() {
    let r = run(&image());
    assert!(r.is_clean(), "{:?}", problems(&r));
    assert_eq!(r.stats.devices.len(), 3);
}

#[test]
fn a_flipped_byte_in_a_leaf_is_a_checksum_error_naming_the_block() {
    let mut img = image();
    let (_, leaf) = device_root_and_leaf(&img, 0);
    img[leaf as usize * B + 1000] ^= 0x40;
    let r = run(&img);
    assert!(
        r.problems
            .iter()
            .any(|p| p.block == Some(leaf) && matches!(p.kind, ProblemKind::Checksum { kind: BlockKind::Node, .. })),
        "{:?}",
        problems(&r)
    );
    assert!(r.to_owned().has_fatal());
}

#[test]
fn a_node_sealed_for_another_location_is_a_blocknr_error() {
    let mut img = image();
    let (_, leaf) = device_root_and_leaf(&img, 2);
    let mut blk = block(&img, leaf);
    checksum::seal(&mut blk, BlockKind::Node, leaf + 1);
    put(&mut img, leaf, &blk);
    let r = run(&img);
    assert!(
        r.problems.iter().any(
            |p| p.block == Some(leaf) && p.kind == ProblemKind::BlockNr { kind: BlockKind::Node, stored: leaf + 1 }
        ),
        "{:?}",
        problems(&r)
    );
}

#[test]
fn swapped_keys_are_a_key_order_error() {
    let mut img = image();
    let (_, leaf) = device_root_and_leaf(&img, 0);
    let mut blk = block(&img, leaf);
    let (k0, k1) = (node::key(&blk, 0), node::key(&blk, 1));
    node::set_key(&mut blk, 0, k1);
    node::set_key(&mut blk, 1, k0);
    checksum::seal(&mut blk, BlockKind::Node, leaf);
    put(&mut img, leaf, &blk);
    let r = run(&img);
    assert!(
        r.problems
            .iter()
            .any(|p| p.block == Some(leaf) && p.kind == ProblemKind::Node(node::NodeError::KeyOrder { index: 1 })),
        "{:?}",
        problems(&r)
    );
}

/// Set entry `b` of a space map's bitmap (first bitmap) to `v` and re-seal it.
fn bump_bitmap(img: &mut [u8], bitmap: u64, b: u64, v: u8) {
    let mut blk = block(img, bitmap);
    fsm::bitmap_set(&mut blk, b as usize, v);
    checksum::seal(&mut blk, BlockKind::Bitmap, bitmap);
    put(img, bitmap, &blk);
}

fn data_bitmap(img: &[u8]) -> u64 {
    let root = block(img, sb(img).data_sm_root.bitmap_root);
    let h = node::header(&root);
    assert!(h.is_leaf());
    fsm::IndexEntry::decode(node::value(&root, &h, 0)).blocknr
}

fn meta_bitmap(img: &[u8]) -> u64 {
    let loc = sb(img).metadata_sm_root.bitmap_root;
    fsm::index_decode(&block(img, loc), loc).expect("index")[0].blocknr
}

#[test]
fn a_data_count_for_an_unmapped_block_is_a_leak_naming_the_data_block() {
    let mut img = image();
    let bm = data_bitmap(&img);
    bump_bitmap(&mut img, bm, 4000, 1);
    let r = run(&img);
    assert!(
        r.problems.iter().any(|p| p.kind == ProblemKind::DataCount { data_block: 4000, expected: 0, on_disk: 1 }),
        "{:?}",
        problems(&r)
    );
    assert!(r.problems.iter().any(|p| matches!(p.kind, ProblemKind::NrAllocated { sm: "data", .. })));
}

#[test]
fn a_wrong_data_count_on_a_mapped_block_is_found() {
    let mut img = image();
    let bm = data_bitmap(&img);
    bump_bitmap(&mut img, bm, 645, 2);
    let r = run(&img);
    assert!(
        r.problems.iter().any(|p| p.kind == ProblemKind::DataCount { data_block: 645, expected: 1, on_disk: 2 }),
        "{:?}",
        problems(&r)
    );
}

#[test]
fn a_count_on_a_free_metadata_block_is_a_leak() {
    let mut img = image();
    let bm = meta_bitmap(&img);
    bump_bitmap(&mut img, bm, 250, 1);
    let r = run(&img);
    assert!(
        r.problems
            .iter()
            .any(|p| p.block == Some(250) && p.kind == ProblemKind::MetadataCount { expected: 0, on_disk: 1 }),
        "{:?}",
        problems(&r)
    );
    assert!(r.problems.iter().all(|p| !p.is_fatal() || matches!(p.kind, ProblemKind::NrAllocated { .. })));
}

#[test]
fn a_wrong_mapped_blocks_in_the_details_is_found() {
    let mut img = image();
    let root = sb(&img).device_details_root;
    let mut blk = block(&img, root);
    let h = node::header(&blk);
    assert!(h.is_leaf());
    let mut v = node::value(&blk, &h, 0).to_vec();
    v[0] = v[0].wrapping_add(1);
    node::set_value(&mut blk, &h, 0, &v);
    checksum::seal(&mut blk, BlockKind::Node, root);
    put(&mut img, root, &blk);
    let r = run(&img);
    assert!(
        r.problems.iter().any(|p| matches!(p.kind, ProblemKind::MappedBlocks { dev: 0, .. })),
        "{:?}",
        problems(&r)
    );
}

#[test]
fn an_internal_node_pointing_at_itself_is_a_cycle_not_a_hang() {
    let mut img = image();
    let (root, _) = device_root_and_leaf(&img, 0);
    let mut blk = block(&img, root);
    let h = node::header(&blk);
    assert!(!h.is_leaf(), "device 0 needs an internal root for this test");
    node::set_value_u64(&mut blk, &h, 1, root);
    checksum::seal(&mut blk, BlockKind::Node, root);
    put(&mut img, root, &blk);
    let r = run(&img);
    assert!(r.problems.iter().any(|p| p.block == Some(root) && p.kind == ProblemKind::Cycle), "{:?}", problems(&r));
}

#[test]
fn a_truncated_file_reports_references_past_the_end() {
    let img = image();
    let half = &img[..img.len() / 2];
    let r = run(half);
    assert!(!r.is_clean());
    assert!(
        r.problems.iter().any(|p| matches!(p.kind, ProblemKind::Index { .. } | ProblemKind::PastEnd { .. })),
        "{:?}",
        problems(&r)
    );
}

#[test]
fn flipping_any_byte_of_any_block_never_panics_and_is_always_noticed_in_live_blocks() {
    let img = image();
    let clean = run(&img);
    assert!(clean.is_clean());
    for b in 0..(img.len() / B) {
        for &off in &[0usize, 9, 20, 40, 300, 4095] {
            let mut m = img.clone();
            m[b * B + off] ^= 0x11;
            let r = std::panic::catch_unwind(|| run(&m));
            assert!(r.is_ok(), "checker panicked on block {b} offset {off}");
        }
    }
}

#[test]
fn a_damaged_details_tree_is_one_problem_not_one_per_device() {
    let mut img = image();
    let root = sb(&img).device_details_root;
    img[root as usize * B + 500] ^= 0x01;
    let r = run(&img);
    assert!(
        r.problems.iter().any(|p| p.block == Some(root) && matches!(p.kind, ProblemKind::Checksum { .. })),
        "{:?}",
        problems(&r)
    );
    assert!(!r.problems.iter().any(|p| matches!(p.kind, ProblemKind::DeviceSets { .. })), "{:?}", problems(&r));
}
