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
