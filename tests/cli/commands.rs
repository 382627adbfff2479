//! Pool and device management: pool create, create, snapshot, delete, discard,
//! resize, ls, status, and their error paths.

use std::fs::File;

use nix::fcntl::{Flock, FlockArg};

use crate::support::*;

#[test]
fn pool_create_makes_a_sparse_data_file_formatted_metadata_and_pool_toml() {
    let s = Scratch::new();
    let out = s.ok(&["pool", "create", "p"]);
    assert!(out.contains("created pool p: 1 GiB of data in 16384 blocks of 64 KiB, 2 MiB of metadata"), "{out}");
    let p = s.path("p");
    assert_eq!(std::fs::metadata(p.join("data")).expect("data").len(), 1 << 30);
    assert!(allocated_bytes(&p.join("data")) < 1 << 20, "the data file is sparse");
    assert_eq!(std::fs::metadata(p.join("metadata")).expect("metadata").len(), 2 << 20);
    let toml = std::fs::read_to_string(p.join("pool.toml")).expect("pool.toml");
    assert!(toml.contains("format = 1"), "{toml}");
    assert_thin_check(&p, "pool create");
    let st = status_json(&s, "p");
    assert_eq!(st["data_total_blocks"], 16384);
    assert_eq!(st["data_block_size_bytes"], 65536);
    assert_eq!(st["metadata_total_blocks"], 512);
}

#[test]
fn the_default_metadata_size_is_48_bytes_per_data_block() {
    let s = Scratch::new();
    s.ok(&["pool", "create", "p", "--data-size", "100GiB", "--block-size", "64k"]);
    assert_eq!(std::fs::metadata(s.path("p/metadata")).expect("metadata").len(), 75 << 20);
    s.ok(&["pool", "create", "q", "--data-size", "1G", "--block-size", "128KiB", "--metadata-size", "8M"]);
    assert_eq!(std::fs::metadata(s.path("q/metadata")).expect("metadata").len(), 8 << 20);
    assert_eq!(status_json(&s, "q")["data_block_size_bytes"], 131072);
    assert_thin_check(&s.path("q"), "pool create --metadata-size");
}

#[test]
fn the_pool_directory_defaults_to_thinpool_in_the_current_directory() {
    let s = Scratch::new();
    s.ok(&["pool", "create", "--data-size", "64M"]);
    assert!(s.path("thinpool/pool.toml").exists());
    s.ok(&["create", "web", "--size", "1G"]);
    s.ok(&["snapshot", "web", "web2"]);
    let ls = s.ok(&["ls"]);
    assert!(ls.contains("web2") && ls.contains("web"), "{ls}");
    s.ok(&["resize", "web", "--size", "2G"]);
    s.ok(&["discard", "web"]);
    s.ok(&["delete", "web2"]);
    assert!(s.ok(&["status"]).contains("mode            rw"));
    assert_thin_check(&s.path("thinpool"), "commands on ./thinpool");
}

#[test]
fn pool_create_refuses_a_directory_that_holds_a_pool_or_other_files() {
    let s = Scratch::new();
    s.pool("p", "64M");
    let err = s.run(&["pool", "create", "p"]).fails(1).to_string();
    assert!(err.contains("already holds a pool"), "{err}");
    std::fs::create_dir(s.path("busy")).expect("mkdir");
    s.file("busy/notes.txt", b"mine");
    let err = s.run(&["pool", "create", "busy"]).fails(1).to_string();
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(s.path("busy/notes.txt")).expect("kept"), b"mine");
}

