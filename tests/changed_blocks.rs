//! Changed blocks end to end with the real `thinctl`: `thinctl diff` against Debian's
//! `thin_delta` on the same metadata, on a served pool (through the control socket,
//! while a client writes), the `thinpool:changed:<snapshot>` NBD meta context with
//! `nbdinfo --map` and a raw socket, the incremental backup recipe of the README,
//! and `thinctl rollback`.

mod common;

#[allow(dead_code)]
#[path = "cli/support.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use support::*;

const BS: usize = 64 * 1024;

/// A running `thinctl serve`, stopped (SIGTERM) by `stop`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(sc: &Scratch, pool: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
            .args(["serve", pool, "--listen", "127.0.0.1:0", "--commit-interval-ms", "100"])
            .current_dir(sc.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn thinctl serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        let addr = line
            .split("nbd://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("serve did not say where it listens: {line:?}"))
            .to_string();
        Server { child, addr }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    fn stop(mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("kill");
        let code = self.child.wait().expect("wait").code();
        assert_eq!(code, Some(0), "serve exits 0 on SIGTERM");
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Run a tool; panics naming the Debian package when it is missing.
fn tool(name: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} not runnable ({e}): install the Debian package {package}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (kind, begin block, length blocks) of `thinctl diff --json` output.
fn runs(json: &str) -> Vec<(String, u64, u64)> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let bs = v["block_bytes"].as_u64().expect("block_bytes");
    v["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            let (b, l) = (r["begin_block"].as_u64().expect("begin"), r["length_blocks"].as_u64().expect("len"));
            assert_eq!(r["offset_bytes"].as_u64(), Some(b * bs));
            assert_eq!(r["length_bytes"].as_u64(), Some(l * bs));
            (r["kind"].as_str().expect("kind").to_string(), b, l)
        })
        .collect()
}

/// (kind, begin, length) of `thin_delta`'s non-verbose XML.
fn thin_delta(metadata: &Path, left: u32, right: u32) -> Vec<(String, u64, u64)> {
    let xml = tool(
        "thin_delta",
        "thin-provisioning-tools",
        &["--snap1", &left.to_string(), "--snap2", &right.to_string(), metadata.to_str().expect("path")],
    );
    let attr = |line: &str, name: &str| -> u64 {
        let key = format!("{name}=\"");
        let rest = &line[line.find(&key).unwrap_or_else(|| panic!("{name} in {line}")) + key.len()..];
        rest[..rest.find('"').expect("quote")].parse().expect("number")
    };
    xml.lines()
        .map(str::trim)
        .filter_map(|l| {
            let kind = ["same", "different", "left_only", "right_only"]
                .into_iter()
                .find(|k| l.starts_with(&format!("<{k} ")))?;
            Some((kind.to_string(), attr(l, "begin"), attr(l, "length")))
        })
        .collect()
}

/// Overwrite `len` bytes of `img` at `off` with pattern bytes.
fn poke(img: &Path, off: usize, len: usize, seed: u64) {
    let mut bytes = std::fs::read(img).expect("read image");
    bytes[off..off + len].copy_from_slice(&pattern(seed, len));
    std::fs::write(img, bytes).expect("write image");
}

/// Pool `p` with device `web` (16 MiB, 200 blocks of data), snapshot `s1`, then
/// changes to `web`: rewritten blocks, a zeroed (unmapped) block, a new block.
fn pool_with_changes(sc: &Scratch) {
    sc.pool("p", "256M");
    sc.ok(&["create", "p", "web", "--size", "16M"]);
    let img = sc.file("img", &[pattern(1, 200 * BS), vec![0u8; 56 * BS]].concat());
    sc.ok(&["import", "p", "web", "img"]);
    sc.ok(&["snapshot", "p", "web", "s1"]);
    poke(&img, 0, 4096, 2);
    poke(&img, 5 * BS + 100, 2 * BS, 3);
    std::fs::write(&img, {
        let mut b = std::fs::read(&img).expect("read");
        b[10 * BS..11 * BS].fill(0);
        b
    })
    .expect("zero a block");
    poke(&img, 230 * BS, 10, 4);
    sc.ok(&["import", "p", "web", "img"]);
}

#[test]
fn thinctl_diff_lists_exactly_what_thin_delta_lists() {
    let sc = Scratch::new();
    pool_with_changes(&sc);
    let meta = sc.path("p").join("metadata");
    // thin_delta prints same runs too: compare with --same, then without.
    let want = thin_delta(&meta, 1, 0);
    assert!(want.iter().any(|r| r.0 == "same") && want.len() > 4, "thin_delta: {want:?}");
    assert_eq!(runs(&sc.ok(&["diff", "p", "s1", "web", "--same", "--json"])), want);
    let changes: Vec<_> = want.iter().filter(|r| r.0 != "same").cloned().collect();
    let got = runs(&sc.ok(&["diff", "p", "s1", "web", "--json"]));
    assert_eq!(got, changes);
    assert_eq!(
        got,
        vec![
            ("different".into(), 0, 1),
            ("different".into(), 5, 3),
            ("left_only".into(), 10, 1),
            ("right_only".into(), 230, 1)
        ]
    );
    assert_eq!(runs(&sc.ok(&["diff", "p", "web", "s1", "--same", "--json"])), thin_delta(&meta, 0, 1));
    // The human form: thin_delta's words, blocks and bytes.
    let text = sc.ok(&["diff", "p", "s1", "web"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["KIND", "BEGIN", "LENGTH", "OFFSET", "BYTES"]);
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["different", "5", "3", "327680", "196608"]);
    assert!(lines[5].starts_with("6 blocks (384 KiB) differ between \"s1\" and \"web\""), "{text}");
    assert!(sc.ok(&["diff", "p", "s1", "s1"]).contains("map the same blocks"));
    // Errors name what is wrong.
    let err = sc.run(&["diff", "p", "s1", "nope"]).fails(1).to_string();
    assert!(err.contains("no such device \"nope\""), "{err}");
    sc.run(&["diff", "s1"]).fails(2);
    assert_thin_check(&sc.path("p"), "diff");
}

#[test]
fn a_served_diff_is_taken_at_one_instant_while_a_client_writes() {
    let sc = Scratch::new();
    pool_with_changes(&sc);
    sc.ok(&["snapshot", "p", "web", "s2"]);
    let offline = sc.ok(&["diff", "p", "s1", "s2", "--json"]);
    let offline_same = sc.ok(&["diff", "p", "s1", "s2", "--same", "--json"]);
    let server = Server::start(&sc, "p");
    // A client rewrites web all over (copy-on-write of blocks s1 and s2 share)
    // while diffs of the two snapshots are taken through the control socket.
    let mut cmds: Vec<String> = Vec::new();
    for i in 0..400u64 {
        cmds.extend(["-c".into(), format!("write -P {} {} 4k", i % 250 + 1, (i * 7919 % 256) * BS as u64)]);
    }
    cmds.extend(["-c".into(), "flush".into()]);
    let uri = server.uri("web");
    let writer = std::thread::spawn(move || {
        let mut args = vec!["-f".to_string(), "raw".into()];
        args.extend(cmds);
        args.push(uri);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("qemu-io", "qemu-utils", &args)
    });
    let mut taken = 0;
    while !writer.is_finished() || taken < 3 {
        assert_eq!(runs(&sc.ok(&["diff", "p", "s1", "s2", "--json"])), runs(&offline));
        taken += 1;
    }
    assert_eq!(runs(&sc.ok(&["diff", "p", "s1", "s2", "--same", "--json"])), runs(&offline_same));
    writer.join().expect("writer");
    // After the writes, the served diff of web against s2 is what the pool says
    // offline; nothing stays held.
    let served = sc.ok(&["diff", "p", "s2", "web", "--json"]);
    let status: Value = serde_json::from_str(&sc.ok(&["status", "p", "--json"])).expect("status");
    assert_eq!(status["held_root"], Value::Null);
    server.stop();
    assert_eq!(runs(&served), runs(&sc.ok(&["diff", "p", "s2", "web", "--json"])));
    assert!(runs(&served).iter().map(|r| r.2).sum::<u64>() >= 200);
    assert_eq!(
        runs(&served),
        thin_delta(&sc.path("p").join("metadata"), 2, 0).into_iter().filter(|r| r.0 != "same").collect::<Vec<_>>()
    );
    assert_thin_check(&sc.path("p"), "served diffs");
}

/// (offset, length) of the ranges `nbdinfo --map=CONTEXT` flags with `flag`,
/// adjacent ones joined.
fn nbdinfo_ranges(uri: &str, context: &str, flag: u32) -> Vec<(u64, u64)> {
    let out = tool("nbdinfo", "libnbd-bin", &[&format!("--map={context}"), uri]);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut end = 0;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, flags): (u64, u64, u32) =
            (f[0].parse().expect("offset"), f[1].parse().expect("length"), f[2].parse().expect("flags"));
        assert_eq!(off, end, "nbdinfo's extents follow each other: {out}");
        end = off + len;
        if flags != flag {
            continue;
        }
        match ranges.last_mut() {
            Some(r) if r.0 + r.1 == off => r.1 += len,
            _ => ranges.push((off, len)),
        }
    }
    ranges
}

