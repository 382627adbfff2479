//! `dump`, `restore` and `check`, judged by Debian's thin_dump, thin_restore and
//! thin_check.

use crate::common;
use crate::support::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A pool with thin devices, snapshots of snapshots, shared and diverged blocks,
/// discards, an empty device and a deleted one.
fn busy_pool(sc: &Scratch) -> std::path::PathBuf {
    let p = sc.pool("p", "32M");
    sc.ok(&["create", "p", "a", "--size", "8M"]);
    let mut data = pattern(30, 6 << 20);
    for b in (0..96).filter(|b| b % 7 == 3) {
        data[b * 65536..(b + 1) * 65536].fill(0);
    }
    let img = sc.file("img", &data);
    sc.ok(&["import", "p", "a", s(&img)]);
    sc.ok(&["snapshot", "p", "a", "b"]);
    let mut other = data.clone();
    for b in [0usize, 1, 2, 40, 41, 90] {
        other[b * 65536] ^= 0xff;
    }
    let img2 = sc.file("img2", &other);
    sc.ok(&["import", "p", "b", s(&img2)]);
    sc.ok(&["snapshot", "p", "b", "c"]);
    sc.ok(&["create", "p", "empty", "--size", "1M"]);
    sc.ok(&["create", "p", "gone", "--size", "1M", "--id", "9"]);
    sc.ok(&["import", "p", "gone", s(&img)]);
    sc.ok(&["delete", "p", "gone"]);
    sc.ok(&["discard", "p", "c", "--offset", "1M", "--length", "1M"]);
    p
}

#[test]
fn dump_is_byte_for_byte_what_thin_dump_prints() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let ours = sc.ok(&["dump", "p"]);
    let theirs = common::thin_dump(&p.join("metadata"));
    assert_eq!(ours, theirs);
    assert!(ours.starts_with("<superblock uuid=\"\" time=\"2\" transaction=\"0\" flags=\"0\" version=\"2\""), "{ours}");
    assert!(ours.contains("range_mapping") && ours.contains("single_mapping"), "{ours}");
}

#[test]
fn dump_then_thin_restore_then_thin_dump_gives_the_same_xml() {
    let sc = Scratch::new();
    busy_pool(&sc);
    let ours = sc.ok(&["dump", "p"]);
    let xml = sc.file("dump.xml", ours.as_bytes());
    let meta = sc.path("restored.meta");
    std::fs::write(&meta, vec![0u8; 4 << 20]).expect("metadata file");
    thin_restore(&xml, &meta);
    let (ok, out) = common::thin_check(&meta);
    assert!(ok, "{out}");
    assert_eq!(common::thin_dump(&meta), ours);
}