#[test]
fn pool_create_rejects_bad_sizes_and_leaves_nothing_behind() {
    let s = Scratch::new();
    let err = s.run(&["pool", "create", "p", "--block-size", "4k"]).fails(1).to_string();
    assert!(err.contains("multiple of 64 KiB"), "{err}");
    assert!(!s.path("p").exists(), "nothing is left behind");
    let err = s.run(&["pool", "create", "p", "--data-size", "32k"]).fails(1).to_string();
    assert!(err.contains("less than one block"), "{err}");
    let err = s.run(&["pool", "create", "p", "--metadata-size", "64k"]).fails(1).to_string();
    assert!(err.contains("too small"), "{err}");
    assert!(!s.path("p").exists());
    // An empty directory given by the user stays, and stays empty.
    std::fs::create_dir(s.path("e")).expect("mkdir");
    s.run(&["pool", "create", "e", "--block-size", "100k"]).fails(1);
    assert_eq!(std::fs::read_dir(s.path("e")).expect("read").count(), 0);
}

#[test]
fn sizes_take_binary_units_and_bad_ones_are_usage_errors() {
    let s = Scratch::new();
    s.pool("p", "64MiB");
    for (i, (size, bytes)) in [("512", 512u64), ("64k", 65536), ("64KiB", 65536), ("1G", 1 << 30), ("10GiB", 10 << 30)]
        .into_iter()
        .enumerate()
    {
        let name = format!("d{i}");
        s.ok(&["create", "p", &name, "--size", size]);
        assert_eq!(device_json(&s, "p", &name)["size_bytes"], bytes, "{size}");
    }
    for bad in ["ten", "1.5G", "10X", "-5", "99999999999999999999"] {
        let err = s.run(&["create", "p", "x", "--size", bad]).fails(2).to_string();
        assert!(err.contains("--size"), "{bad}: {err}");
    }
    let err = s.run(&["create", "p", "x", "--size", "0"]).fails(1).to_string();
    assert!(err.contains("more than 0 bytes"), "{err}");
    let err = s.run(&["create", "p", "x", "--size", "9E"]).fails(1).to_string();
    assert!(err.contains("at most 9223372036854775807 bytes"), "{err}");
    s.ok(&["create", "p", "huge", "--size", "8191P"]);
    assert_eq!(device_json(&s, "p", "huge")["size_bytes"], 8191u64 << 50);
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let s = Scratch::new();
    s.run(&["create"]).fails(2);
    s.run(&["create", "p", "web"]).fails(2); // no --size
    s.run(&["frobnicate"]).fails(2);
    s.run(&["snapshot", "a", "b", "c", "d"]).fails(2);
    s.run(&["pool", "adopt", "p"]).fails(2); // no --metadata / --data
    let help = s.ok(&["--help"]);
    for cmd in ["pool", "create", "snapshot", "delete", "discard", "resize", "import", "export", "ls", "status"] {
        assert!(help.contains(cmd), "help lists {cmd}: {help}");
    }
    assert!(s.ok(&["create", "--help"]).contains("thinctl create [DIR] NAME --size SIZE"));
}

