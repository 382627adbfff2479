//! Opening damaged metadata never panics: the damage surfaces as a typed error that
//! names the block, at open for the structures open reads (superblock, space maps,
//! top-level and details trees) and at first use for a device's mapping tree.
//! And a full pool: NoSpace for the write, everything else keeps working.

mod common;

use thinpool::error::{MetaError, PoolError};
use thinpool::format::checksum::{self, BlockKind};
use thinpool::format::node;
use thinpool::format::superblock::Superblock;
use thinpool::io::CrashStorage;
use thinpool::thin::Metadata;

const B: usize = 4096;

fn image() -> Vec<u8> {
    let storage = CrashStorage::new(128);
    let img = storage.image.clone();
    let mut md = Metadata::format(Box::new(storage), 128, 4000).expect("format");
    md.create_thin(0).expect("thin");
    for v in 0..400u64 {
        let b = md.alloc_data_block().expect("alloc").expect("space");
        md.insert_mapping(0, v, b).expect("map");
    }
    md.commit(&mut || Ok(())).expect("commit");
    let blocks = img.lock().expect("lock").durable.clone();
    blocks.iter().flat_map(|b| b.iter().copied()).collect()
}

fn open(img: &[u8]) -> Result<Metadata, PoolError> {
    let blocks = img
        .chunks_exact(B)
        .map(|c| {
            let mut b = Box::new([0u8; B]);
            b.copy_from_slice(c);
            b
        })
        .collect();
    Metadata::open(Box::new(CrashStorage::from_blocks(blocks)), true)
}

fn corrupt_block(e: &PoolError) -> Option<u64> {
    match e {
        PoolError::Meta(MetaError::Corrupt { block, .. }) => Some(*block),
        _ => None,
    }
}

fn flip(img: &mut [u8], block: u64, off: usize) {
    img[block as usize * B + off] ^= 0x20;
}

fn sb(img: &[u8]) -> Superblock {
    let mut b = [0u8; B];
    b.copy_from_slice(&img[..B]);
    Superblock::decode(&b, 0).expect("superblock")
}

#[test]
fn damage_read_at_open_is_an_error_naming_the_block() {
    let clean = image();
    let s = sb(&clean);
    for (what, block) in [
        ("superblock", 0),
        ("metadata index", s.metadata_sm_root.bitmap_root),
        ("data index root", s.data_sm_root.bitmap_root),
        ("top-level tree", s.data_mapping_root),
        ("details tree", s.device_details_root),
        ("metadata ref-count tree", s.metadata_sm_root.ref_count_root),
    ] {
        let mut img = clean.clone();
        flip(&mut img, block, 200);
        let err = open(&img).err().unwrap_or_else(|| panic!("{what}: damaged metadata opened"));
        assert_eq!(corrupt_block(&err), Some(block), "{what}: {err}");
        assert!(err.to_string().contains(&format!("metadata block {block}")), "{what}: {err}");
    }
}

#[test]
fn damage_in_a_mapping_tree_is_reported_at_first_read_with_its_block() {
    let mut img = image();
    let top = sb(&img).data_mapping_root;
    let mut t = [0u8; B];
    t.copy_from_slice(&img[top as usize * B..(top as usize + 1) * B]);
    let h = node::header(&t);
    let root = node::value_u64(&t, &h, 0);
    // Make the device's root a node whose keys are out of order, correctly sealed.
    let mut r = [0u8; B];
    r.copy_from_slice(&img[root as usize * B..(root as usize + 1) * B]);
    let rh = node::header(&r);
    let leaf = if rh.is_leaf() { root } else { node::value_u64(&r, &rh, 0) };
    let mut l = [0u8; B];
    l.copy_from_slice(&img[leaf as usize * B..(leaf as usize + 1) * B]);
    node::set_key(&mut l, 0, u64::MAX);
    checksum::seal(&mut l, BlockKind::Node, leaf);
    img[leaf as usize * B..(leaf as usize + 1) * B].copy_from_slice(&l);
    let mut md = open(&img).expect("open reads no mapping tree");
    let err = md.lookup(0, 0).expect_err("a damaged leaf must not be used");
    assert_eq!(corrupt_block(&err), Some(leaf), "{err}");
    assert!(err.to_string().contains("keys out of order"), "{err}");
}

#[test]
fn truncated_or_garbage_metadata_is_refused_without_panicking() {
    let img = image();
    for len in [0, 100, B, 3 * B, img.len() / 2] {
        assert!(open(&img[..len - len % B]).is_err() || len >= img.len(), "length {len} opened");
    }
    let mut x = 7u32;
    let garbage: Vec<u8> = (0..64 * B)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    assert!(open(&garbage).is_err());
    let zeros = vec![0u8; 64 * B];
    let err = open(&zeros).expect_err("zeros are not a pool");
    assert!(err.to_string().contains("not formatted"), "{err}");
}

#[test]
fn a_full_pool_refuses_the_write_with_no_space_and_keeps_working() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 2 << 20, 8 * 65536);
    let mut p = thinpool::pool::Pool::create(m, d, 128).expect("create");
    p.create_thin(0).expect("thin");
    p.write(0, 0, &vec![1u8; 6 * 65536]).expect("fits");
    // Three more blocks do not fit in the two left: nothing of this write happens.
    let err = p.write(0, 6 * 65536, &vec![2u8; 3 * 65536]).expect_err("no space");
    assert!(matches!(err, PoolError::NoSpace { nr_blocks: 8 }), "{err}");
    let mut buf = vec![9u8; 3 * 65536];
    p.read(0, 6 * 65536, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0), "a refused write left data behind");
    assert_eq!(p.meta().status().data_used_blocks, 6);
    // Reads, overwrites in place and discards still work; freed space is reused.
    p.write(0, 100, b"still writable").expect("overwrite in place");
    p.discard(0, 0, 3 * 65536).expect("discard");
    p.write(0, 6 * 65536, &vec![3u8; 3 * 65536]).expect("space came back once the discard committed");
    p.commit().expect("commit");
    drop(p);
    common::assert_checks_pass(&dir.path().join("metadata"));
}