#[test]
fn dump_then_restore_then_dump_is_identical_and_the_devices_read_back() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let ours = sc.ok(&["dump", "p"]);
    // Restore into a new directory that already holds a copy of the data file.
    std::fs::create_dir(sc.path("q")).expect("mkdir");
    std::fs::copy(p.join("data"), sc.path("q/data")).expect("copy data");
    let r = sc.run_with_input(&["restore", "q"], Some(ours.as_bytes()));
    assert!(r.ok().contains("restored 4 devices"), "{}", r.stdout);
    assert_eq!(sc.ok(&["dump", "q"]), ours);
    assert_thin_check(&sc.path("q"), "restore");
    sc.ok(&["check", "q"]);
    // The devices are named thin<ID> and sized to their highest mapped block.
    let v = ls_json(&sc, "q");
    let names: Vec<&str> =
        v["devices"].as_array().expect("devices").iter().map(|d| d["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["thin0", "thin1", "thin2", "thin3"]);
    sc.ok(&["export", "p", "b", "b.out"]);
    sc.ok(&["export", "q", "thin1", "thin1.out"]);
    let b = std::fs::read(sc.path("b.out")).expect("b");
    let t = std::fs::read(sc.path("thin1.out")).expect("thin1");
    assert_eq!(&b[..t.len()], &t[..]);
    // Restoring into a directory without a data file creates a sparse one.
    let r = sc.run_with_input(&["restore", "fresh"], Some(ours.as_bytes()));
    r.ok();
    assert_eq!(std::fs::metadata(sc.path("fresh/data")).expect("data").len(), 32 << 20);
    assert!(allocated_bytes(&sc.path("fresh/data")) < 1 << 20);
    assert_eq!(sc.ok(&["dump", "fresh"]), ours);
}

#[test]
fn restore_reads_the_kernels_thin_dump_output() {
    for name in ["snapshot_chain_delete", "shared_refcount", "btree_internal"] {
        let xml = std::fs::read_to_string(common::fixtures_dir().join(name).join("metadata.xml")).expect("xml");
        let sc = Scratch::new();
        let r = sc.run_with_input(&["restore", "p"], Some(xml.as_bytes()));
        r.ok();
        assert_eq!(sc.ok(&["dump", "p"]), xml, "{name}");
        assert_thin_check(&sc.path("p"), "restore of kernel XML");
    }
}

#[test]
fn restore_into_an_existing_pool_needs_force_and_keeps_names() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let xml = sc.ok(&["dump", "p"]);
    let before = std::fs::read(p.join("metadata")).expect("metadata");
    let err = sc.run_with_input(&["restore", "p"], Some(xml.as_bytes())).fails(1).to_string();
    assert!(err.contains("already holds a pool") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(p.join("metadata")).expect("metadata"), before);
    // Repair: damage the metadata, restore the dump over it.
    flip_byte(&p.join("metadata"), read_u64(&p.join("metadata"), 0x140) * 4096 + 64);
    sc.run(&["ls", "p"]).fails(1);
    sc.run_with_input(&["restore", "p", "--force"], Some(xml.as_bytes())).ok();
    assert_eq!(sc.ok(&["dump", "p"]), xml);
    let names = device_names(&sc, "p");
    assert_eq!(names, ["a", "b", "c", "empty"], "names survive a restore");
    assert_thin_check(&p, "restore --force");
}