#[test]
fn a_missing_pool_is_a_clear_error() {
    let s = Scratch::new();
    let err = s.run(&["ls", "nowhere"]).fails(1).to_string();
    assert!(err.contains("no pool at nowhere") && err.contains("thinctl pool create nowhere"), "{err}");
    let err = s.run(&["create", "web", "--size", "1G"]).fails(1).to_string();
    assert!(err.contains("no pool at thinpool"), "{err}");
    std::fs::create_dir(s.path("empty")).expect("mkdir");
    let err = s.run(&["status", "empty"]).fails(1).to_string();
    assert!(err.contains("has no pool.toml"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn devices_get_the_lowest_free_id_unless_one_is_given() {
    let s = Scratch::new();
    s.pool("p", "64M");
    assert!(s.ok(&["create", "p", "a", "--size", "1M"]).contains("(id 0,"));
    assert!(s.ok(&["create", "p", "b", "--size", "1M", "--id", "7"]).contains("(id 7,"));
    assert!(s.ok(&["create", "p", "c", "--size", "1M"]).contains("(id 1,"));
    s.ok(&["delete", "p", "a"]);
    assert!(s.ok(&["snapshot", "p", "b", "d"]).contains("(id 0)"));
    assert!(s.ok(&["snapshot", "p", "d", "e", "--id", "16777215"]).contains("(id 16777215)"));
    let err = s.run(&["create", "p", "f", "--size", "1M", "--id", "16777216"]).fails(1).to_string();
    assert!(err.contains("out of range"), "{err}");
    let ids: Vec<u64> = ls_json(&s, "p")["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![0, 1, 7, 16777215]);
    assert_thin_check(&s.path("p"), "create/snapshot with ids");
}

#[test]
fn duplicate_names_and_taken_ids_are_refused_without_changing_anything() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1G"]);
    let toml = std::fs::read(p.join("pool.toml")).expect("toml");
    let meta = std::fs::read(p.join("metadata")).expect("metadata");
    let err = s.run(&["create", "p", "web", "--size", "2G"]).fails(1).to_string();
    assert!(err.contains("a device named \"web\" already exists"), "{err}");
    let err = s.run(&["snapshot", "p", "web", "web"]).fails(1).to_string();
    assert!(err.contains("already exists"), "{err}");
    let err = s.run(&["create", "p", "db", "--size", "1G", "--id", "0"]).fails(1).to_string();
    assert!(err.contains("device id 0 is already used by \"web\""), "{err}");
    for bad in ["-x", "a/b", "a b", ".hidden"] {
        let err = s.run(&["create", "p", "--size", "1G", "--", bad]).fails(1).to_string();
        assert!(err.contains("invalid device name"), "{bad}: {err}");
    }
    assert_eq!(std::fs::read(p.join("pool.toml")).expect("toml"), toml, "pool.toml unchanged");
    assert_eq!(std::fs::read(p.join("metadata")).expect("metadata"), meta, "metadata unchanged");
}

#[test]
fn unknown_devices_are_named_with_the_list_of_devices() {
    let s = Scratch::new();
    s.pool("p", "64M");
    let err = s.run(&["delete", "p", "web"]).fails(1).to_string();
    assert_eq!(err.trim(), "error: no such device \"web\"; the pool has no devices");
    s.ok(&["create", "p", "thin0", "--size", "1M"]);
    s.ok(&["snapshot", "p", "thin0", "snap1"]);
    for args in [
        vec!["delete", "p", "web"],
        vec!["snapshot", "p", "web", "x"],
        vec!["discard", "p", "web"],
        vec!["resize", "p", "web", "--size", "1G"],
        vec!["export", "p", "web", "out"],
    ] {
        let err = s.run(&args).fails(1).to_string();
        assert_eq!(err.trim(), "error: no such device \"web\"; devices: thin0, snap1", "{args:?}");
    }
}

#[test]
fn ls_reports_sizes_mapped_and_exclusive_bytes_creation_and_origin() {
    let s = Scratch::new();
    s.pool("p", "64M");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let img = s.file("img", &pattern(1, 4 * 65536));
    s.ok(&["import", "p", "web", img.to_str().expect("utf8")]);
    s.ok(&["snapshot", "p", "web", "snap"]);
    let img2 = s.file("img2", &[&pattern(1, 3 * 65536)[..], &pattern(2, 65536)[..]].concat());
    s.ok(&["import", "p", "snap", img2.to_str().expect("utf8")]);
    let v = ls_json(&s, "p");
    let devs = v["devices"].as_array().expect("devices");
    assert_eq!(devs.len(), 2);
    let web = &devs[0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["id"], 0);
    assert_eq!(web["size_bytes"], 1 << 20);
    assert_eq!(web["mapped_bytes"], 4 * 65536);
    assert_eq!(web["exclusive_bytes"], 65536, "three blocks are shared with the snapshot");
    assert!(web["snapshot_of"].is_null());
    let created = web["creation_time"].as_u64().expect("creation_time");
    assert!(created >= before && created <= before + 60, "{created} vs {before}");
    let snap = &devs[1];
    assert_eq!(snap["snapshot_of"], "web");
    assert_eq!(snap["mapped_bytes"], 4 * 65536);
    assert_eq!(snap["exclusive_bytes"], 65536);
    let text = s.ok(&["ls", "p"]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().expect("header").split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ID", "SIZE", "MAPPED", "EXCLUSIVE", "CREATED", "SNAPSHOT-OF"]
    );
    let row: Vec<&str> = lines.nth(1).expect("snap row").split_whitespace().collect();
    assert_eq!(row[0], "snap");
    assert_eq!(row.last(), Some(&"web"));
}

#[test]
fn status_reports_the_pool_like_dmsetup_status() {
    let s = Scratch::new();
    s.pool("p", "1M");
    let st = status_json(&s, "p");
    for key in [
        "transaction_id",
        "metadata_used_blocks",
        "metadata_total_blocks",
        "data_used_blocks",
        "data_total_blocks",
        "data_block_size_bytes",
        "mode",
        "held_root",
    ] {
        assert!(st.get(key).is_some(), "status --json has {key}: {st}");
    }
    assert_eq!(st["transaction_id"], 0);
    assert_eq!(st["data_total_blocks"], 16);
    assert_eq!(st["data_used_blocks"], 0);
    assert_eq!(st["mode"], "rw");
    assert!(st["held_root"].is_null());
    let used = st["metadata_used_blocks"].as_u64().expect("used");
    assert!(used > 0 && used < st["metadata_total_blocks"].as_u64().expect("total"));
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let img = s.file("img", &pattern(3, 1 << 20));
    s.ok(&["import", "p", "web", img.to_str().expect("utf8")]);
    let st = status_json(&s, "p");
    assert_eq!(st["data_used_blocks"], 16);
    assert_eq!(st["mode"], "out-of-data-space");
    let text = s.ok(&["status", "p"]);
    assert!(text.contains("data            16/16 blocks of 64 KiB used (100%"), "{text}");
}

#[test]
fn a_read_only_pool_refuses_changes_and_reports_ro() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let toml = std::fs::read_to_string(p.join("pool.toml")).expect("toml");
    std::fs::write(p.join("pool.toml"), toml.replace("read_only = false", "read_only = true")).expect("write");
    let err = s.run(&["create", "p", "db", "--size", "1M"]).fails(1).to_string();
    assert!(err.contains("read-only") && err.contains("options.read_only"), "{err}");
    s.run(&["delete", "p", "web"]).fails(1);
    assert_eq!(status_json(&s, "p")["mode"], "ro");
    assert!(s.ok(&["ls", "p"]).contains("web"));
}

#[test]
fn a_busy_pool_is_refused_while_another_process_holds_its_lock() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let lock = File::options().read(true).write(true).open(p.join("pool.lock")).expect("lock file");
    let held = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).expect("flock");
    let busy = "error: pool p is busy: another thinctl or a server holds it";
    for args in [
        vec!["create", "p", "db", "--size", "1M"],
        vec!["snapshot", "p", "web", "s"],
        vec!["delete", "p", "web"],
        vec!["discard", "p", "web"],
        vec!["resize", "p", "web", "--size", "2M"],
        vec!["ls", "p"],
        vec!["status", "p"],
    ] {
        assert_eq!(s.run(&args).fails(1).trim(), busy, "{args:?}");
    }
    drop(held);
    // A reader (shared lock) keeps writers out but lets other readers in.
    let lock = File::open(p.join("pool.lock")).expect("lock file");
    let shared = Flock::lock(lock, FlockArg::LockSharedNonblock).map_err(|(_, e)| e).expect("flock");
    assert_eq!(s.run(&["delete", "p", "web"]).fails(1).trim(), busy);
    assert!(s.ok(&["ls", "p"]).contains("web"));
    drop(shared);
    s.ok(&["delete", "p", "web"]);
}

