#!/usr/bin/env python3
"""Helpers for tools/bench-nbd.sh: fio replay logs, fio JSON parsing, medians and the table.

  bench.py iolog OUT BASE N [sync]      write a fio v2 iolog: N 4 KiB writes, one at the start of
                                        each of N 64 KiB blocks from byte BASE, in a random order
                                        (each write is the first into its block); with "sync", a
                                        FLUSH after every write
  bench.py record RESULTS FIO_JSON JOB SERVER ROUND CPU_TICKS
                                        append one result line (JSON) to RESULTS
  bench.py report RESULTS [JSON_OUT]    print medians per cell and ratios; dump them as JSON
"""
import json
import os
import random
import statistics
import sys

STRIDE = 64 * 1024  # thinpool's default data block and the qcow2 cluster size used here


def iolog(out, base, n, sync=False):
    offs = [base + i * STRIDE for i in range(n)]
    random.Random(base ^ n).shuffle(offs)
    with open(out, "w") as f:
        f.write("fio version 2 iolog\nx add\nx open\n")
        for o in offs:
            f.write(f"x write {o} 4096\n")
            if sync:
                f.write("x sync 0 0\n")
        f.write("x close\n")


def load_fio(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])["jobs"]  # fio's nbd engine may print a line first


def p99_us(side):
    pct = side.get("clat_ns", {}).get("percentile") or {}
    v = pct.get("99.000000")
    return v / 1000.0 if v else None


def record(results, fio_json, job, server, rnd, cpu_ticks):
    jobs = load_fio(fio_json)
    tck = os.sysconf("SC_CLK_TCK")
    rec = {"job": job, "server": server, "round": int(rnd)}
    ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))
    rec["ios"] = ios
    # cpu_ticks "-": the server died during the job (restarted by the script): no CPU figure.
    rec["cpu_us_per_io"] = (int(cpu_ticks) / tck * 1e6 / ios) if ios and cpu_ticks != "-" else None
    if job == "flush-storm":
        r = next(j for j in jobs if j["jobname"] == "reader")
        w = next(j for j in jobs if j["jobname"] == "writer")
        rec["iops"] = r["read"]["iops"]
        rec["p99_us"] = p99_us(r["read"])
        rec["writer_iops"] = w["write"]["iops"]
        rec["bw"] = r["read"]["bw_bytes"]
    else:
        rec["iops"] = sum(j[d]["iops"] for j in jobs for d in ("read", "write"))
        rec["bw"] = sum(j[d]["bw_bytes"] for j in jobs for d in ("read", "write"))
        sides = [j[d] for j in jobs for d in ("read", "write") if j[d]["total_ios"]]
        p = [p99_us(s) for s in sides if p99_us(s) is not None]
        rec["p99_us"] = max(p) if p else None
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")


