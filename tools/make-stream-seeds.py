#!/usr/bin/env python3
"""Write the seed corpus of the `replication_stream` fuzz target
(fuzz/seeds/replication_stream/) straight from the byte tables documented in
src/stream/format.rs, independently of the Rust encoder: small valid streams (full
and incremental, DATA and ZERO records) and a few broken ones."""

import os
import struct
import sys

POLY = 0x82F63B78  # CRC32C, reflected


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        t.append(c)
    return t


TABLE = _table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def header(block, size, source, base=None, base_bytes=0):
    flags = 1 if base else 0
    h = b"TPSTREAM" + struct.pack("<IIQQ", 1, flags, block, size) + source + (base or bytes(16))
    h += struct.pack("<QI", base_bytes, 0)
    return h + struct.pack("<I", crc32c(h))


def record(kind, offset, length, payload=b""):
    h = struct.pack("<IIQQ", kind, len(payload), offset, length)
    return h + struct.pack("<II", crc32c(payload, crc32c(h)), 0) + payload


def stream(hdr, records):
    body = hdr + b"".join(records)
    nd = sum(1 for r in records if struct.unpack_from("<I", r)[0] == 1)
    db = sum(struct.unpack_from("<Q", r, 16)[0] for r in records if struct.unpack_from("<I", r)[0] == 1)
    nz = sum(1 for r in records if struct.unpack_from("<I", r)[0] == 2)
    zb = sum(struct.unpack_from("<Q", r, 16)[0] for r in records if struct.unpack_from("<I", r)[0] == 2)
    end = struct.pack("<QQQQII", nd, db, nz, zb, crc32c(body), 0)
    return body + record(3, 0, 0, end)


def main(out):
    os.makedirs(out, exist_ok=True)
    src, base = bytes(range(1, 17)), bytes(range(101, 117))
    seeds = {
        "empty_full": stream(header(65536, 1 << 20, src), []),
        "full": stream(
            header(65536, 1 << 20, src),
            [record(1, 0, 16, b"0123456789abcdef"), record(2, 65536, 131072), record(1, 200000, 3, b"xyz")],
        ),
        "incremental": stream(
            header(131072, 3 << 20, src, base, 2 << 20),
            [record(2, 0, 4096), record(1, 4096, 8, b"ABCDEFGH"), record(2, (2 << 20) - 10, 10)],
        ),
        "adjacent_zeros": stream(header(65536, 65536 * 4, src), [record(2, 0, 65536), record(2, 65536, 65536)]),
        "last_byte": stream(header(65536, 100001, src), [record(1, 100000, 1, b"\xff")]),
    }
    bad = dict(seeds)
    bad["truncated"] = seeds["full"][:-7]
    bad["overlap"] = stream(header(65536, 1 << 20, src), [record(2, 100, 100), record(2, 150, 10)])
    bad["huge_claim"] = header(65536, 1 << 20, src) + struct.pack("<IIQQII", 1, 0xFFFFFFF0, 0, 0xFFFFFFF0, 0, 0)
    for name, data in bad.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fuzz", "seeds", "replication_stream"))