#[test]
fn a_device_committed_but_missing_from_pool_toml_reappears_as_thin_id() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "10M"]);
    let old_toml = std::fs::read(p.join("pool.toml")).expect("toml");
    s.ok(&["create", "p", "db", "--size", "10M"]);
    let img = s.file("img", &pattern(4, 3 * 65536 + 100));
    s.ok(&["import", "p", "db", img.to_str().expect("utf8")]);
    // A crash after the metadata commit, before pool.toml was replaced.
    std::fs::write(p.join("pool.toml"), &old_toml).expect("write");
    let r = s.run(&["ls", "p", "--json"]);
    let v: serde_json::Value = serde_json::from_str(r.ok()).expect("json");
    assert!(r.stderr.contains("warning: device 1 is in the metadata but not in pool.toml"), "{}", r.stderr);
    let thin1 = v["devices"].as_array().expect("devices").iter().find(|d| d["id"] == 1).expect("device 1").clone();
    assert_eq!(thin1["name"], "thin1");
    assert_eq!(thin1["size_bytes"], 4 * 65536, "the size of its highest mapped block");
    assert!(thin1["creation_time"].is_null());
    // Reading does not rewrite pool.toml; the first change does.
    assert_eq!(std::fs::read(p.join("pool.toml")).expect("toml"), old_toml);
    s.ok(&["resize", "p", "thin1", "--size", "10M"]);
    let toml = std::fs::read_to_string(p.join("pool.toml")).expect("toml");
    assert!(toml.contains("[devices.thin1]"), "{toml}");
    let out = s.run(&["export", "p", "thin1", "out"]);
    assert!(out.stderr.is_empty(), "no more warnings: {}", out.stderr);
    assert_eq!(std::fs::read(s.path("out")).expect("out")[..img_len(&img)], std::fs::read(&img).expect("img")[..]);
}

