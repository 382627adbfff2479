//! The seed workload of issue 9 on default settings, through the library as the
//! server runs it: a 16 GiB pool with the default metadata size (12 MiB), a 1 GiB
//! base device holding 256 MiB, 1,000 snapshots of it as containers, and 1 MiB of
//! random 4 KiB writes into each, flushed per container. No write may fail, the
//! metadata must grow by itself, and both checkers must accept the result.
//!
//! The metadata is a real file (it grows, is fallocated, and `thin_check` reads it).
//! The data is held in memory by [`UniformPages`], which keeps each 4 KiB page as
//! the one byte it is filled with when it is (every page here is): 1,000 containers
//! copy about 64,000 base blocks and fill 250,000 new ones, 16 GiB of block I/O on
//! a real file that says nothing more about metadata. `tools/seed-workload.sh` runs
//! the 100-container version through `thinctl serve`, `qemu-io` and real files.

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use thinpool::io::{FileStorage, Storage};
use thinpool::pool::Pool;
use thinpool::server::service::Service;
use thinpool::thin::PoolMode;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BS: u64 = 64 * KIB;
const PAGE: u64 = 4096;
const CONTAINERS: u64 = 1000;

/// One 4 KiB page: all one byte (absent: zeros), or anything else.
#[derive(Clone)]
enum Page {
    Uniform(u8),
    Bytes(Box<[u8]>),
}

/// A sparse in-memory data device that stores a page filled with one byte as that
/// byte. Reads, writes (any alignment), holes and growth behave as a file's.
struct UniformPages {
    len: Mutex<u64>,
    pages: Mutex<HashMap<u64, Page>>,
}

impl UniformPages {
    fn new(len: u64) -> UniformPages {
        UniformPages { len: Mutex::new(len), pages: Mutex::new(HashMap::new()) }
    }

    fn check(&self, offset: u64, n: usize) -> io::Result<()> {
        let len = *self.len.lock().expect("len");
        if offset.checked_add(n as u64).is_none_or(|end| end > len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"));
        }
        Ok(())
    }
}

fn page_bytes(p: Option<&Page>) -> Vec<u8> {
    match p {
        None => vec![0; PAGE as usize],
        Some(Page::Uniform(b)) => vec![*b; PAGE as usize],
        Some(Page::Bytes(v)) => v.to_vec(),
    }
}

impl Storage for UniformPages {
    fn len(&self) -> u64 {
        *self.len.lock().expect("len")
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let pages = self.pages.lock().expect("pages");
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match pages.get(&page) {
                None => out.fill(0),
                Some(Page::Uniform(b)) => out.fill(*b),
                Some(Page::Bytes(v)) => out.copy_from_slice(&v[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let mut pages = self.pages.lock().expect("pages");
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            let mut bytes = if n == PAGE as usize { Vec::new() } else { page_bytes(pages.get(&page)) };
            if bytes.is_empty() {
                bytes.extend_from_slice(&buf[done..done + n]);
            } else {
                bytes[within..within + n].copy_from_slice(&buf[done..done + n]);
            }
            let first = bytes[0];
            if bytes.iter().all(|&b| b == first) {
                if first == 0 {
                    pages.remove(&page);
                } else {
                    pages.insert(page, Page::Uniform(first));
                }
            } else {
                pages.insert(page, Page::Bytes(bytes.into_boxed_slice()));
            }
            done += n;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }

    fn grow(&self, new_len: u64) -> io::Result<()> {
        let mut len = self.len.lock().expect("len");
        *len = (*len).max(new_len);
        Ok(())
    }
}

/// A fixed pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_thousand_containers_of_the_seed_workload_run_on_default_settings() {
    // Memory-backed when the host has /dev/shm: the workload commits 1,000 times,
    // and the test is about what is committed, not about the disk's fsync latency.
    let tmp = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tmp");
    let data_bytes = 16 * GIB;
    // The size `thinctl pool create --data-size 16G` gives the metadata.
    let meta_bytes = thinpool::volume::default_metadata_bytes(data_bytes, BS);
    assert_eq!(meta_bytes, 12 * MIB, "the default metadata of a 16 GiB pool");
    let meta_path = tmp.path().join("metadata");
    let meta = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&meta_path)
        .expect("metadata");
    meta.set_len(meta_bytes).expect("size");
    let data = UniformPages::new(data_bytes);
    let mut pool = Pool::create_with(FileStorage::new(meta).expect("meta"), data, (BS / 512) as u32).expect("pool");
    let initial_meta_blocks = pool.meta().status().metadata_total_blocks;
    // The base: 1 GiB holding 256 MiB.
    pool.create_thin(0).expect("base");
    let chunk = vec![0xb5u8; MIB as usize];
    for m in 0..256 {
        pool.write(0, m * MIB, &chunk).expect("fill the base");
    }
    pool.commit().expect("commit");
    let svc = Service::new(pool);

    // Containers, each a snapshot of the base with 1 MiB of random 4 KiB writes;
    // a model of a few of them.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut models: HashMap<u64, HashMap<u64, u8>> = HashMap::new();
    let mut peak_meta = (0, 0);
    for c in 1..=CONTAINERS {
        svc.with_pool(|p| p.create_snap(c, 0)).unwrap_or_else(|e| panic!("snapshot {c}: {e}"));
        let byte = (c % 251) as u8 + 1;
        for _ in 0..MIB / PAGE {
            let off = rng.next() % (GIB / PAGE) * PAGE;
            svc.write(c as u32, off, &[byte; PAGE as usize]).unwrap_or_else(|e| panic!("container {c}: {e}"));
            if c % 97 == 0 {
                models.entry(c).or_default().insert(off, byte);
            }
        }
        svc.flush().unwrap_or_else(|e| panic!("flush after container {c}: {e}"));
        let st = svc.status();
        assert_eq!(st.mode, PoolMode::ReadWrite, "after container {c}: {st:?}");
        if c % 100 == 0 {
            eprintln!(
                "container {c}: metadata {}/{} blocks, data {}/{}",
                st.metadata_used_blocks, st.metadata_total_blocks, st.data_used_blocks, st.data_total_blocks
            );
        }
        peak_meta = (st.metadata_used_blocks, st.metadata_total_blocks);
    }
    let (used, total) = peak_meta;
    assert!(total > initial_meta_blocks, "the metadata grew by itself ({initial_meta_blocks} -> {total} blocks)");
    assert!(used > initial_meta_blocks, "1,000 containers need more than the default metadata ({used} blocks)");

    // The sampled containers read back what was written, and the base where they were not.
    let mut buf = vec![0u8; PAGE as usize];
    for (c, model) in &models {
        for (&off, &byte) in model {
            svc.read(*c as u32, off, &mut buf).expect("read");
            assert!(buf.iter().all(|&b| b == byte), "container {c} at {off}");
        }
        let untouched = (0..256 * MIB / PAGE).map(|p| p * PAGE).find(|o| !model.contains_key(o)).expect("one");
        svc.read(*c as u32, untouched, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0xb5), "container {c} shows the base at {untouched}");
    }
    drop(svc);
    let len = std::fs::metadata(&meta_path).expect("stat").len();
    assert_eq!(len, total * 4096, "the metadata file grew with its space map");
    common::assert_checks_pass(&meta_path);
}
