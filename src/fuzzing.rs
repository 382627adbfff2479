//! Fuzz-target bodies, kept in the library so that `cargo test` runs them over the
//! checked-in seed corpus (`fuzz/seeds/`) and `cargo fuzz` (in `fuzz/`) explores from
//! there. Each function takes arbitrary bytes and must neither panic nor hang.

use std::sync::OnceLock;

use crate::format::checksum::{self, BlockKind};
use crate::format::space_map as fsm;
use crate::format::superblock::Superblock;
use crate::format::{node, Block, BLOCK_SIZE};
use crate::io::CrashStorage;
use crate::thin::Metadata;

fn block_of(data: &[u8]) -> Box<Block> {
    let mut b = crate::format::zeroed_block();
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    b
}

/// Decode a superblock; a valid one must survive an encode/decode round trip.
pub fn superblock(data: &[u8]) {
    let b = block_of(data);
    if let Ok(sb) = Superblock::decode(&b, 0) {
        let again = Superblock::decode(&sb.encode(0), 0);
        assert_eq!(again.as_ref().ok(), Some(&sb), "superblock round trip");
    }
}

/// Validate a B-tree node for every value size the pool uses; a valid node's keys
/// and values must all be readable and its lookups consistent.
pub fn btree_node(data: &[u8]) {
    let b = block_of(data);
    for vs in [4u32, 8, 16, 24] {
        let Ok(h) = node::validate_structure(&b, vs) else {
            continue;
        };
        for i in 0..h.nr_entries as usize {
            let k = node::key(&b, i);
            let _ = node::value(&b, &h, i);
            assert_eq!(node::lower_bound(&b, &h, k), Some(i), "lookup of a present key");
        }
    }
}

/// Decode a bitmap block and a metadata index block from the same bytes.
pub fn space_map_blocks(data: &[u8]) {
    let b = block_of(data);
    let loc = checksum::stored_blocknr(&b);
    let _ = fsm::bitmap_verify(&b, loc);
    let mut nonzero = 0usize;
    for e in 0..fsm::ENTRIES_PER_BITMAP as usize {
        let v = fsm::bitmap_get(&b, e);
        assert!(v <= 3);
        nonzero += usize::from(v != 0);
    }
    assert!(nonzero <= fsm::ENTRIES_PER_BITMAP as usize);
    if let Ok(entries) = fsm::index_decode(&b, loc) {
        assert_eq!(entries.len(), fsm::MAX_METADATA_BITMAPS);
    }
}

/// A small pool made by the engine: two devices, a snapshot, a few hundred mappings.
pub fn base_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let storage = CrashStorage::new(96);
        let image = storage.image.clone();
        let build = || -> Result<(), crate::error::PoolError> {
            let mut md = Metadata::format(Box::new(storage), 128, 2000)?;
            md.create_thin(0)?;
            md.create_thin(7)?;
            for v in 0..300u64 {
                let b = md.alloc_data_block()?.unwrap_or(0);
                md.insert_mapping(if v % 3 == 0 { 7 } else { 0 }, v * 5, b)?;
            }
            md.create_snap(1, 0)?;
            for v in 0..40u64 {
                let b = md.alloc_data_block()?.unwrap_or(0);
                md.insert_mapping(1, v * 10, b)?;
            }
            md.set_transaction_id(0, 3)?;
            md.commit(&mut || Ok(()))?;
            Ok(())
        };
        build().expect("building the fuzzing base image");
        let img = image.lock().map(|i| i.durable.clone()).unwrap_or_default();
        img.iter().flat_map(|b| b.iter().copied()).collect()
    })
}

/// Open a pool whose metadata is [`base_image`] with mutations applied, then use it.
///
/// Input: byte 0 holds flags (bit 0: re-seal every mutated block with a valid
/// checksum and blocknr, so mutations reach the structure checks); then 5-byte
/// records `offset: u32 LE` (taken modulo the image size) and `xor: u8`.
/// Whatever opens is read in full, audited, changed and committed.
pub fn open_pool(data: &[u8]) {
    let mut img = base_image().to_vec();
    let (flags, muts) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    let mut touched = Vec::new();
    for rec in muts.chunks_exact(5).take(64) {
        let off = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize % img.len();
        img[off] ^= rec[4];
        touched.push(off / BLOCK_SIZE);
    }
    if flags & 1 != 0 {
        let base = base_image();
        for blk in touched {
            let range = blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE;
            let orig = block_of(&base[range.clone()]);
            let kind = [BlockKind::Superblock, BlockKind::Node, BlockKind::Bitmap, BlockKind::Index]
                .into_iter()
                .find(|k| checksum::verify(&orig, *k, blk as u64).is_ok());
            if let Some(kind) = kind {
                let mut b = block_of(&img[range.clone()]);
                checksum::seal(&mut b, kind, blk as u64);
                img[range].copy_from_slice(&b[..]);
            }
        }
    }
    exercise(&img);
}

/// Open metadata bytes read-only and read-write and use every part of them.
pub fn exercise(img: &[u8]) {
    let _ = crate::check::check(&crate::io::read_only_copy(img));
    let blocks: Vec<Box<Block>> = img.chunks_exact(BLOCK_SIZE).map(block_of).collect();
    if blocks.is_empty() {
        return;
    }
    if let Ok(mut md) = Metadata::open(Box::new(CrashStorage::from_blocks(blocks.clone())), true) {
        for id in md.device_ids() {
            let _ = md.mappings(id, 0, u64::MAX);
            let _ = md.highest_mapped(id);
            let _ = md.lookup(id, 5);
        }
        let _ = crate::check::audit(&mut md);
    }
    let storage = CrashStorage::from_blocks(blocks);
    if let Ok(mut md) = Metadata::open(Box::new(storage), false) {
        let ids = md.device_ids();
        for (n, id) in ids.iter().enumerate() {
            if let Ok(Some(b)) = md.alloc_data_block() {
                let _ = md.insert_mapping(*id, n as u64 * 3, b);
            }
            let _ = md.remove_mapping(*id, 5);
        }
        if let Some(&id) = ids.first() {
            let _ = md.create_snap(1000, id as u64);
            let _ = md.delete(id as u64);
        }
        let _ = md.commit(&mut || Ok(()));
    }
}

