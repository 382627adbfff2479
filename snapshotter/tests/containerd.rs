//! The snapshotter driven by the real client: containerd (Debian's 1.6) with a
//! temporary config whose `[proxy_plugins]` entry points at the snapshotter, and
//! `ctr snapshots --snapshotter thinpool`. No kernel device is attached (`--attach
//! none`), so nothing here mounts; containerd runs as root (it needs it), the
//! snapshotter would not.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn usage_of(c: &Containerd, key: &str) -> String {
    let out = c.snap(&["usage", key]);
    let line = out.lines().nth(1).unwrap_or_else(|| panic!("no usage row: {out}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[0], key, "{out}");
    format!("{} {}", f[1], f[2])
}

#[test]
fn containerd_prepares_commits_views_labels_and_removes_snapshots_in_the_pool() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let sock = tmp.path().join("snapshotter.sock");
    let snap = Snapshotter::start(&dir, &sock, &tmp.path().join("snapshotter.log"));
    let c = Containerd::start(tmp.path(), &sock);

    // No parent: a thin snapshot of the base file system (formatted once, here).
    c.snap(&["prepare", "a1"]);
    assert_eq!(c.ls(), vec![("a1".into(), "".into(), "Active".into())]);
    let recs = records(&dir);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].0.as_str(), recs[0].1.as_str()), ("a1", "active"));
    let a1_dev = recs[0].2.clone();
    let baseline = data_used_blocks(&dir);
    assert!(baseline > 0, "the base file system holds data");
    // The mounts name the device's export (no kernel attach in this mode).
    let mounts = c.snap(&["mounts", "/mnt", "a1"]);
    assert!(mounts.contains("-t ext4") && mounts.contains(&format!("/{a1_dev} ")), "{mounts}");

    // 1 MiB written into the active snapshot is its own (16 blocks of 64 KiB).
    write_export(&snap.nbd, &a1_dev, "1M", 0xab);
    assert_eq!(data_used_blocks(&dir), baseline + 16);
    assert_eq!(usage_of(&c, "a1"), "1.0 MiB");

    // Commit: the same device, now committed under its name.
    c.snap(&["commit", "c1", "a1"]);
    let recs = records(&dir);
    assert_eq!(recs, vec![("c1".into(), "committed".into(), a1_dev.clone())]);
    assert_eq!(usage_of(&c, "c1"), "1.0 MiB");
    let committed = c.snap_out(&["mounts", "/mnt", "c1"]);
    assert!(!committed.status.success(), "a committed snapshot has no mounts");

    // A view and an active child of c1: O(1) snapshots, nothing exclusive yet.
    // (ctr's view sets no gc.root label: reference it from c1 so containerd's
    // garbage collector keeps it.)
    c.snap(&["label", "c1", "containerd.io/gc.ref.snapshot.thinpool=v1"]);
    c.snap(&["view", "v1", "c1"]);
    c.snap(&["prepare", "a2", "c1"]);
    assert_eq!(
        c.ls(),
        vec![
            ("a2".into(), "c1".into(), "Active".into()),
            ("c1".into(), "".into(), "Committed".into()),
            ("v1".into(), "c1".into(), "View".into())
        ]
    );
    assert_eq!(data_used_blocks(&dir), baseline + 16, "snapshots copy nothing");
    assert_eq!(usage_of(&c, "a2"), "0.0 B");
    let view_mounts = c.snap(&["mounts", "/mnt", "v1"]);
    assert!(view_mounts.contains("-o ro"), "{view_mounts}");
    let pool = pool_config(&dir);
    for (key, kind) in [("v1", "view"), ("a2", "active")] {
        let e = pool
            .devices
            .values()
            .find(|e| e.labels.get("thinpool.snapshotter/key").is_some_and(|k| k.ends_with(&format!("/{key}"))))
            .unwrap_or_else(|| panic!("{key} in pool.toml"));
        assert_eq!(e.labels["thinpool.snapshotter/kind"], kind);
        assert!(e.labels["thinpool.snapshotter/parent"].ends_with("/c1"));
        assert_eq!(e.snapshot_of.as_deref(), Some(a1_dev.as_str()), "a thin snapshot of c1's device");
    }

    // Info and labels: containerd hands labels under containerd.io/snapshot/ to the
    // snapshotter's Update, which keeps them in pool.toml.
    let info: serde_json::Value = serde_json::from_str(&c.snap(&["info", "c1"])).expect("info json");
    assert_eq!(info["Kind"], "Committed");
    c.snap(&["label", "c1", "containerd.io/snapshot/owner=thinpool-test"]);
    let e = pool_config(&dir).devices.remove(&a1_dev).expect("c1's device");
    assert_eq!(e.labels.get("containerd.io/snapshot/owner").map(String::as_str), Some("thinpool-test"));

    // Remove: refused while c1 has children; then everything goes and the pool's
    // data use is back at the base alone.
    let refused = c.snap_out(&["rm", "c1"]);
    assert!(!refused.status.success(), "c1 has children");
    c.snap(&["rm", "a2"]);
    c.snap(&["rm", "v1"]);
    c.snap(&["rm", "c1"]);
    assert!(c.ls().is_empty());
    // containerd removes backend snapshots in its garbage collection, right after.
    wait_for("containerd's garbage collection to remove the snapshots", 30, || records(&dir).is_empty());
    assert_eq!(data_used_blocks(&dir), baseline, "the written megabyte is free again");
    snap.stop();
    check_pool(&dir);
    let log = std::fs::read_to_string(tmp.path().join("snapshotter.log")).expect("log");
    assert!(log.contains("cleanup removed 0 leftover"), "containerd called Cleanup after collecting: {log}");
}

