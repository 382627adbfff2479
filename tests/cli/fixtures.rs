//! Pools the Linux kernel wrote (tests/data/kernel): `pool adopt` takes them without
//! changing a byte, `export` gives the bytes the kernel read, `dump` gives what
//! Debian's thin_dump gives, and the first change keeps thin_check happy.

use crate::common;
use crate::support::*;

/// Adopt a fixture into `DIR/p` with the manifest's sizes.
fn adopt(sc: &Scratch, fx: &common::Fixture) -> Vec<(u64, u64, String)> {
    let devices: Vec<(u64, u64, String)> = fx.manifest["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["dev_id"].as_u64().expect("id"),
                d["size_bytes"].as_u64().expect("size"),
                d["sha256"].as_str().expect("sha").to_string(),
            )
        })
        .collect();
    let mut args: Vec<String> = ["pool", "adopt", "p", "--metadata"].iter().map(|s| s.to_string()).collect();
    args.push(fx.metadata.to_str().expect("utf8").into());
    args.push("--data".into());
    args.push(fx.data.to_str().expect("utf8").into());
    for (id, size, _) in &devices {
        args.push("--size".into());
        args.push(format!("{id}={size}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = sc.run(&args);
    assert!(r.ok().contains(&format!("{} devices", devices.len())), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "every size was given: {}", r.stderr);
    devices
}

#[test]
fn every_adopted_kernel_pool_exports_the_bytes_the_kernel_wrote_and_stays_untouched() {
    for name in common::fixture_names() {
        let fx = common::unpack_fixture(&name);
        let sc = Scratch::new();
        let devices = adopt(&sc, &fx);
        let out = sc.path("out");
        for (id, size, sha) in &devices {
            sc.ok(&["export", "p", &format!("thin{id}"), "out"]);
            assert_eq!(std::fs::metadata(&out).expect("out").len(), *size, "{name} device {id}");
            assert_eq!(&common::sha256_file(&out), sha, "{name} device {id}");
        }
        let ls = ls_json(&sc, "p");
        assert_eq!(ls["devices"].as_array().expect("devices").len(), devices.len(), "{name}");
        let st = status_json(&sc, "p");
        assert_eq!(st["transaction_id"], fx.manifest["pool"]["transaction_id"], "{name}");
        assert_eq!(st["data_used_blocks"], fx.manifest["pool"]["used_data_blocks"], "{name}");
        assert_eq!(
            st["metadata_used_blocks_dmsetup"], fx.manifest["pool"]["used_metadata_blocks_reported"],
            "{name}: the figure dmsetup status showed"
        );
        sc.ok(&["check", "p"]);
        let dump = sc.ok(&["dump", "p"]);
        assert_eq!(dump, common::thin_dump(&fx.metadata), "{name}");
        assert_eq!(
            common::sha256_file(&fx.metadata),
            fx.manifest["metadata_image"]["sha256"].as_str().expect("sha"),
            "{name}: adopt, ls, status, export, check and dump changed no byte of the metadata"
        );
        assert_eq!(
            common::sha256_file(&fx.data),
            fx.manifest["data_image"]["sha256"].as_str().expect("sha"),
            "{name}: nor of the data"
        );
    }
}

#[test]
fn the_first_change_to_an_adopted_pool_keeps_thin_check_happy() {
    let fx = common::unpack_fixture("snapshot_diverge");
    let sc = Scratch::new();
    let devices = adopt(&sc, &fx);
    let toml = std::fs::read_to_string(sc.path("p/pool.toml")).expect("toml");
    assert!(toml.contains(fx.metadata.to_str().expect("utf8")), "pool.toml records where the files are: {toml}");
    assert!(!sc.path("p/metadata").exists(), "adopt copies nothing");
    sc.ok(&["snapshot", "p", "thin1", "mine"]);
    let img = sc.file("img", &pattern(40, 200_000));
    sc.ok(&["import", "p", "thin0", img.to_str().expect("utf8")]);
    let (ok, out) = common::thin_check(&fx.metadata);
    assert!(ok, "{out}");
    sc.ok(&["check", "p"]);
    // The snapshot holds the kernel's thin1, byte for byte.
    sc.ok(&["export", "p", "mine", "out"]);
    assert_eq!(common::sha256_file(&sc.path("out")), devices[1].2);
}

#[test]
fn adopt_refuses_sizes_for_unknown_devices_and_warns_about_missing_sizes() {
    let fx = common::unpack_fixture("snapshot_diverge");
    let sc = Scratch::new();
    let m = fx.metadata.to_str().expect("utf8");
    let d = fx.data.to_str().expect("utf8");
    let err = sc.run(&["pool", "adopt", "p", "--metadata", m, "--data", d, "--size", "7=1G"]).fails(1).to_string();
    assert!(err.contains("the metadata has no device 7"), "{err}");
    assert!(!sc.path("p").exists());
    let err = sc.run(&["pool", "adopt", "p", "--metadata", d, "--data", m]).fails(1).to_string();
    assert!(err.contains("cannot adopt"), "{err}");
    assert!(!sc.path("p").exists());
    let r = sc.run(&["pool", "adopt", "p", "--metadata", m, "--data", d, "--size", "0=64M"]);
    r.ok();
    assert!(r.stderr.contains("device 1: no --size 1=SIZE given; using 67108864 bytes"), "{}", r.stderr);
    assert_eq!(device_json(&sc, "p", "thin1")["size_bytes"], 64 << 20);
}