/// `thinctl diff --json` runs other than `same`, in bytes, adjacent ones joined.
fn diff_ranges(sc: &Scratch, from: &str, to: &str) -> Vec<(u64, u64)> {
    let v: Value = serde_json::from_str(&sc.ok(&["diff", "p", from, to, "--json"])).expect("json");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for r in v["runs"].as_array().expect("runs") {
        let (off, len) = (r["offset_bytes"].as_u64().expect("off"), r["length_bytes"].as_u64().expect("len"));
        match ranges.last_mut() {
            Some(x) if x.0 + x.1 == off => x.1 += len,
            _ => ranges.push((off, len)),
        }
    }
    ranges
}

#[test]
fn nbdinfo_maps_thinpool_changed_exactly_as_thinctl_diff() {
    let sc = Scratch::new();
    pool_with_changes(&sc);
    sc.ok(&["create", "p", "big", "--size", "512M"]);
    sc.ok(&["snapshot", "p", "big", "big0"]);
    let server = Server::start(&sc, "p");
    let want = diff_ranges(&sc, "s1", "web");
    assert_eq!(want.len(), 4, "{want:?}");
    assert_eq!(nbdinfo_ranges(&server.uri("web"), "thinpool:changed:s1", 1), want);
    // qemu reads it through its x-dirty-bitmap option: changed ranges are "data": false.
    let (host, port) = server.addr.rsplit_once(':').expect("host:port");
    let map = tool(
        "qemu-img",
        "qemu-utils",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!("driver=nbd,server.type=inet,server.host={host},server.port={port},export=web,x-dirty-bitmap=thinpool:changed:s1"),
        ],
    );
    let extents: Vec<Value> = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| e["data"] == Value::Bool(false)) {
        let (off, len) = (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"));
        match dirty.last_mut() {
            Some(r) if r.0 + r.1 == off => r.1 += len,
            _ => dirty.push((off, len)),
        }
    }
    assert_eq!(dirty, want, "qemu-img map with x-dirty-bitmap");
    // The other way round: the snapshot against the device.
    assert_eq!(nbdinfo_ranges(&server.uri("s1"), "thinpool:changed:web", 1), diff_ranges(&sc, "web", "s1"));
    // More changed ranges than one reply holds (1024 extents): every other block
    // of 2200, written by a client while served.
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for b in (0..2200u64).step_by(2) {
        args.extend(["-c".into(), format!("write -P 7 {} 512", b * BS as u64 + 1024)]);
    }
    args.push(server.uri("big"));
    tool("qemu-io", "qemu-utils", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = diff_ranges(&sc, "big0", "big");
    assert_eq!(want.len(), 1100);
    assert_eq!(want[1], (2 * BS as u64, BS as u64));
    assert_eq!(nbdinfo_ranges(&server.uri("big"), "thinpool:changed:big0", 1), want);
    // base:allocation is unchanged next to it.
    let holes = nbdinfo_ranges(&server.uri("big"), "base:allocation", 3);
    assert_eq!(holes[0], (BS as u64, BS as u64));
    server.stop();
    assert_thin_check(&sc.path("p"), "block status of thinpool:changed");
}

mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use thinpool::nbd::wire;

    pub fn connect(addr: &str) -> TcpStream {
        let mut c = TcpStream::connect(addr).expect("connect");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
        c
    }

    pub fn option(c: &mut TcpStream, opt: u32, data: &[u8]) {
        let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).expect("option");
    }

    pub fn reply(c: &mut TcpStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("option reply");
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).expect("option data");
        (opt, kind, d)
    }

    /// LIST or SET_META_CONTEXT for `export` with `queries`: the (id, name) replies
    /// before the ACK.
    pub fn meta(c: &mut TcpStream, opt: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        option(c, opt, &d);
        let mut out = Vec::new();
        loop {
            let (o, kind, data) = reply(c);
            assert_eq!(o, opt);
            if kind == wire::REP_ACK {
                return out;
            }
            assert_eq!(kind, wire::REP_META_CONTEXT, "{:?}", String::from_utf8_lossy(&data));
            let id = u32::from_be_bytes(data[..4].try_into().expect("4"));
            out.push((id, String::from_utf8(data[4..].to_vec()).expect("utf8")));
        }
    }

    /// One structured reply chunk: (flags, type, payload).
    pub fn chunk(c: &mut TcpStream, cookie: u64) -> (u16, u16, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("chunk");
        assert_eq!(&h[..4], &wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().expect("8")), cookie);
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).expect("payload");
        (u16::from_be_bytes(h[4..6].try_into().expect("2")), u16::from_be_bytes(h[6..8].try_into().expect("2")), d)
    }
}