fn img_len(p: &std::path::Path) -> usize {
    std::fs::metadata(p).expect("stat").len() as usize
}

#[test]
fn a_name_whose_device_is_gone_is_dropped_with_a_warning() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "10M"]);
    s.ok(&["snapshot", "p", "web", "snap"]);
    let old_toml = std::fs::read(p.join("pool.toml")).expect("toml");
    s.ok(&["delete", "p", "web"]);
    std::fs::write(p.join("pool.toml"), &old_toml).expect("write");
    let r = s.run(&["ls", "p", "--json"]);
    let v: serde_json::Value = serde_json::from_str(r.ok()).expect("json");
    assert!(r.stderr.contains("warning: device \"web\" (id 0) is not in the metadata any more"), "{}", r.stderr);
    let names: Vec<&str> =
        v["devices"].as_array().expect("devices").iter().map(|d| d["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["snap"]);
    assert!(v["devices"][0]["snapshot_of"].is_null(), "the origin is gone");
}

#[test]
fn a_malformed_pool_toml_is_a_clear_error_not_a_panic() {
    let s = Scratch::new();
    let p = s.pool("p", "64M");
    for (text, want) in [
        ("this is not toml [", "pool.toml"),
        ("format = 1\n[devices.a]\nid = 0\nsize_bytes = -1\n", "pool.toml"),
        ("format = 1\n[devices.a]\nid = 0\nsize_bytes = 1\n[devices.b]\nid = 0\nsize_bytes = 1\n", "both have id 0"),
        ("format = 1\n[devices.\"a b\"]\nid = 0\nsize_bytes = 1\n", "invalid device name"),
        ("format = 9\n", "format 9 is not supported"),
        ("format = 1\nsurprise = true\n", "surprise"),
        ("format = 1\n[devices.a]\nid = 99999999\nsize_bytes = 1\n", "out of range"),
        ("\u{0}\u{1}\u{2}", "pool.toml"),
    ] {
        std::fs::write(p.join("pool.toml"), text).expect("write");
        for args in [vec!["ls", "p"], vec!["create", "p", "x", "--size", "1M"]] {
            let r = s.run(&args);
            let err = r.fails(1);
            assert!(err.contains(want), "{text:?} {args:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }
}

#[test]
fn deleting_an_origin_keeps_its_snapshot_and_clears_snapshot_of() {
    let s = Scratch::new();
    s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let img = s.file("img", &pattern(5, 1 << 20));
    s.ok(&["import", "p", "web", img.to_str().expect("utf8")]);
    s.ok(&["snapshot", "p", "web", "s1"]);
    s.ok(&["snapshot", "p", "s1", "s2"]);
    assert_eq!(device_json(&s, "p", "s2")["snapshot_of"], "s1");
    assert!(s.ok(&["delete", "p", "web"]).contains("deleted \"web\" (id 0)"));
    assert!(device_json(&s, "p", "s1")["snapshot_of"].is_null());
    assert_eq!(device_json(&s, "p", "s2")["snapshot_of"], "s1");
    s.ok(&["export", "p", "s2", "out"]);
    assert_eq!(std::fs::read(s.path("out")).expect("out"), std::fs::read(&img).expect("img"));
    assert_thin_check(&s.path("p"), "delete of an origin");
}

#[test]
fn discard_unmaps_whole_blocks_of_a_range_or_of_the_whole_device() {
    let s = Scratch::new();
    s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let data = pattern(6, 1 << 20);
    let img = s.file("img", &data);
    s.ok(&["import", "p", "web", img.to_str().expect("utf8")]);
    assert_eq!(device_json(&s, "p", "web")["mapped_bytes"], 1 << 20);
    let out = s.ok(&["discard", "p", "web", "--offset", "64k", "--length", "128k"]);
    assert!(out.contains("discarded 2 blocks (128 KiB)"), "{out}");
    assert_thin_check(&s.path("p"), "discard a range");
    s.ok(&["export", "p", "web", "out"]);
    let mut want = data.clone();
    want[65536..3 * 65536].fill(0);
    assert_eq!(std::fs::read(s.path("out")).expect("out"), want);
    // A range that cuts blocks leaves the partial blocks alone and says so.
    let out = s.ok(&["discard", "p", "web", "--offset", "1000", "--length", "200000"]);
    assert!(out.contains("discarded 0 blocks") && out.contains("partial blocks"), "{out}");
    let out = s.ok(&["discard", "p", "web"]);
    assert!(out.contains("discarded 14 blocks"), "{out}");
    assert_eq!(device_json(&s, "p", "web")["mapped_bytes"], 0);
    assert_eq!(status_json(&s, "p")["data_used_blocks"], 0);
    assert_thin_check(&s.path("p"), "discard the whole device");
}

#[test]
fn discard_ranges_past_the_end_of_the_device_are_refused() {
    let s = Scratch::new();
    s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let err = s.run(&["discard", "p", "web", "--offset", "2M"]).fails(1).to_string();
    assert!(err.contains("past the end of device \"web\""), "{err}");
    let err = s.run(&["discard", "p", "web", "--offset", "512k", "--length", "1M"]).fails(1).to_string();
    assert!(err.contains("goes past the end"), "{err}");
    let err = s.run(&["discard", "p", "web", "--offset", "1", "--length", "18446744073709551615"]).fails(1).to_string();
    assert!(err.contains("goes past the end"), "{err}");
}

#[test]
fn resize_grows_and_shrinking_discards_what_is_cut_off() {
    let s = Scratch::new();
    s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "1M"]);
    let data = pattern(7, 1 << 20);
    let img = s.file("img", &data);
    s.ok(&["import", "p", "web", img.to_str().expect("utf8")]);
    let out = s.ok(&["resize", "p", "web", "--size", "2M"]);
    assert!(out.contains("resized \"web\": 1 MiB -> 2 MiB"), "{out}");
    assert_eq!(device_json(&s, "p", "web")["mapped_bytes"], 1 << 20, "growing maps nothing");
    // Shrink to a size inside a block: the whole blocks after it are unmapped, the
    // cut block's tail is zeroed.
    let out = s.ok(&["resize", "p", "web", "--size", "100000"]);
    assert!(out.contains("14 blocks past the new end discarded"), "{out}");
    assert_eq!(device_json(&s, "p", "web")["mapped_bytes"], 2 * 65536);
    assert_thin_check(&s.path("p"), "resize down");
    s.ok(&["resize", "p", "web", "--size", "1M"]);
    s.ok(&["export", "p", "web", "out"]);
    let mut want = data.clone();
    want[100000..].fill(0);
    assert_eq!(std::fs::read(s.path("out")).expect("out"), want, "what was cut off reads as zeros");
    let err = s.run(&["resize", "p", "web", "--size", "0"]).fails(1).to_string();
    assert!(err.contains("more than 0 bytes"), "{err}");
}

#[test]
fn thin_check_passes_after_every_command() {
    let s = Scratch::new();
    let p = s.pool("p", "16M");
    let img = s.file("img", &pattern(8, 700_000));
    let img = img.to_str().expect("utf8");
    let steps: Vec<Vec<&str>> = vec![
        vec!["create", "p", "a", "--size", "4M"],
        vec!["import", "p", "a", img],
        vec!["snapshot", "p", "a", "b"],
        vec!["snapshot", "p", "b", "c"],
        vec!["import", "p", "c", img],
        vec!["discard", "p", "a", "--offset", "128k", "--length", "256k"],
        vec!["resize", "p", "b", "--size", "300k"],
        vec!["resize", "p", "b", "--size", "8M"],
        vec!["delete", "p", "a"],
        vec!["export", "p", "c", "out"],
        vec!["ls", "p"],
        vec!["status", "p"],
        vec!["check", "p"],
        vec!["dump", "p"],
        vec!["discard", "p", "c"],
        vec!["delete", "p", "b"],
        vec!["delete", "p", "c"],
    ];
    for step in steps {
        s.ok(&step);
        assert_thin_check(&p, &step.join(" "));
    }
    assert_eq!(status_json(&s, "p")["data_used_blocks"], 0, "every block is free again");
}

#[test]
fn a_failed_command_run_with_json_prints_its_error_as_json_too() {
    let s = Scratch::new();
    s.pool("p", "64M");
    s.ok(&["create", "p", "web", "--size", "10M"]);
    let error_of = |json: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json:?}"));
        v["error"].clone()
    };

    let r = s.run(&["diff", "p", "web", "nosuch", "--json"]);
    assert!(r.fails(1).contains("error: no such device \"nosuch\""), "the human line stays: {}", r.stderr);
    let e = error_of(&r.stdout);
    assert_eq!(e["kind"], "no_such_device", "{e}");
    assert_eq!(e["message"], "no such device \"nosuch\"; devices: web");

    // Without --json nothing goes to standard output.
    let r = s.run(&["diff", "p", "web", "nosuch"]);
    r.fails(1);
    assert_eq!(r.stdout, "");

    let r = s.run(&["status", "nope", "--json"]);
    r.fails(1);
    let e = error_of(&r.stdout);
    assert_eq!(e["kind"], "failed", "{e}");
    assert!(e["message"].as_str().expect("message").starts_with("no pool at"), "{e}");

    // send: standard output is the stream, so the JSON error goes to standard error.
    let r = s.run(&["send", "p", "nosuch", "--json"]);
    r.fails(1);
    assert_eq!(r.stdout, "");
    let line = r.stderr.lines().find(|l| l.starts_with('{')).expect("a JSON line on standard error");
    assert_eq!(error_of(line)["kind"], "no_such_device");
}