#[test]
fn a_snapshotter_killed_while_formatting_the_base_recovers_and_cleanup_removes_the_leftover() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let sock = tmp.path().join("snapshotter.sock");
    let log = tmp.path().join("snapshotter.log");
    // A 1 TiB base: formatting it takes long enough to be caught in the act.
    let snap = Snapshotter::start_sized(&dir, &sock, &log, "1T");
    let c = Containerd::start(tmp.path(), &sock);

    // The first Prepare formats the base; kill -9 the snapshotter while it does
    // (its scratch file exists once the base device is created and committed).
    let prepare = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["snapshots", "--snapshotter", "thinpool", "prepare", "a1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr");
    let scratch = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".base-mkfs-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while scratch(&dir).is_empty() {
        assert!(std::time::Instant::now() < until, "the base was never formatted");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    snap.kill();
    let st = prepare.wait_with_output().expect("ctr").status;
    assert!(!st.success(), "the interrupted prepare failed");

    // Restarted: the half-made base is still there (and said so), containerd has
    // no snapshot, and the pool has none either.
    let snap = Snapshotter::start_sized(&dir, &sock, &log, "1T");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("did not finish"), "{text}");
    let leftovers: Vec<String> = pool_config(&dir)
        .devices
        .iter()
        .filter(|(_, e)| e.labels.get("thinpool.snapshotter/kind").map(String::as_str) == Some("base-building"))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    assert!(c.ls().is_empty());
    assert!(records(&dir).is_empty());
    assert_eq!(scratch(&dir).len(), 1, "the scratch file of the interrupted mkfs");

    // Work goes on (a new base is formatted beside the leftover); containerd's
    // garbage collection after a removal calls Cleanup, which deletes the leftover.
    c.snap_after_restart(&["prepare", "a1"]);
    c.snap(&["commit", "c1", "a1"]);
    c.snap(&["prepare", "a2", "c1"]);
    c.snap(&["rm", "a2"]);
    wait_for("Cleanup to remove the leftover device and its scratch file", 30, || {
        !pool_config(&dir).devices.keys().any(|n| leftovers.contains(n)) && scratch(&dir).is_empty()
    });
    assert_eq!(c.ls(), vec![("c1".into(), "".into(), "Committed".into())]);
    assert_eq!(
        records(&dir).iter().map(|r| (r.0.as_str(), r.1.as_str())).collect::<Vec<_>>(),
        vec![("c1", "committed")]
    );

    // kill -9 again with a committed snapshot: after the restart containerd and the
    // pool still agree, and both checkers accept the pool.
    snap.kill();
    let snap = Snapshotter::start_sized(&dir, &sock, &log, "1T");
    assert_eq!(c.ls(), vec![("c1".into(), "".into(), "Committed".into())]);
    c.snap_after_restart(&["view", "v1", "c1"]);
    assert_eq!(records(&dir).len(), 2);
    snap.stop();
    check_pool(&dir);
}

#[test]
fn the_snapshotter_runs_as_an_ordinary_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // containerd needs root; the snapshotter (attaching nothing) does not: run it as
    // `nobody` in a directory that user owns.
    let nobody = 65534;
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).expect("home");
    std::os::unix::fs::chown(&home, Some(nobody), Some(nobody)).expect("chown");
    let dir = home.join("pool");
    let sock = home.join("snapshotter.sock");
    let snap = Snapshotter::start_as(&dir, &sock, &tmp.path().join("snapshotter.log"), "64G", Some(nobody));
    let c = Containerd::start(tmp.path(), &sock);
    c.snap(&["prepare", "a1"]);
    c.snap(&["commit", "c1", "a1"]);
    c.snap(&["prepare", "a2", "c1"]);
    assert_eq!(records(&dir).len(), 2);
    for f in ["pool.toml", "metadata", "data", "control.sock"] {
        let m = std::fs::metadata(dir.join(f)).expect(f);
        assert_eq!(m.uid(), nobody, "{f} belongs to the ordinary user");
    }
    assert_eq!(std::fs::metadata(&sock).expect("socket").uid(), nobody);
    c.snap(&["rm", "a2"]);
    c.snap(&["rm", "c1"]);
    wait_for("the snapshots to be removed", 30, || records(&dir).is_empty());
    snap.stop();
    check_pool(&dir);
}
