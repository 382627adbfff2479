//! Replication against a model, through the library: random writes, zeroes,
//! discards and resizes of a device, snapshots sent in full or incrementally (from
//! a random earlier snapshot that the receiver holds) into a pool of a random block
//! size; every received device must equal the model's bytes at its snapshot, and
//! both checkers must accept both pools. Plus: a send from a served pool takes its
//! content at one instant, while clients keep writing.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use thinpool::server::replicate::Served;
use thinpool::server::service::Service;
use thinpool::stream::{self, Offline};
use thinpool::volume::{CreateOptions, PoolDir};

const BS: u64 = 64 << 10;

#[derive(Debug, Clone)]
enum Op {
    /// Write pattern bytes at a byte offset.
    Write { at: u64, len: u64, seed: u64 },
    /// Write zeroes (unmapping whole blocks).
    Zero { at: u64, len: u64 },
    /// Discard the whole blocks inside a range.
    Discard { at: u64, len: u64 },
    /// Change the size.
    Resize { size: u64 },
    /// Snapshot and send: in full, or since the snapshot `base` (an index into the
    /// snapshots the receiver holds).
    Send { base: Option<usize> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..1 << 20, 1u64..200_000, any::<u64>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        1 => (0u64..1 << 20, 1u64..300_000).prop_map(|(at, len)| Op::Zero { at, len }),
        1 => (0u64..1 << 20, 1u64..400_000).prop_map(|(at, len)| Op::Discard { at, len }),
        1 => (200_000u64..1_400_000).prop_map(|size| Op::Resize { size }),
        3 => proptest::option::of(0usize..8).prop_map(|base| Op::Send { base }),
    ]
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn bytes_of(pool: &mut thinpool::pool::Pool, id: u32, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    pool.read(id, 0, &mut b).expect("read");
    b
}

fn run(ops: Vec<Op>, recv_block: u64) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut a, mut pa) =
        PoolDir::create(&tmp.path().join("a"), &CreateOptions { data_bytes: 64 << 20, ..Default::default() })
            .expect("a");
    let (mut b, mut pb) = PoolDir::create(
        &tmp.path().join("b"),
        &CreateOptions { data_bytes: 64 << 20, block_bytes: recv_block, ..Default::default() },
    )
    .expect("b");
    let mut model = vec![0u8; 1 << 20];
    let v = a.create_device(&mut pa, "v", model.len() as u64, None).expect("v");
    // Snapshots held by both pools, with their bytes.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        let size = model.len() as u64;
        match op {
            Op::Write { at, len, seed } => {
                let at = at % size;
                let len = len.min(size - at);
                let data = pattern(seed, len as usize);
                pa.write(v, at, &data).expect("write");
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { at, len } => {
                let at = at % size;
                let len = len.min(size - at);
                pa.write_zeroes(v, at, len, true).expect("zero");
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Discard { at, len } => {
                let at = at % size;
                let len = len.min(size - at);
                a.discard(&mut pa, "v", Some(at), Some(len), &mut |_, _| {}).expect("discard");
                let (lo, hi) = (at.div_ceil(BS) * BS, (at + len) / BS * BS);
                if lo < hi {
                    model[lo as usize..hi as usize].fill(0);
                }
            }
            Op::Resize { size } => {
                a.resize(&mut pa, "v", size).expect("resize");
                model.resize(size as usize, 0);
            }
            Op::Send { base } => {
                let name = format!("s{i}");
                a.snapshot(&mut pa, "v", &name, None).expect("snapshot");
                let from = base.filter(|_| !snaps.is_empty()).map(|k| snaps[k % snaps.len()].0.clone());
                let mut out = Vec::new();
                let t = Offline::new(&mut a, &mut pa);
                let sent = stream::send(&t, &name, from.as_deref(), &mut out, &mut |_, _| {}).expect("send");
                prop_assert!(sent.identity_recorded);
                prop_assert_eq!(sent.base_identity.is_some(), from.is_some());
                let t = Offline::new(&mut b, &mut pb);
                let got = stream::receive(&t, &name, &out[..], &mut |_, _| {}).expect("receive");
                prop_assert_eq!(got.base_name.as_deref(), from.as_deref());
                snaps.push((name, model.clone()));
            }
        }
    }
    pa.commit().expect("commit a");
    for (name, want) in &snaps {
        let e = b.device(name).expect("received").clone();
        prop_assert_eq!(e.size_bytes, want.len() as u64, "size of {}", name);
        prop_assert!(bytes_of(&mut pb, e.id, e.size_bytes) == *want, "bytes of {} in the receiver", name);
        let e = a.device(name).expect("sent").clone();
        prop_assert!(bytes_of(&mut pa, e.id, e.size_bytes) == *want, "bytes of {} in the sender", name);
    }
    prop_assert!(a.hidden().is_empty() && b.hidden().is_empty());
    drop((a, pa, b, pb));
    common::assert_checks_pass(&tmp.path().join("a/metadata"));
    common::assert_checks_pass(&tmp.path().join("b/metadata"));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn received_devices_equal_the_model_at_their_snapshot(
        ops in proptest::collection::vec(op(), 1..24),
        recv_block in prop_oneof![Just(64u64 << 10), Just(128 << 10), Just(256 << 10)],
    ) {
        run(ops, recv_block)?;
    }
}

