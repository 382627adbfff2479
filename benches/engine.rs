//! Engine benchmarks on files in a temp dir (no NBD). `cargo bench --bench engine`
//! runs the full sizes and prints a table; `cargo test` runs the same code on tiny
//! sizes as a smoke test. Figures belong in notes, never in assertions.
//!
//! Measured: 4 KiB random writes to new blocks, 4 KiB random overwrites, 4 KiB
//! random reads, mapping 1 M blocks (metadata only), snapshot of a device with 1 M
//! mapped blocks, first write after that snapshot, delete of such a device,
//! commit latency, and opening the large pool.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use thinpool::pool::{OpenOptions as PoolOpen, Pool};

const BS: u64 = 64 * 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn file(path: &Path, len: u64) -> File {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).expect("create file");
    f.set_len(len).expect("set_len");
    f
}

fn reopen(dir: &Path) -> Pool {
    let m = OpenOptions::new().read(true).write(true).open(dir.join("metadata")).expect("metadata");
    let d = OpenOptions::new().read(true).write(true).open(dir.join("data")).expect("data");
    Pool::open(m, d, PoolOpen::default()).expect("open")
}

fn report(name: &str, n: u64, d: Duration) {
    let per = d.as_secs_f64() / n.max(1) as f64;
    println!("{name:<48} {n:>9} ops {:>12.1} ops/s {:>10.2} us/op", 1.0 / per, per * 1e6);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (ios, mappings) = if full { (50_000u64, 1_000_000u64) } else { (500, 5_000) };
    let dir = tempfile::tempdir().expect("tmp");
    println!("thinpool engine benchmark ({} sizes), block size 64 KiB", if full { "full" } else { "smoke" });

    // I/O on one device of `ios` blocks' worth of virtual space x 4.
    let span_blocks = ios * 4;
    let mut p = Pool::create(
        file(&dir.path().join("metadata"), 256 << 20),
        file(&dir.path().join("data"), (span_blocks + mappings * 2 + 1024) * BS),
        128,
    )
    .expect("create pool");
    p.create_thin(0).expect("thin");
    let buf = vec![0xA5u8; 4096];
    let mut rng = Rng(0x1234_5678);
    let mut blocks: Vec<u64> = (0..span_blocks).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let t = Instant::now();
    for &b in blocks.iter().take(ios as usize) {
        p.write(0, b * BS + (rng.next() % 16) * 4096, &buf).expect("write");
    }
    report("4 KiB random write, new block", ios, t.elapsed());
    let t = Instant::now();
    p.commit().expect("commit");
    report("commit after those writes", 1, t.elapsed());

    let t = Instant::now();
    for _ in 0..ios {
        let b = blocks[(rng.next() % ios) as usize];
        p.write(0, b * BS + (rng.next() % 16) * 4096, &buf).expect("overwrite");
    }
    report("4 KiB random overwrite", ios, t.elapsed());

    let mut rbuf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..ios {
        let b = blocks[(rng.next() % ios) as usize];
        p.read(0, b * BS + (rng.next() % 16) * 4096, &mut rbuf).expect("read");
    }
    report("4 KiB random read (mapped)", ios, t.elapsed());

    let t = Instant::now();
    for _ in 0..100 {
        p.write(0, blocks[(rng.next() % ios) as usize] * BS, &buf).expect("write");
        p.commit().expect("commit");
    }
    report("commit latency (one 4 KiB overwrite each)", 100, t.elapsed());

    // A device with `mappings` mapped blocks, built through the metadata layer.
    p.create_thin(1).expect("thin");
    let t = Instant::now();
    for v in 0..mappings {
        let b = p.metadata_mut().alloc_data_block().expect("alloc").expect("space");
        p.metadata_mut().insert_mapping(1, v, b).expect("map");
    }
    report("map blocks sequentially (metadata only)", mappings, t.elapsed());
    let t = Instant::now();
    p.commit().expect("commit");
    report("commit of those mappings", 1, t.elapsed());

    let t = Instant::now();
    p.create_snap(2, 1).expect("snap");
    report(&format!("snapshot of a device with {mappings} mappings"), 1, t.elapsed());
    let t = Instant::now();
    p.write(1, 12_345 % mappings * BS, &buf).expect("cow write");
    report("first 4 KiB write after the snapshot (CoW)", 1, t.elapsed());
    p.commit().expect("commit");

    drop(p);
    let t = Instant::now();
    let mut p = reopen(dir.path());
    report(&format!("open pool ({} data blocks in use)", p.meta().status().data_used_blocks), 1, t.elapsed());

    let t = Instant::now();
    p.delete(2).expect("delete snapshot");
    report("delete a snapshot sharing its tree", 1, t.elapsed());
    let t = Instant::now();
    p.delete(1).expect("delete");
    report(&format!("delete device with {mappings} mappings"), 1, t.elapsed());
    let t = Instant::now();
    p.commit().expect("commit");
    report("commit after the delete", 1, t.elapsed());
}