#[test]
fn list_and_set_meta_context_offer_two_contexts_at_once_with_distinct_ids() {
    use thinpool::nbd::wire;
    let sc = Scratch::new();
    pool_with_changes(&sc);
    let server = Server::start(&sc, "p");
    let mut c = raw::connect(&server.addr);
    // Before structured replies: LIST works, SET is refused.
    let listed = raw::meta(&mut c, wire::OPT_LIST_META_CONTEXT, "web", &["thinpool:"]);
    assert_eq!(listed, vec![(0, "thinpool:changed:s1".to_string())]);
    assert_eq!(raw::meta(&mut c, wire::OPT_LIST_META_CONTEXT, "web", &["thinpool:changed:"]), listed);
    let all = raw::meta(&mut c, wire::OPT_LIST_META_CONTEXT, "web", &[]);
    assert_eq!(all.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(), ["base:allocation", "thinpool:changed:s1"]);
    assert!(all.iter().all(|x| x.0 == 0), "LIST replies carry the reserved context id 0: {all:?}");
    assert!(raw::meta(&mut c, wire::OPT_LIST_META_CONTEXT, "web", &["thinpool:changed:nope", "other:"]).is_empty());
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"web");
    d.extend_from_slice(&0u32.to_be_bytes());
    raw::option(&mut c, wire::OPT_SET_META_CONTEXT, &d);
    assert_eq!(raw::reply(&mut c).1, wire::REP_ERR_INVALID);
    raw::option(&mut c, wire::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw::reply(&mut c).1, wire::REP_ACK);
    // A namespace is not a selection; unknown names select nothing.
    assert!(raw::meta(&mut c, wire::OPT_SET_META_CONTEXT, "web", &["thinpool:", "thinpool:changed:nope"]).is_empty());
    let set = raw::meta(
        &mut c,
        wire::OPT_SET_META_CONTEXT,
        "web",
        &["thinpool:changed:s1", "base:allocation", "thinpool:changed:s1"],
    );
    assert_eq!(set.len(), 2, "{set:?}");
    let base = set.iter().find(|x| x.1 == "base:allocation").expect("base").0;
    let changed = set.iter().find(|x| x.1 == "thinpool:changed:s1").expect("changed").0;
    assert_ne!(base, changed);
    assert!(base != 0 && changed != 0);
    // GO, then one BLOCK_STATUS: one chunk per context, DONE on the last.
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"web");
    go.extend_from_slice(&0u16.to_be_bytes());
    raw::option(&mut c, wire::OPT_GO, &go);
    while raw::reply(&mut c).1 != wire::REP_ACK {}
    let req = wire::Request { flags: 0, command: wire::Command::BlockStatus, cookie: 9, offset: 0, length: 16 << 20 };
    std::io::Write::write_all(&mut c, &wire::encode_request(&req)).expect("request");
    let mut by_ctx = std::collections::HashMap::new();
    loop {
        let (flags, kind, p) = raw::chunk(&mut c, 9);
        assert_eq!(kind, wire::REPLY_TYPE_BLOCK_STATUS);
        let id = u32::from_be_bytes(p[..4].try_into().expect("4"));
        let extents: Vec<(u64, u32)> = p[4..]
            .chunks(8)
            .map(|e| {
                (
                    u32::from_be_bytes(e[..4].try_into().expect("4")) as u64,
                    u32::from_be_bytes(e[4..].try_into().expect("4")),
                )
            })
            .collect();
        assert!(by_ctx.insert(id, extents).is_none(), "one chunk per context");
        if flags & wire::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(by_ctx.len(), 2);
    let mut pos = 0;
    let mut flagged = Vec::new();
    for (len, flags) in &by_ctx[&changed] {
        if *flags == 1 {
            flagged.push((pos, *len));
        }
        pos += len;
    }
    assert_eq!(pos, 16 << 20);
    assert_eq!(flagged, diff_ranges(&sc, "s1", "web"));
    assert_eq!(by_ctx[&base][0], (10 * BS as u64, 0), "web's first 10 blocks are data");
    drop(c);
    server.stop();
}

