//! The store (the service's semantics) against the library, without containerd:
//! containerd's rules for keys, parents and kinds with the gRPC codes containerd
//! relies on, label updates by field path, usage from the mapping trees, blocks
//! freed at once on Remove, and everything kept across a reopen.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use containerd_snapshots::tonic::Code;
use containerd_snapshots::{Info, Kind};
use thinpool::server::service::Service;
use thinpool::volume::{Access, CreateOptions, PoolDir};
use thinpool_snapshotter::attach::{AttachMode, Attacher};
use thinpool_snapshotter::error::SnapError;
use thinpool_snapshotter::store::Store;

fn open(dir: &Path) -> (Arc<Store>, Arc<Service>) {
    let (pd, pool) = if dir.exists() {
        let mut pd = PoolDir::open(dir, Access::Write).expect("open");
        let pool = pd.open_pool().expect("pool");
        (pd, pool)
    } else {
        PoolDir::create(dir, &CreateOptions { data_bytes: 1 << 30, ..Default::default() }).expect("create")
    };
    let service = Service::new(pool);
    let store = Store::new(Arc::clone(&service), Arc::new(Mutex::new(pd)), 4 << 30, Attacher::new(AttachMode::None));
    store.set_nbd_addr("127.0.0.1:10809".parse().expect("addr"));
    (Arc::new(store), service)
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, SnapError>) -> Code {
    r.expect_err("must fail").code()
}

#[test]
fn containerd_rules_for_keys_parents_and_kinds_hold_with_the_codes_containerd_expects() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let (s, _svc) = open(&dir);
    let m = s.prepare("a", "", labels(&[("l", "1")]), false).expect("prepare");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "ext4");
    assert!(m[0].source.starts_with("nbd://127.0.0.1:10809/ctr-"), "{:?}", m[0]);
    assert_eq!(m[0].options, vec!["rw".to_string(), "noinit_itable".to_string()]);
    assert_eq!(code(s.prepare("a", "", labels(&[]), false)), Code::AlreadyExists);
    assert_eq!(code(s.prepare("b", "missing", labels(&[]), false)), Code::NotFound);
    assert_eq!(code(s.prepare("b", "a", labels(&[]), false)), Code::FailedPrecondition, "parent not committed");
    assert_eq!(code(s.prepare("", "", labels(&[]), false)), Code::InvalidArgument);
    assert_eq!(code(s.prepare(&"k".repeat(5000), "", labels(&[]), false)), Code::InvalidArgument);
    assert_eq!(code(s.prepare("b", "", labels(&[("thinpool.snapshotter/kind", "x")]), false)), Code::InvalidArgument);
    assert_eq!(code(s.prepare("b", "", labels(&[("k", &"v".repeat(5000))]), false)), Code::InvalidArgument);

    s.commit("c", "a", labels(&[("committed", "yes")])).expect("commit");
    assert_eq!(code(s.stat("a")), Code::NotFound, "the active key is gone after commit");
    let c = s.stat("c").expect("stat c");
    assert_eq!((c.kind, c.parent.as_str()), (Kind::Committed, ""));
    assert_eq!(c.labels.get("committed").map(String::as_str), Some("yes"));
    assert_eq!(code(s.mounts("c")), Code::FailedPrecondition, "committed snapshots have no mounts");
    assert_eq!(code(s.commit("c2", "c", labels(&[]))), Code::FailedPrecondition, "only active ones commit");

    let v = s.prepare("v", "c", labels(&[]), true).expect("view");
    assert_eq!(v[0].options, vec!["ro".to_string()]);
    assert_eq!(s.stat("v").expect("v").kind, Kind::View);
    assert_eq!(code(s.commit("c3", "v", labels(&[]))), Code::FailedPrecondition, "a view cannot be committed");
    s.prepare("a2", "c", labels(&[]), false).expect("child");
    assert_eq!(code(s.commit("c", "a2", labels(&[]))), Code::AlreadyExists);
    assert_eq!(s.stat("a2").expect("a2").parent, "c");
    assert_eq!(s.mounts("a2").expect("mounts a2")[0].options[0], "rw");
    assert_eq!(code(s.remove("c")), Code::FailedPrecondition, "c has children");
    assert_eq!(code(s.remove("nope")), Code::NotFound);

    let mut names: Vec<String> = s.list(&[]).expect("list").into_iter().map(|i| i.name).collect();
    names.sort();
    assert_eq!(names, ["a2", "c", "v"]);
    let children: Vec<String> = s.list(&["parent==c".into()]).expect("list").into_iter().map(|i| i.name).collect();
    assert_eq!(children.len(), 2);
    assert_eq!(s.list(&["kind==view".into(), "name==c".into()]).expect("or").len(), 2);
    assert_eq!(code(s.list(&["name~=x".into()])), Code::InvalidArgument);
}

