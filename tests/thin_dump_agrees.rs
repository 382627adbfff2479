//! Debian's `thin_dump` reads the mappings thinpool wrote, exactly.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;

use thinpool::pool::Pool;

type Dump = BTreeMap<u32, Vec<(u64, u64, u32)>>;

/// Parse thin_dump's XML into per-device (virtual block, data block, time) lists.
fn parse_dump(xml: &str) -> (BTreeMap<String, String>, Dump) {
    fn attr(line: &str, name: &str) -> Option<String> {
        let pat = format!(" {name}=\"");
        let start = line.find(&pat)? + pat.len();
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_string())
    }
    let num =
        |l: &str, n: &str| attr(l, n).and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("no {n} in {l}"));
    let mut sb = BTreeMap::new();
    let mut devs: Dump = BTreeMap::new();
    let mut cur = None;
    for line in xml.lines() {
        let l = line.trim();
        if l.starts_with("<superblock") {
            for a in ["time", "transaction", "data_block_size", "nr_data_blocks"] {
                sb.insert(a.to_string(), attr(l, a).unwrap_or_default());
            }
        } else if l.starts_with("<device ") {
            let id = num(l, "dev_id") as u32;
            devs.insert(id, Vec::new());
            cur = Some(id);
        } else if l.starts_with("<single_mapping") {
            let d = devs.get_mut(&cur.expect("in a device")).expect("device");
            d.push((num(l, "origin_block"), num(l, "data_block"), num(l, "time") as u32));
        } else if l.starts_with("<range_mapping") {
            let d = devs.get_mut(&cur.expect("in a device")).expect("device");
            let (o, b, n, t) = (num(l, "origin_begin"), num(l, "data_begin"), num(l, "length"), num(l, "time") as u32);
            for i in 0..n {
                d.push((o + i, b + i, t));
            }
        }
    }
    (sb, devs)
}

#[test]
fn thin_dump_lists_exactly_the_mappings_the_engine_made() {
    let dir = tempfile::tempdir().expect("tmp");
    let mpath = dir.path().join("metadata");
    let m = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mpath).expect("m");
    m.set_len(16 << 20).expect("len");
    let d =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("data")).expect("d");
    d.set_len(4096 * 65536).expect("len");
    let mut p = Pool::create(m, d, 128).expect("create");
    p.create_thin(3).expect("thin");
    for v in 0..1500u64 {
        // Scattered and runs: every third block, plus a dense run.
        if v % 3 == 0 || (700..900).contains(&v) {
            p.write(3, v * 65536 + 512, b"hello").expect("write");
        }
    }
    p.create_snap(4, 3).expect("snap");
    p.write(3, 0, &[1u8; 65536 * 4]).expect("cow");
    p.create_snap(5, 4).expect("snap of snap");
    p.discard(4, 65536 * 700, 65536 * 100).expect("discard");
    p.set_transaction_id(0, 42).expect("txid");
    p.commit().expect("commit");

    let mut want: Dump = BTreeMap::new();
    for id in p.meta().device_ids() {
        want.insert(
            id,
            p.metadata_mut()
                .mappings(id, 0, u64::MAX)
                .expect("mappings")
                .into_iter()
                .map(|m| (m.vblock, m.data_block, m.time))
                .collect(),
        );
    }
    let status = p.meta().status();
    drop(p);

    let (sb, got) = parse_dump(&common::thin_dump(&mpath));
    assert_eq!(sb["transaction"], "42");
    assert_eq!(sb["time"], "2");
    assert_eq!(sb["data_block_size"], "128");
    assert_eq!(sb["nr_data_blocks"], status.data_total_blocks.to_string());
    assert_eq!(got.keys().collect::<Vec<_>>(), vec![&3, &4, &5]);
    assert_eq!(got, want);
    assert!(want[&3].len() > 600, "the device should hold hundreds of mappings");
}