/// The `sh` blocks of the README's "Incremental backup" section, in order.
fn backup_recipe() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("\n## Incremental backup\n").expect("the README has an Incremental backup section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    section.split("```sh\n").skip(1).map(|b| b[..b.find("```").expect("closed block")].to_string()).collect()
}

/// Run a recipe block with `sh -e` in `dir`, thinctl on the PATH.
fn run_block(dir: &Path, block: &str, env: &[(&str, &str)]) {
    let bin = Path::new(env!("CARGO_BIN_EXE_thinctl")).parent().expect("bin dir").to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("sh")
        .args(["-e", "-c", block])
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().copied())
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "recipe block failed:\n{block}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_readme_incremental_backup_recipe_restores_the_device_byte_for_byte() {
    for t in
        [("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils"), ("nbdinfo", "libnbd-bin"), ("nbdcopy", "libnbd-bin")]
    {
        tool(t.0, t.1, &["--version"]);
    }
    let blocks = backup_recipe();
    assert_eq!(blocks.len(), 3, "full, incremental, restore: {blocks:?}");
    let sc = Scratch::new();
    sc.pool("p", "512M");
    sc.ok(&["create", "p", "vol", "--size", "32M"]);
    sc.file("img", &[pattern(9, 5 << 20), vec![0u8; 3 << 20], pattern(10, 2 << 20)].concat());
    sc.ok(&["import", "p", "vol", "img"]);
    let server = Server::start(&sc, "p");
    let uri = format!("nbd://{}", server.addr);
    let env = |n: &'static str| [("POOL", "p"), ("URI", uri.as_str()), ("DEV", "vol"), ("N", n)];
    let qemu_io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let u = server.uri("vol");
        args.push(&u);
        tool("qemu-io", "qemu-utils", &args);
    };
    run_block(sc.dir.path(), &blocks[0], &env("1"));
    // Writes, zeroes and a discard, then backup 2; more, then backup 3.
    qemu_io(&["write -P 0x51 100k 300k", "write -z 1M 128k", "write -P 0x52 30M 4k", "discard 2M 64k"]);
    run_block(sc.dir.path(), &blocks[1], &env("2"));
    let then = sc.path("then.raw");
    tool("nbdcopy", "libnbd-bin", &[&server.uri("vol"), then.to_str().expect("path")]);
    qemu_io(&["write -P 0x53 0 64k", "write -P 0x54 6M 1M", "discard 4M 192k", "write -P 0x55 31M 1M"]);
    run_block(sc.dir.path(), &blocks[1], &env("3"));
    // Only the last snapshot is left; the incremental files hold only what changed.
    let names: Vec<String> = device_names(&sc, "p");
    assert_eq!(names, ["vol", "vol-backup-3"]);
    let size = |f: &str| std::fs::metadata(sc.path(f)).expect("backup file").len();
    assert!(size("backup-2.qcow2") < 2 << 20, "backup 2 is {} bytes", size("backup-2.qcow2"));
    assert!(size("backup-3.qcow2") < 4 << 20, "backup 3 is {} bytes", size("backup-3.qcow2"));
    run_block(sc.dir.path(), &blocks[2], &env("3"));
    let device = sc.path("device.raw");
    tool("nbdcopy", "libnbd-bin", &[&server.uri("vol"), device.to_str().expect("path")]);
    let (restored, now) =
        (std::fs::read(sc.path("restored.raw")).expect("restored"), std::fs::read(&device).expect("device"));
    assert_eq!(restored.len(), 32 << 20);
    assert!(restored == now, "the restored chain differs from the device");
    // And the chain ending in backup 2 is the device as it was then.
    run_block(sc.dir.path(), &blocks[2], &env("2"));
    let restored = std::fs::read(sc.path("restored.raw")).expect("restored");
    assert!(restored == std::fs::read(&then).expect("then") && restored != now);
    server.stop();
    assert_thin_check(&sc.path("p"), "the backup recipe");
}