/// Feed arbitrary bytes to the NBD server side (handshake, options, requests) over
/// an in-memory stream with two in-memory exports.
pub fn nbd_client_bytes(data: &[u8]) {
    use crate::nbd::mem::MemCatalog;
    use crate::nbd::{serve_connection, ServerConfig};
    let catalog = MemCatalog::new(&[("a", 1 << 20), ("b", 4096)]);
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut input = data;
    let _ = serve_connection(&mut input, out, &catalog, &ServerConfig { read_only: false, workers: 0 });
}

/// Data blocks the in-memory restore target of [`xml_restore`] takes at most.
const XML_RESTORE_MAX_DATA_BLOCKS: u64 = 1 << 16;
/// Metadata blocks it gives a restore.
const XML_RESTORE_METADATA_BLOCKS: u64 = 128;

/// An in-memory restore target: no data side, small metadata.
struct MemorySink {
    storage: Option<CrashStorage>,
}

impl crate::xml::RestoreSink for MemorySink {
    fn open(
        &mut self,
        nr_data_blocks: u64,
        _block_bytes: u64,
        _data_bytes: u64,
    ) -> Result<Box<dyn crate::io::MetaStorage>, crate::xml::XmlError> {
        if nr_data_blocks > XML_RESTORE_MAX_DATA_BLOCKS {
            return Err(crate::xml::XmlError::Invalid("more data blocks than the fuzz target takes".into()));
        }
        let s = CrashStorage::new(XML_RESTORE_METADATA_BLOCKS);
        self.storage = Some(s.clone());
        Ok(Box::new(s))
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Restore `xml` into in-memory metadata (at most 2^16 data blocks, 128 metadata
/// blocks); when it restores: what the restore counted, the committed metadata
/// opened read-only, and its XML dump.
pub fn xml_restore_in_memory(xml: &[u8]) -> Option<(crate::xml::Restored, Metadata, Vec<u8>)> {
    let mut sink = MemorySink { storage: None };
    let restored = crate::xml::restore::restore(&mut &xml[..], &mut sink, &mut |_| {}).ok()?;
    let storage = sink.storage.expect("a restore that succeeded has opened its storage");
    let durable = storage.image.lock().map(|i| i.durable.clone()).expect("storage lock");
    let mut md = Metadata::open(Box::new(CrashStorage::from_blocks(durable)), true).expect("restored metadata opens");
    let mut w = crate::xml::XmlWriter::new(Vec::new());
    crate::xml::walk(&mut md, &mut w, &mut |_, _| {}).expect("restored metadata dumps");
    Some((restored, md, w.into_inner()))
}

/// Restore arbitrary bytes as thin_dump XML into in-memory metadata. Whatever
/// restores must open, audit clean, hold the devices and mappings the restore
/// counted, and dump to XML that restores to the same dump.
pub fn xml_restore(data: &[u8]) {
    let Some((restored, mut md, xml)) = xml_restore_in_memory(data) else {
        return;
    };
    crate::check::audit(&mut md).expect("restored metadata audits clean");
    assert_eq!(md.device_ids().len(), restored.devices, "devices restored");
    let mut mapped = 0u64;
    for id in md.device_ids() {
        mapped += md.device_info(id).map(|i| i.mapped_blocks).expect("device info");
    }
    assert_eq!(mapped, restored.mappings, "mappings restored");
    let (_, _, again) = xml_restore_in_memory(&xml).expect("a dump restores");
    assert_eq!(String::from_utf8_lossy(&again), String::from_utf8_lossy(&xml), "dump, restore, dump");
}

/// A replication stream from untrusted bytes: the reader must refuse or accept it
/// without panicking or allocating more than one record; an accepted stream,
/// written again by [`crate::stream::format::StreamWriter`], must read back as the
/// same records (adjacent ZERO ranges merged).
pub fn replication_stream(data: &[u8]) {
    use crate::stream::format::{read_all, StreamWriter};
    let Ok((header, records, _)) = read_all(data) else { return };
    let merged = |recs: Vec<crate::stream::format::OwnedRecord>| {
        let mut out: Vec<crate::stream::format::OwnedRecord> = Vec::new();
        for r in recs {
            match (out.last_mut(), &r) {
                (Some((o, None, l)), (s, None, n)) if *o + *l == *s => *l += n,
                _ => out.push(r),
            }
        }
        out
    };
    let mut w = StreamWriter::new(Vec::new(), header).expect("an accepted header is writable");
    for (offset, bytes, len) in &records {
        match bytes {
            Some(b) => w.data(*offset, b).expect("accepted records are writable"),
            None => w.zero(*offset, *len).expect("accepted records are writable"),
        }
    }
    let (_, again) = w.finish().expect("finish");
    let (h2, r2, _) = read_all(&again).expect("what the writer writes reads back");
    assert_eq!(h2, header, "header round trip");
    assert_eq!(merged(r2), merged(records), "records round trip");
}

/// The records of a stream the reader accepts, for the seed test (`None` when refused).
pub fn replication_stream_records(data: &[u8]) -> Option<usize> {
    crate::stream::format::read_all(data).ok().map(|(_, r, _)| r.len())
}