#[test]
fn restore_rejects_bad_xml_with_a_clear_error_and_leaves_nothing_behind() {
    let sc = Scratch::new();
    let sb = r#"<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="100">"#;
    let dev = r#"<device dev_id="0" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">"#;
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "no <superblock>"),
        ("not xml at all".into(), "unexpected text"),
        ("<superblock".into(), "XML"),
        (format!("{sb}</device>"), "unexpected </device>"),
        (format!("{sb}{dev}"), "ends inside"),
        (format!("{sb}<single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"/></superblock>"), "inside <superblock>"),
        (format!("{sb}{dev}<single_mapping origin_block=\"0\" data_block=\"100\" time=\"0\"/></device></superblock>"), "past the end of the pool"),
        (format!("{sb}{dev}<single_mapping origin_block=\"0\" data_block=\"x\" time=\"0\"/></device></superblock>"), "not a number"),
        (format!("{sb}{dev}<single_mapping origin_block=\"0\" time=\"0\"/></device></superblock>"), "lacks the data_block"),
        (format!("{sb}{dev}<single_mapping origin_block=\"0\" data_block=\"1\" time=\"16777216\"/></device></superblock>"), "24 bits"),
        (format!("{sb}{dev}<single_mapping origin_block=\"5\" data_block=\"1\" time=\"0\"/><single_mapping origin_block=\"5\" data_block=\"2\" time=\"0\"/></device></superblock>"), "twice"),
        (format!("{sb}{dev}<range_mapping origin_begin=\"18446744073709551615\" data_begin=\"0\" length=\"2\" time=\"0\"/></device></superblock>"), "overflows"),
        (format!("{sb}{dev}<range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"0\" time=\"0\"/></device></superblock>"), "length 0"),
        (format!("{sb}{dev}<range_mapping origin_begin=\"0\" data_begin=\"50\" length=\"51\" time=\"0\"/></device></superblock>"), "past the end of the pool"),
        (format!("{sb}{dev}</device>{dev}</device></superblock>"), "already exists"),
        (format!("{sb}<device dev_id=\"16777216\"/></superblock>"), "ids go up to"),
        (format!("{sb}<def name=\"x\"/></superblock>"), "not supported"),
        (format!("{sb}</superblock>{sb}</superblock>"), "second <superblock>"),
        (sb.replace("128", "100") + "</superblock>", "data_block_size 100"),
        (sb.replace("\"100\"", "\"99999999999999999999\"") + "</superblock>", "not a number"),
        (sb.replace("\"100\"", "\"2000000000000\"") + "</superblock>", "more than 2^40"),
        (format!("{sb}<device dev_id=\"0\" a=\"1\" a=\"2\"/></superblock>"), "attribute"),
        (format!("{sb}<![CDATA[x]]></superblock>"), "unexpected text"),
        ("<other/>".into(), "unexpected <other>"),
    ];
    for (doc, want) in cases {
        let r = sc.run_with_input(&["restore", "p"], Some(doc.as_bytes()));
        let err = r.fails(1);
        assert!(err.contains(want), "{doc:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!sc.path("p").exists(), "{doc:?} left {:?}", std::fs::read_dir(sc.path("p")).map(|d| d.count()));
    }
    // A data file the XML does not fit in is refused, and kept as it was.
    std::fs::create_dir(sc.path("small")).expect("mkdir");
    sc.file("small/data", &[7u8; 65536]);
    let doc = format!("{sb}</superblock>");
    let err = sc.run_with_input(&["restore", "small"], Some(doc.as_bytes())).fails(1).to_string();
    assert!(err.contains("holds 65536 bytes") && err.contains("grow it first"), "{err}");
    assert_eq!(std::fs::read(sc.path("small/data")).expect("data"), vec![7u8; 65536]);
    assert!(!sc.path("small/metadata").exists() && !sc.path("small/pool.toml").exists());
}

#[test]
fn restore_keeps_uuid_version_and_flags_like_thin_restore() {
    let sc = Scratch::new();
    let doc = r#"<superblock uuid="abc" time="0" transaction="7" data_block_size="256" nr_data_blocks="10">
</superblock>"#;
    let input = sc.file("in.xml", doc.as_bytes());
    sc.ok(&["restore", "p", "-i", s(&input)]);
    let meta = std::fs::read(sc.path("p/metadata")).expect("metadata");
    assert_eq!(&meta[16..19], b"abc", "uuid");
    assert_eq!(u32::from_le_bytes(meta[0x28..0x2c].try_into().expect("4")), 1, "version defaults to 1 as in 0.9");
    assert_eq!(status_json(&sc, "p")["transaction_id"], 7);
    assert_eq!(status_json(&sc, "p")["data_block_size_bytes"], 131072);
    assert_thin_check(&sc.path("p"), "restore of a foreign superblock");
    // Debian's tools agree on what was restored.
    assert_eq!(sc.ok(&["dump", "p"]), common::thin_dump(&sc.path("p/metadata")));
}

#[test]
fn check_passes_on_a_good_pool_and_names_the_block_of_a_flipped_byte() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let out = sc.ok(&["check", "p"]);
    assert!(out.contains("metadata is consistent: 4 devices"), "{out}");
    let meta = p.join("metadata");
    let root = read_u64(&meta, 0x140); // data_mapping_root
    flip_byte(&meta, root * 4096 + 200);
    let (ok, _) = common::thin_check(&meta);
    assert!(!ok, "thin_check agrees the metadata is damaged");
    let r = sc.run(&["check", "p"]);
    let err = r.fails(1).to_string();
    assert!(r.stdout.contains(&format!("metadata block {root}:")), "the block is named: {}", r.stdout);
    assert!(r.stdout.contains("checksum"), "{}", r.stdout);
    assert!(err.contains("problem"), "{err}");
}

#[test]
fn check_fails_on_a_flipped_byte_in_the_superblock_and_in_a_space_map() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let meta = p.join("metadata");
    let pristine = std::fs::read(&meta).expect("metadata");
    flip_byte(&meta, 0x30); // trans_id
    let r = sc.run(&["check", "p"]);
    r.fails(1);
    assert!(r.stdout.contains("metadata block 0:") && r.stdout.contains("superblock"), "{}", r.stdout);
    std::fs::write(&meta, &pristine).expect("restore");
    let index = read_u64(&meta, 0xC0 + 16); // metadata sm root: bitmap_root (the index block)
    flip_byte(&meta, index * 4096 + 100);
    let r = sc.run(&["check", "p"]);
    r.fails(1);
    assert!(r.stdout.contains(&format!("metadata block {index}:")), "{}", r.stdout);
}