#[test]
fn thinctl_rollback_offline_and_served_refused_while_attached() {
    use thinpool::nbd::wire;
    let sc = Scratch::new();
    pool_with_changes(&sc);
    let meta = sc.path("p").join("metadata");
    let snap_bytes = |sc: &Scratch, name: &str, file: &str| -> Vec<u8> {
        sc.ok(&["export", "p", name, file]);
        std::fs::read(sc.path(file)).expect("export")
    };
    let s1 = snap_bytes(&sc, "s1", "s1.raw");
    assert_ne!(snap_bytes(&sc, "web", "web.raw"), s1);
    let before: Value = serde_json::from_str(&sc.ok(&["status", "p", "--json"])).expect("status");
    let out = sc.ok(&["rollback", "p", "web", "s1"]);
    assert!(out.starts_with("rolled \"web\" back to \"s1\": 200 blocks"), "{out}");
    assert_eq!(snap_bytes(&sc, "web", "web.raw"), s1);
    assert!(runs(&sc.ok(&["diff", "p", "s1", "web", "--json"])).is_empty());
    // The blocks only web held (4 rewritten, 1 new) are free.
    let after: Value = serde_json::from_str(&sc.ok(&["status", "p", "--json"])).expect("status");
    assert_eq!(before["data_used_blocks"].as_u64().expect("n") - after["data_used_blocks"].as_u64().expect("n"), 5);
    assert_thin_check(&sc.path("p"), "rollback");
    assert!(sc.run(&["rollback", "p", "web", "web"]).fails(1).contains("cannot be rolled back to itself"));
    assert!(sc.run(&["rollback", "p", "web", "nope"]).fails(1).contains("no such device \"nope\""));

    // Served: write to web, snapshot, write more; rollback refused while attached.
    let server = Server::start(&sc, "p");
    tool("qemu-io", "qemu-utils", &["-f", "raw", "-c", "write -P 0x61 0 1M", &server.uri("web")]);
    sc.ok(&["snapshot", "p", "web", "s2"]);
    tool("qemu-io", "qemu-utils", &["-f", "raw", "-c", "write -P 0x62 512k 2M", &server.uri("web")]);
    let mut c = raw::connect(&server.addr);
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"web");
    go.extend_from_slice(&0u16.to_be_bytes());
    raw::option(&mut c, wire::OPT_GO, &go);
    while raw::reply(&mut c).1 != wire::REP_ACK {}
    let err = sc.run(&["rollback", "p", "web", "s2"]).fails(1).to_string();
    assert!(err.contains("is attached by 1 NBD client"), "{err}");
    drop(c);
    // The server sees the disconnect shortly.
    let mut tries = 0;
    let out = loop {
        let r = sc.run(&["rollback", "p", "web", "s2"]);
        if r.code == 0 || tries == 50 {
            break r.ok().to_string();
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(out.starts_with("rolled \"web\" back to \"s2\""), "{out}");
    let now = sc.path("now.raw");
    tool("nbdcopy", "libnbd-bin", &[&server.uri("web"), now.to_str().expect("path")]);
    let then = sc.path("s2.raw");
    tool("nbdcopy", "libnbd-bin", &[&server.uri("s2"), then.to_str().expect("path")]);
    let now = std::fs::read(now).expect("now");
    assert!(now == std::fs::read(then).expect("then"));
    assert!(now[..1 << 20].iter().all(|&b| b == 0x61));
    server.stop();
    assert_thin_check(&sc.path("p"), "served rollback");
    let (ok, out) = common::thin_check(&meta);
    assert!(ok, "{out}");
}