SERVERS = ("thinpool", "qemu", "nbdkit")


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def report(results, json_out=None):
    recs = [json.loads(l) for l in open(results) if l.strip()]
    order = []
    cells = {}
    for r in recs:
        if r["job"] not in order:
            order.append(r["job"])
        cells.setdefault((r["job"], r["server"]), []).append(r)
    summary = {}
    for (job, server), rs in cells.items():
        summary.setdefault(job, {})[server] = {
            k: med([r.get(k) for r in rs])
            for k in ("iops", "bw", "p99_us", "cpu_us_per_io", "writer_iops")
        } | {"rounds": len(rs), "iops_all": [round(r["iops"]) for r in rs]}

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def ratio(a, b):
        return f"{a / b:6.2f}" if a and b else "     -"

    print()
    print("Median over rounds. IOPS counts reads+writes; /qemu and /nbdkit are thinpool's IOPS over theirs;")
    print("cpu = server CPU (utime+stime) per I/O in µs; spread = thinpool's min-max IOPS over rounds.")
    hdr = (f"{'job':<24} | {'thinpool':>8} {'MB/s':>6} | {'qemu':>8} {'MB/s':>6} | {'nbdkit':>8} {'MB/s':>6}"
           f" | {'/qemu':>6} {'/nbdkit':>6} | {'cpu t':>6} {'q':>5} {'k':>5} | spread")
    print(hdr)
    print("-" * len(hdr))
    for job in order:
        if job in ("flush-storm", "storm-reader-alone"):
            continue
        s = summary[job]
        t, q, k = (s.get(x, {}) for x in SERVERS)
        spread = t.get("iops_all") or []
        print(f"{job:<24} | {f(t.get('iops'), '8.0f')} {f((t.get('bw') or 0) / 1e6, '6.1f')}"
              f" | {f(q.get('iops'), '8.0f')} {f((q.get('bw') or 0) / 1e6, '6.1f')}"
              f" | {f(k.get('iops'), '8.0f')} {f((k.get('bw') or 0) / 1e6, '6.1f')}"
              f" | {ratio(t.get('iops'), q.get('iops'))} {ratio(t.get('iops'), k.get('iops'))}"
              f" | {f(t.get('cpu_us_per_io'), '6.1f')} {f(q.get('cpu_us_per_io'), '5.1f')}"
              f" {f(k.get('cpu_us_per_io'), '5.1f')} | {min(spread) if spread else '-'}-{max(spread) if spread else '-'}")
    if "flush-storm" in summary:
        s = summary["flush-storm"]
        alone = summary.get("storm-reader-alone", {})
        print()
        print("Flush storm: writer = 4 KiB writes into new blocks, FLUSH after each, QD1, on one export;")
        print("reader = 4 KiB random reads at QD32 on another export of the same server.")
        print("alone = the same reader with no writer (storm-reader-alone); cpu counts reads and writes.")
        print(f"{'server':<10} | {'reader IOPS':>11} {'p99 µs':>8} | {'alone IOPS':>10} {'p99 µs':>8} {'storm/alone':>11}"
              f" | {'writer IOPS':>11} | {'cpu µs/IO':>9}")
        for srv in SERVERS:
            x, a = s.get(srv, {}), alone.get(srv, {})
            print(f"{srv:<10} | {f(x.get('iops'), '11.0f')} {f(x.get('p99_us'), '8.0f')}"
                  f" | {f(a.get('iops'), '10.0f')} {f(a.get('p99_us'), '8.0f')} {ratio(x.get('iops'), a.get('iops')):>11}"
                  f" | {f(x.get('writer_iops'), '11.0f')} | {f(x.get('cpu_us_per_io'), '9.1f')}")
        t, k = s.get("thinpool", {}), s.get("nbdkit", {})
        if t.get("iops") and k.get("iops") and t.get("p99_us") and k.get("p99_us"):
            print(f"thinpool/nbdkit reader IOPS {t['iops'] / k['iops']:.2f}; "
                  f"nbdkit p99 / thinpool p99 {k['p99_us'] / t['p99_us']:.2f} (>= 1.00: thinpool's p99 at least as good)")
    rss = []
    if os.environ.get("RSS_FILE") and os.path.exists(os.environ["RSS_FILE"]):
        for line in open(os.environ["RSS_FILE"]):
            srv, pid, roles, kb, prog = (line.split() + ["-"] * 5)[:5]
            rss.append({"server": srv, "pid": int(pid), "exports": roles, "vmhwm_kib": int(kb) if kb.isdigit() else None,
                        "program": prog})
    if rss:
        print()
        print("Peak RSS (VmHWM at the end of the run) of each server process:")
        for x in sorted(rss, key=lambda x: (SERVERS.index(x["server"]) if x["server"] in SERVERS else 9, x["exports"])):
            mib = f"{x['vmhwm_kib'] / 1024:8.1f} MiB" if x["vmhwm_kib"] else "       - MiB"
            print(f"  {x['server']:<9} {x['program']:<20} {mib}  exports {x['exports']}")
    if json_out:
        with open(json_out, "w") as fo:
            json.dump({"summary": summary, "records": recs, "peak_rss": rss}, fo, indent=1)
    return summary


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "iolog":
        iolog(args[0], int(args[1]), int(args[2]), len(args) > 3 and args[3] == "sync")
    elif cmd == "record":
        record(*args)
    elif cmd == "report":
        report(args[0], args[1] if len(args) > 1 else None)
    else:
        sys.exit(f"unknown command {cmd}")