#[test]
fn corrupt_metadata_gives_one_clear_error_for_every_command_and_status_says_fail() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let meta = p.join("metadata");
    let details = read_u64(&meta, 0x148); // device_details_root
    flip_byte(&meta, details * 4096 + 300);
    let damaged = std::fs::read(&meta).expect("metadata");
    for args in [
        vec!["ls", "p"],
        vec!["export", "p", "a", "out"],
        vec!["dump", "p"],
        vec!["create", "p", "x", "--size", "1M"],
        vec!["delete", "p", "a"],
    ] {
        let err = sc.run(&args).fails(1).to_string();
        assert!(err.contains(&format!("metadata block {details}")) && err.contains("thinctl check"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let r = sc.run(&["status", "p", "--json"]);
    r.fails(1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["mode"], "fail");
    assert!(v["transaction_id"].is_null());
    assert_eq!(std::fs::read(&meta).expect("metadata"), damaged, "nothing was written to damaged metadata");
}

/// Mutate `doc` at a few places chosen by `seed`: replace a byte, delete a span, or
/// duplicate a line.
fn mutate(doc: &str, seed: u64) -> Vec<u8> {
    let r = pattern(seed, 64);
    let pick = |i: usize, n: usize| (u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]) as usize) % n.max(1);
    let mut bytes = doc.as_bytes().to_vec();
    for k in 0..3 {
        let at = pick(k * 8, bytes.len());
        match r[k * 8 + 4] % 4 {
            0 => bytes[at] = b"<>/=\"0123456789 xz\n"[pick(k * 8 + 5, 19)],
            1 => {
                let end = (at + 1 + pick(k * 8 + 6, 40)).min(bytes.len());
                bytes.drain(at..end);
            }
            2 => {
                let line_start = bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                let line_end = bytes[at..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |p| at + p + 1);
                let line = bytes[line_start..line_end].to_vec();
                bytes.splice(line_end..line_end, line);
            }
            _ => bytes[at] = r[k * 8 + 7],
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

#[test]
fn restore_never_panics_on_mangled_dumps_and_whatever_it_accepts_passes_thin_check() {
    let sc = Scratch::new();
    busy_pool(&sc);
    let doc = sc.ok(&["dump", "p"]);
    let (mut accepted, mut refused) = (0, 0);
    for seed in 0..120u64 {
        let dir = format!("r{seed}");
        let r = sc.run_with_input(&["restore", &dir], Some(&mutate(&doc, seed)));
        assert!(!r.stderr.contains("panicked"), "seed {seed}: {}", r.stderr);
        match r.code {
            0 => {
                accepted += 1;
                assert_thin_check(&sc.path(&dir), &format!("restore of mangled dump {seed}"));
                sc.ok(&["check", &dir]);
            }
            1 => {
                refused += 1;
                assert!(!sc.path(&dir).exists(), "seed {seed}: a refused restore leaves nothing");
                assert_eq!(r.stderr.lines().count(), 1, "seed {seed}: {}", r.stderr);
            }
            c => panic!("seed {seed}: exit {c}: {}", r.stderr),
        }
    }
    assert!(refused > 20, "most mangled documents are refused ({accepted} accepted)");
}

#[test]
fn mangled_pool_toml_never_makes_thinctl_panic() {
    let sc = Scratch::new();
    let p = busy_pool(&sc);
    let toml = std::fs::read_to_string(p.join("pool.toml")).expect("toml");
    for seed in 0..80u64 {
        std::fs::write(p.join("pool.toml"), mutate(&toml, 1000 + seed)).expect("write");
        for args in [vec!["ls", "p", "--json"], vec!["resize", "p", "a", "--size", "9M"]] {
            let r = sc.run(&args);
            assert!(matches!(r.code, 0 | 1), "seed {seed} {args:?}: exit {}: {}", r.code, r.stderr);
            assert!(!r.stderr.contains("panicked"), "seed {seed}: {}", r.stderr);
        }
        assert_thin_check(&p, &format!("commands on mangled pool.toml {seed}"));
    }
}
