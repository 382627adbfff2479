#!/usr/bin/env python3
"""Extract seed inputs for the fuzz targets from kernel-written metadata images.

usage: tools/extract-fuzz-seeds.py OUT_DIR METADATA_IMAGE...

Each 4 KiB block whose checksum verifies with one of the dm-thin salts is sorted
by kind: superblocks -> superblock/, B-tree nodes -> btree_node/ (a few per value
size and kind), bitmaps and index blocks -> space_map_blocks/. Also writes a few
mutation records for open_pool/. (The xml_restore/ seeds are small hand-written
thin_dump documents, valid and broken; nbd_client_bytes/ are client byte streams.)
"""
import os
import struct
import sys

POLY = 0x82F63B78
TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)


def crc32c_raw(data):
    c = 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c  # not inverted, like the kernel's helper


SALTS = {160774: "superblock", 121107: "node", 240779: "bitmap", 160478: "index"}


def kind_of(block):
    stored = struct.unpack_from("<I", block, 0)[0]
    return SALTS.get(stored ^ crc32c_raw(block[4:]))


def main():
    out = sys.argv[1]
    per_class = {}
    for path in sys.argv[2:]:
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        with open(path, "rb") as f:
            data = f.read()
        for n in range(len(data) // 4096):
            block = data[n * 4096:(n + 1) * 4096]
            if not any(block):
                continue
            k = kind_of(block)
            if k is None:
                continue
            if k == "node":
                flags, = struct.unpack_from("<I", block, 4)
                vs, = struct.unpack_from("<I", block, 24)
                cls = ("btree_node", f"f{flags}v{vs}")
            elif k == "superblock":
                cls = ("superblock", "sb")
            else:
                cls = ("space_map_blocks", k)
            key = (name,) + cls
            if per_class.get(key, 0) >= 2:
                continue
            per_class[key] = per_class.get(key, 0) + 1
            d = os.path.join(out, cls[0])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{name}-{cls[1]}-{n}"), "wb") as f:
                f.write(block)
    d = os.path.join(out, "open_pool")
    os.makedirs(d, exist_ok=True)
    seeds = {
        "unchanged": b"\x00",
        "flip-superblock": b"\x00" + struct.pack("<IB", 0x30, 1),
        "resealed-node-count": b"\x01" + struct.pack("<IB", 4096 * 6 + 16, 0x7F),
        "resealed-key": b"\x01" + struct.pack("<IB", 4096 * 9 + 40, 0xFF),
        "resealed-bitmap": b"\x01" + struct.pack("<IB", 4096 * 3 + 20, 0x55),
        "resealed-child-pointer": b"\x01" + struct.pack("<IB", 4096 * 5 + 32 + 8 * 252, 0x03),
    }
    for fname, content in seeds.items():
        with open(os.path.join(d, fname), "wb") as f:
            f.write(content)


if __name__ == "__main__":
    main()
