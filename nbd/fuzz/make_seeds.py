#!/usr/bin/env python3
"""Writes the seed corpus for the fuzz targets (corpus/<target>/seed-*). Byte 0 of every input
selects how the target splits the stream into reads; the rest is what a client would send."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
REQ_MAGIC = 0x25609513
IHAVEOPT = 0x49484156454F5054


def req(cmd, flags=0, cookie=1, offset=0, length=0, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def s32(b):
    return struct.pack(">I", len(b)) + b


def go_data(name, infos=()):
    return s32(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    return s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


requests = {
    "read": b"\x00" + req(0, length=4096),
    "read-df-fua": b"\x05" + req(0, flags=0x5, cookie=2**64 - 1, offset=512, length=512),
    "write": b"\x03" + req(1, length=512, payload=b"\xab" * 512),
    "write-fua-chunked": b"\x3f" + req(1, flags=1, offset=4096, length=100, payload=bytes(range(100))),
    "disc": b"\x01" + req(2),
    "flush-trim-zero": b"\x07" + req(3) + req(4, offset=4096, length=8192) + req(6, flags=0x12, length=65536),
    "block-status-req-one": b"\x02" + req(7, flags=8, length=1 << 20),
    "cache": b"\x09" + req(5, offset=1 << 30, length=1 << 20),
    "unknown-cmd": b"\x00" + req(99, flags=0xFFFF, offset=2**64 - 1, length=2**32 - 1),
    "bad-magic": b"\x00" + b"\xde\xad\xbe\xef" + bytes(24),
    "truncated-header": b"\x00" + req(0, length=512)[:20],
    "truncated-payload": b"\x00" + req(1, length=4096, payload=b"x" * 100),
    "huge-write": b"\x00" + req(1, length=2**32 - 1),
    "max-write-header": b"\x00" + req(1, length=1 << 25),
    "zero-length": b"\x0b" + req(0) + req(1) + req(7) + req(6) + req(4),
    "offset-overflow": b"\x00" + req(0, offset=2**64 - 512, length=4096),
    "pipelined": b"\x11" + b"".join(req(i % 8, cookie=i, offset=i * 512, length=512,
                                        payload=b"p" * 512 if i % 8 == 1 else b"") for i in range(16)),
}

options = {
    "go-block-size": b"\x00" + struct.pack(">I", 3) + opt(7, go_data(b"disk", (3, 1, 2))),
    "info-then-go": b"\x04" + struct.pack(">I", 1) + opt(6, go_data(b"", (0, 3))) + opt(7, go_data(b"disk")),
    "export-name": b"\x02" + struct.pack(">I", 3) + opt(1, b"disk"),
    "list-abort": b"\x01" + struct.pack(">I", 3) + opt(3) + opt(2),
    "starttls-structured": b"\x00" + struct.pack(">I", 3) + opt(5) + opt(8) + opt(11),
    "meta-list-set": b"\x06" + struct.pack(">I", 3) + opt(8) + opt(9, meta_data(b"disk", [])) +
                     opt(9, meta_data(b"disk", [b"base:"])) +
                     opt(10, meta_data(b"disk", [b"base:allocation", b"qemu:dirty-bitmap:x"])),
    "unknown-option": b"\x00" + struct.pack(">I", 3) + opt(4242, b"junk" * 10),
    "unknown-client-flags": b"\x00" + struct.pack(">I", 0xFFFFFFFF) + opt(7, go_data(b"x")),
    "oversized": b"\x00" + struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF) + b"z" * 64,
    "oversized-small-limit": b"\x80" + struct.pack(">I", 3) + opt(7, b"y" * 100) + opt(3),
    "go-name-too-long": b"\x00" + struct.pack(">I", 3) + opt(7, struct.pack(">I", 1000) + b"ab\x00\x00"),
    "meta-huge-count": b"\x00" + struct.pack(">I", 3) + opt(10, s32(b"d") + struct.pack(">I", 0xFFFFFFFF)),
    "go-trailing-and-utf8": b"\x03" + struct.pack(">I", 3) + opt(7, go_data(b"\xff\xfe") + b"extra"),
    "bad-magic": b"\x00" + struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8),
    "truncated": b"\x00" + struct.pack(">I", 3) + opt(7, go_data(b"disk"))[:21],
}

for target, seeds in (("request_decoder", requests), ("option_parser", options)):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