/// A writer that reports its first write and then waits to be let go.
struct Gate {
    out: Vec<u8>,
    started: Option<mpsc::Sender<()>>,
    go: mpsc::Receiver<()>,
}

impl Write for Gate {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(s) = self.started.take() {
            let _ = s.send(());
            let _ = self.go.recv();
        }
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_served_send_holds_one_instant_while_clients_keep_writing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut pd, mut pool) =
        PoolDir::create(&tmp.path().join("a"), &CreateOptions { data_bytes: 64 << 20, ..Default::default() })
            .expect("a");
    let id = pd.create_device(&mut pool, "live", 4 << 20, None).expect("live");
    let before = pattern(7, 4 << 20);
    pool.write(id, 0, &before).expect("write");
    pool.commit().expect("commit");
    let service = Service::new(pool);
    let pd = Arc::new(Mutex::new(pd));
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let sender = {
        let (service, pd) = (Arc::clone(&service), Arc::clone(&pd));
        std::thread::spawn(move || {
            let t = Served::new(service, pd);
            let mut gate = Gate { out: Vec::new(), started: Some(started_tx), go: go_rx };
            let r = stream::send(&t, "live", None, &mut gate, &mut |_, _| {}).expect("send");
            (r, gate.out)
        })
    };
    // The send has taken its instant and started writing; a client writes now,
    // and is not held up by the send in progress.
    started.recv().expect("started");
    let after = pattern(8, 4 << 20);
    service.write(id, 0, &after).expect("a client's write during the send");
    service.flush().expect("flush");
    let mut now = vec![0u8; 4 << 20];
    service.read(id, 0, &mut now).expect("read");
    assert!(now == after);
    go.send(()).expect("go");
    let (report, bytes) = sender.join().expect("sender");
    assert!(!report.identity_recorded, "the device changed during the send: no identity may be claimed for it");
    // The stream holds the device as it was at the instant.
    let (mut b, mut pb) =
        PoolDir::create(&tmp.path().join("b"), &CreateOptions { data_bytes: 64 << 20, ..Default::default() })
            .expect("b");
    let t = Offline::new(&mut b, &mut pb);
    stream::receive(&t, "copy", &bytes[..], &mut |_, _| {}).expect("receive");
    let e = b.device("copy").expect("copy").clone();
    assert!(bytes_of(&mut pb, e.id, e.size_bytes) == before);
    // The hidden snapshot is gone from the served pool.
    service.flush().expect("flush");
    let ids = service.with_pool(|p| p.meta().device_ids());
    assert_eq!(ids, vec![id]);
    assert!(pd.lock().expect("pd").hidden().is_empty());
    drop((b, pb));
    common::assert_checks_pass(&tmp.path().join("b/metadata"));
}
