//! `thinctl send` / `thinctl receive`, the real binaries joined by a plain pipe:
//! full and incremental chains round trip byte for byte (into a pool of another
//! block size too), damaged, cut-off and wrong-base streams change nothing, and a
//! served pool sends and receives through its control socket.

mod common;

#[allow(dead_code)]
#[path = "cli/support.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::assert_checks_pass;
use support::*;

fn thinctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_thinctl"))
}

/// `thinctl send ARGS | thinctl receive RARGS` through a plain pipe: (send, receive).
fn pipe(sc: &Scratch, send: &[&str], receive: &[&str]) -> (Run2, Run2) {
    let mut tx = thinctl()
        .arg("send")
        .args(send)
        .current_dir(sc.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let rx = thinctl()
        .arg("receive")
        .args(receive)
        .current_dir(sc.dir.path())
        .stdin(Stdio::from(tx.stdout.take().expect("send stdout")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn receive");
    let r = rx.wait_with_output().expect("receive");
    let s = tx.wait_with_output().expect("send");
    (Run2::from(&s), Run2::from(&r))
}

/// Exit code and output of a finished process.
#[derive(Debug)]
struct Run2 {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run2 {
    fn from(o: &std::process::Output) -> Run2 {
        Run2 {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    #[track_caller]
    fn ok(&self, what: &str) {
        assert_eq!(self.code, 0, "{what} failed:\n{}{}", self.stdout, self.stderr);
    }
}

/// The bytes of device `name` of `pool` (through `thinctl export`).
fn device_bytes(sc: &Scratch, pool: &str, name: &str) -> Vec<u8> {
    let out = sc.path(&format!("export-{pool}-{name}"));
    sc.ok(&["export", pool, name, out.to_str().expect("utf8")]);
    let b = std::fs::read(&out).expect("read export");
    std::fs::remove_file(&out).expect("rm");
    b
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const BS: u64 = 64 << 10;

/// Change the model image and device `v` of pool `a` the same way: random writes
/// of random bytes, zeroed ranges (whole zero blocks end up unmapped by import),
/// a discard of whole blocks, and sometimes a resize.
fn mutate(sc: &Scratch, rng: &mut Rng, model: &mut Vec<u8>, round: usize) {
    if round == 2 {
        model.resize(model.len() + 700_001, 0);
        sc.ok(&["resize", "a", "v", "--size", &model.len().to_string()]);
    }
    if round == 4 {
        let new = model.len() - 1_300_000;
        model.truncate(new);
        sc.ok(&["resize", "a", "v", "--size", &new.to_string()]);
    }
    let len = model.len() as u64;
    for _ in 0..6 {
        let off = rng.below(len);
        let n = (1 + rng.below(200_000)).min(len - off);
        let bytes = pattern(rng.next(), n as usize);
        model[off as usize..(off + n) as usize].copy_from_slice(&bytes);
    }
    for _ in 0..2 {
        let off = rng.below(len);
        let n = (1 + rng.below(300_000)).min(len - off);
        model[off as usize..(off + n) as usize].fill(0);
    }
    let img = sc.file("img", model);
    sc.ok(&["import", "a", "v", img.to_str().expect("utf8")]);
    let off = rng.below(len / BS) * BS;
    let n = (1 + rng.below(4)) * BS;
    let n = n.min(len / BS * BS - off);
    if n > 0 {
        sc.ok(&["discard", "a", "v", "--offset", &off.to_string(), "--length", &n.to_string()]);
        model[off as usize..(off + n) as usize].fill(0);
    }
}

#[test]
fn full_and_incremental_chains_of_five_round_trip_byte_for_byte() {
    for seed in [0x5eed_u64, 0xfeed_beef] {
        let sc = Scratch::new();
        sc.pool("a", "64M");
        // The receivers: b has 128 KiB blocks (records are bytes, so any block size
        // receives), c the sender's 64 KiB.
        sc.ok(&["pool", "create", "b", "--data-size", "64M", "--block-size", "128k"]);
        sc.pool("c", "64M");
        let mut model = vec![0u8; 4 << 20];
        sc.ok(&["create", "a", "v", "--size", &model.len().to_string()]);
        let mut rng = Rng(seed);
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        for round in 0..5 {
            mutate(&sc, &mut rng, &mut model, round);
            let s = format!("s{round}");
            sc.ok(&["snapshot", "a", "v", &s]);
            // Incremental chain into b (the first one full), full copies into c.
            let (tx, rx) = match snaps.last() {
                None => pipe(&sc, &["a", &s], &["b", &s]),
                Some((prev, _)) => pipe(&sc, &["a", &s, "--from", prev], &["b", &s]),
            };
            tx.ok("send");
            rx.ok("receive");
            if round > 0 {
                assert!(rx.stdout.contains("incremental"), "{}", rx.stdout);
            }
            let (tx, rx) = pipe(&sc, &["a", &s], &["c", &s]);
            tx.ok("full send");
            rx.ok("full receive");
            assert!(rx.stdout.contains("full"), "{}", rx.stdout);
            snaps.push((s, model.clone()));
            for (name, want) in &snaps {
                for pool in ["a", "b", "c"] {
                    let got = device_bytes(&sc, pool, name);
                    assert_eq!(got.len(), want.len(), "seed {seed:#x} round {round}: size of {pool}/{name}");
                    assert!(got == *want, "seed {seed:#x} round {round}: bytes of {pool}/{name} differ");
                }
            }
        }
        for pool in ["a", "b", "c"] {
            assert_checks_pass(&sc.path(pool).join("metadata"));
            sc.ok(&["check", pool]);
        }
        // An incremental stream carries only what changed: far less than the device.
        let st = sc.path("inc.st");
        let out = thinctl()
            .args(["send", "a", "s4", "--from", "s3"])
            .current_dir(sc.dir.path())
            .stdout(std::fs::File::create(&st).expect("create"))
            .output()
            .expect("send");
        assert!(out.status.success());
        let inc = std::fs::metadata(&st).expect("stat").len();
        assert!(inc < model.len() as u64 / 2, "incremental stream of {inc} bytes for a {} byte device", model.len());
    }
}

/// What a pool looks like to a user: devices, their bytes, pool.toml, data use.
fn state(sc: &Scratch, pool: &str) -> (String, Vec<Vec<u8>>, String, u64) {
    let names = device_names(sc, pool);
    let bytes = names.iter().map(|n| device_bytes(sc, pool, n)).collect();
    let toml = std::fs::read_to_string(sc.path(pool).join("pool.toml")).expect("pool.toml");
    let used = status_json(sc, pool)["data_used_blocks"].as_u64().expect("used");
    (names.join(","), bytes, toml, used)
}

/// Streams of `a`: `s1` in full and `s2` since `s1`.
fn two_streams(sc: &Scratch) -> (Vec<u8>, Vec<u8>) {
    sc.pool("a", "64M");
    sc.ok(&["create", "a", "v", "--size", "2M"]);
    let img = sc.file("img", &pattern(1, 1_500_000));
    sc.ok(&["import", "a", "v", img.to_str().expect("utf8")]);
    sc.ok(&["snapshot", "a", "v", "s1"]);
    let mut m = pattern(1, 1_500_000);
    m[100_000..400_000].copy_from_slice(&pattern(2, 300_000));
    m[700_000..900_000].fill(0);
    let img = sc.file("img", &m);
    sc.ok(&["import", "a", "v", img.to_str().expect("utf8")]);
    sc.ok(&["snapshot", "a", "v", "s2"]);
    let s1 = sc.run(&["send", "a", "s1"]);
    s1.ok();
    let s2 = sc.run(&["send", "a", "s2", "--from", "s1"]);
    s2.ok();
    (s1.raw_stdout.clone(), s2.raw_stdout.clone())
}

#[test]
fn damaged_and_cut_off_streams_are_refused_and_change_nothing() {
    let sc = Scratch::new();
    let (s1, s2) = two_streams(&sc);
    sc.pool("b", "64M");
    // Full stream into an empty pool, then an incremental one on top of its base.
    for (stream, setup) in [(&s1, false), (&s2, true)] {
        if setup {
            sc.run_with_input(&["receive", "b", "s1"], Some(&s1)).ok();
        }
        let before = state(&sc, "b");
        let n = stream.len();
        let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
        for cut in [0, 5, 79, 80, 81, 112, n / 2, n - 41, n - 40, n - 1] {
            cases.push((format!("cut at {cut} of {n}"), stream[..cut].to_vec()));
        }
        for at in [3, 40, 76, 80, 84, 90, 104, 112, 5000, n / 2, n - 30, n - 8] {
            let mut m = stream.clone();
            m[at] ^= 0x10;
            cases.push((format!("byte {at} of {n} flipped"), m));
        }
        let mut more = stream.clone();
        more.extend_from_slice(b"junk");
        cases.push(("bytes after the end".into(), more));
        for (what, input) in cases {
            let r = sc.run_with_input(&["receive", "b", "new"], Some(&input));
            let err = r.fails(1);
            assert!(
                ["truncated", "damaged", "invalid", "not a thinpool", "inconsistent", "after the end", "header"]
                    .iter()
                    .any(|w| err.contains(w)),
                "{what}: unclear error: {err}"
            );
            assert_eq!(state(&sc, "b"), before, "{what}: the pool changed");
        }
        assert_checks_pass(&sc.path("b").join("metadata"));
    }
    // And the intact streams still go through.
    sc.run_with_input(&["receive", "b", "s2"], Some(&s2)).ok();
    assert_eq!(device_bytes(&sc, "b", "s2"), device_bytes(&sc, "a", "s2"));
}

#[test]
fn an_incremental_stream_needs_its_exact_base() {
    let sc = Scratch::new();
    let (s1, s2) = two_streams(&sc);
    // No base at all.
    sc.pool("b", "64M");
    let err = sc.run_with_input(&["receive", "b", "s2"], Some(&s2)).fails(1).to_string();
    assert!(err.contains("has none; receive its base first"), "{err}");
    // A device with the base's name but not its identity.
    sc.ok(&["create", "b", "s1", "--size", "2M"]);
    let err = sc.run_with_input(&["receive", "b", "s2"], Some(&s2)).fails(1).to_string();
    assert!(err.contains("has none"), "{err}");
    assert_eq!(device_names(&sc, "b"), vec!["s1"]);
    // The right base, changed after it was received.
    sc.pool("c", "64M");
    sc.run_with_input(&["receive", "c", "s1"], Some(&s1)).ok();
    sc.ok(&["discard", "c", "s1", "--offset", "0", "--length", "65536"]);
    let err = sc.run_with_input(&["receive", "c", "s2"], Some(&s2)).fails(1).to_string();
    assert!(err.contains("changed since"), "{err}");
    assert_eq!(device_names(&sc, "c"), vec!["s1"]);
    // A snapshot of the received base is the same content, but not the identity:
    // only the received device itself (unchanged) is a base.
    sc.pool("d", "64M");
    sc.run_with_input(&["receive", "d", "s1"], Some(&s1)).ok();
    sc.ok(&["snapshot", "d", "s1", "s1-copy"]);
    sc.run_with_input(&["receive", "d", "s2"], Some(&s2)).ok();
    assert_eq!(device_bytes(&sc, "d", "s2"), device_bytes(&sc, "a", "s2"));
    // The sender refuses bases without a valid identity.
    let err = sc.run(&["send", "a", "s2", "--from", "v"]).fails(1).to_string();
    assert!(err.contains("never been sent or received"), "{err}");
    let img = sc.file("img2", &pattern(9, 70_000));
    sc.ok(&["import", "a", "s1", img.to_str().expect("utf8")]);
    let err = sc.run(&["send", "a", "s2", "--from", "s1"]).fails(1).to_string();
    assert!(err.contains("was changed after it was sent"), "{err}");
    // A name that exists is refused before anything is read into the pool.
    let err = sc.run_with_input(&["receive", "d", "s1"], Some(&s1)).fails(1).to_string();
    assert!(err.contains("s1"), "{err}");
    for p in ["a", "b", "c", "d"] {
        assert_checks_pass(&sc.path(p).join("metadata"));
    }
}

/// A running `thinctl serve`, killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(sc: &Scratch, pool: &str) -> Server {
        let mut child = thinctl()
            .args(["serve", pool, "--listen", "127.0.0.1:0", "--commit-interval-ms", "100"])
            .current_dir(sc.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn thinctl serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert!(line.contains("serving"), "{line}");
        Server { child }
    }

    fn stop(mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("kill");
        assert_eq!(self.child.wait().expect("wait").code(), Some(0));
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn served_pools_send_and_receive_through_the_control_socket() {
    let sc = Scratch::new();
    let (_, s2) = two_streams(&sc);
    let want1 = device_bytes(&sc, "a", "s1");
    let want2 = device_bytes(&sc, "a", "s2");
    sc.pool("b", "64M");
    // Receive into a served pool, from a pipe.
    let server_b = Server::start(&sc, "b");
    assert!(sc.path("b").join("control.sock").exists());
    let (tx, rx) = pipe(&sc, &["a", "s1"], &["b", "s1"]);
    tx.ok("send");
    rx.ok("receive into a served pool");
    // A damaged stream is refused by the server, which keeps serving.
    let mut bad = s2.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    let err = sc.run_with_input(&["receive", "b", "s2"], Some(&bad)).fails(1).to_string();
    assert!(err.contains("damaged"), "{err}");
    let cut = &s2[..s2.len() - 10];
    let err = sc.run_with_input(&["receive", "b", "s2"], Some(cut)).fails(1).to_string();
    assert!(err.contains("truncated"), "{err}");
    sc.run_with_input(&["receive", "b", "s2"], Some(&s2)).ok();
    assert_eq!(device_names(&sc, "b"), vec!["s1", "s2"]);
    // Send from the served pool too: its streams go on to an offline pool.
    sc.pool("c", "64M");
    let (tx, rx) = pipe(&sc, &["b", "s1"], &["c", "s1"]);
    tx.ok("send from a served pool");
    rx.ok("receive");
    let (tx, rx) = pipe(&sc, &["b", "s2", "--from", "s1"], &["c", "s2"]);
    tx.ok("incremental send from a served pool");
    rx.ok("incremental receive");
    // A served send of a device with no valid base is refused with the reason.
    let r = sc.run(&["send", "b", "s2", "--from", "nope"]);
    assert!(r.fails(1).contains("nope"), "{}", r.stderr);
    server_b.stop();
    assert_eq!(device_bytes(&sc, "b", "s1"), want1);
    assert_eq!(device_bytes(&sc, "b", "s2"), want2);
    assert_eq!(device_bytes(&sc, "c", "s1"), want1);
    assert_eq!(device_bytes(&sc, "c", "s2"), want2);
    for p in ["b", "c"] {
        assert_checks_pass(&sc.path(p).join("metadata"));
        assert!(!std::fs::read_to_string(sc.path(p).join("pool.toml")).expect("toml").contains("hidden"));
    }
}

#[test]
fn a_receive_cut_off_by_a_crash_leaves_no_device_behind() {
    let sc = Scratch::new();
    let (s1, _) = two_streams(&sc);
    sc.pool("b", "64M");
    let server = Server::start(&sc, "b");
    // Half a stream, then the server is killed while it waits for the rest.
    let mut rx = thinctl()
        .args(["receive", "b", "s1"])
        .current_dir(sc.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("receive");
    {
        use std::io::Write;
        let mut stdin = rx.stdin.take().expect("stdin");
        stdin.write_all(&s1[..s1.len() / 2]).expect("half");
        std::thread::sleep(std::time::Duration::from_millis(800));
        assert!(std::fs::read_to_string(sc.path("b").join("pool.toml")).expect("toml").contains("hidden"));
        drop(server); // SIGKILL
        drop(stdin);
    }
    assert_ne!(rx.wait().expect("wait").code(), Some(0));
    // The hidden device is not shown, and the next writable open deletes it.
    assert!(device_names(&sc, "b").is_empty());
    sc.ok(&["create", "b", "x", "--size", "1M"]);
    assert_eq!(device_names(&sc, "b"), vec!["x"]);
    let toml = std::fs::read_to_string(sc.path("b").join("pool.toml")).expect("toml");
    assert!(!toml.contains("hidden"), "{toml}");
    let dump = common::thin_dump(&sc.path("b").join("metadata"));
    assert_eq!(dump.matches("<device ").count(), 1, "{dump}");
    assert_checks_pass(&sc.path("b").join("metadata"));
}

#[test]
fn send_and_receive_refuse_terminals_and_say_what_they_need() {
    let sc = Scratch::new();
    sc.pool("a", "16M");
    let r = sc.run(&["receive", "a", "x"]);
    // stdin is /dev/null here: an empty stream is a truncated one.
    assert!(r.fails(1).contains("truncated"), "{}", r.stderr);
    assert!(device_names(&sc, "a").is_empty());
    let r = sc.run(&["send", "a", "nope"]);
    assert!(r.fails(1).contains("no such device"), "{}", r.stderr);
}

#[test]
fn summaries_come_as_json_too() {
    let sc = Scratch::new();
    let (s1, _) = two_streams(&sc);
    let sent = sc.run(&["send", "a", "s2", "--from", "s1", "--json"]);
    sent.ok();
    let tx: serde_json::Value = serde_json::from_str(sent.stderr.trim()).expect("send --json");
    sc.pool("b", "64M");
    sc.run_with_input(&["receive", "b", "s1"], Some(&s1)).ok();
    let got = sc.run_with_input(&["receive", "b", "s2", "--json"], Some(&sent.raw_stdout));
    let rx: serde_json::Value = serde_json::from_str(got.ok().trim()).expect("receive --json");
    assert_eq!(rx["base_name"], "s1");
    assert_eq!(rx["id"], 1);
    for field in ["source_identity", "base_identity", "data_records", "data_bytes", "zero_records", "zero_bytes"] {
        assert_eq!(rx[field], tx[field], "{field}");
    }
    assert_eq!(tx["stream_bytes"].as_u64(), Some(sent.raw_stdout.len() as u64));
    assert_eq!(rx["stream_bytes"].as_u64(), Some(sent.raw_stdout.len() as u64));
    assert!(tx["data_records"].as_u64().expect("n") > 0 && tx["zero_records"].as_u64().expect("n") > 0, "{tx}");
}