#[test]
fn labels_update_by_field_path_and_survive_a_reopen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    {
        let (s, _svc) = open(&dir);
        s.prepare("a", "", labels(&[("keep", "1"), ("drop", "2"), ("change", "3")]), false).expect("prepare");
        let before = s.stat("a").expect("stat");
        let info = Info {
            kind: Kind::Active,
            name: "a".into(),
            labels: [("change".to_string(), "33".to_string()), ("new".to_string(), "4".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let paths: Vec<String> = ["labels.change", "labels.drop", "labels.new"].map(String::from).to_vec();
        let after = s.update(&info, &paths).expect("update");
        let want: std::collections::HashMap<String, String> =
            [("keep", "1"), ("change", "33"), ("new", "4")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        assert_eq!(after.labels, want);
        assert!(after.updated_at >= before.updated_at && after.created_at == before.created_at);
        assert_eq!(code(s.update(&info, &["kind".to_string()])), Code::InvalidArgument);
        let bad = Info {
            name: "a".into(),
            labels: [("thinpool.snapshotter/key".into(), "x".into())].into(),
            ..Default::default()
        };
        assert_eq!(code(s.update(&bad, &[])), Code::InvalidArgument);
        let missing = Info { name: "zz".into(), ..Default::default() };
        assert_eq!(code(s.update(&missing, &[])), Code::NotFound);
        s.commit("c", "a", labels(&[("x", "y")])).expect("commit");
        let replace = Info { name: "c".into(), labels: [("only".into(), "this".into())].into(), ..Default::default() };
        assert_eq!(s.update(&replace, &[]).expect("replace").labels.len(), 1);
    }
    let (s, _svc) = open(&dir);
    let c = s.stat("c").expect("after reopen");
    assert_eq!(c.kind, Kind::Committed);
    assert_eq!(c.labels.get("only").map(String::as_str), Some("this"));
    assert_eq!(c.labels.len(), 1);
}

#[test]
fn snapshots_share_the_base_usage_counts_exclusive_bytes_and_remove_frees_blocks_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let (s, svc) = open(&dir);
    let t = std::time::Instant::now();
    s.prepare("first", "", labels(&[]), false).expect("first");
    let first = t.elapsed();
    let base_used = svc.status().data_used_blocks;
    let t = std::time::Instant::now();
    for i in 0..20 {
        s.prepare(&format!("a{i}"), "", labels(&[]), false).expect("prepare");
    }
    let per = t.elapsed() / 20;
    eprintln!("first prepare (formats the base): {first:?}; each further prepare: {per:?}");
    assert_eq!(svc.status().data_used_blocks, base_used, "20 snapshots of the base copy nothing");

    // Write 1 MiB into a0's device: 16 blocks of 64 KiB that only a0 maps.
    let id = device_id(&dir, &s, "a0");
    svc.write(id, 1 << 30, &vec![0x5a; 1 << 20]).expect("write");
    svc.flush().expect("flush");
    assert_eq!(s.usage("a0").expect("usage").size, 1 << 20);
    assert_eq!(s.usage("a1").expect("usage").size, 0);
    // Usage excludes the parent's bytes and stays the layer's own when children
    // share them: commit a0, snapshot it twice, write 64 KiB into one child.
    s.commit("c0", "a0", labels(&[])).expect("commit");
    s.prepare("k1", "c0", labels(&[]), false).expect("child");
    s.prepare("k2", "c0", labels(&[]), true).expect("view");
    assert_eq!(s.usage("c0").expect("usage").size, 1 << 20, "c0's own megabyte, shared with its children");
    assert_eq!(s.usage("k1").expect("usage").size, 0);
    let k1 = device_id(&dir, &s, "k1");
    svc.write(k1, 1 << 30, &vec![0x77; 64 << 10]).expect("write");
    assert_eq!(s.usage("k1").expect("usage").size, 64 << 10);
    assert_eq!(s.usage("c0").expect("usage").size, 1 << 20);
    s.remove("k1").expect("remove k1");
    s.remove("k2").expect("remove k2");
    assert_eq!(svc.status().data_used_blocks, base_used + 16);
    s.remove("c0").expect("remove");
    assert_eq!(svc.status().data_used_blocks, base_used, "freed by Remove, no trim needed");
    assert_eq!(code(s.stat("c0")), Code::NotFound);
    for i in 1..20 {
        s.remove(&format!("a{i}")).expect("remove");
    }
    s.remove("first").expect("remove first");
    assert!(s.list(&[]).expect("list").is_empty());
    assert_eq!(s.cleanup().expect("cleanup").removed.len(), 0);
    drop((s, svc));
    common::check_pool(&dir);
}

fn device_id(dir: &Path, _s: &Store, key: &str) -> u32 {
    let cfg = common::pool_config(dir);
    cfg.devices
        .values()
        .find(|e| e.labels.get("thinpool.snapshotter/key").map(String::as_str) == Some(key))
        .map(|e| e.id)
        .unwrap_or_else(|| panic!("no device for {key}"))
}
