#!/usr/bin/python3
"""Clients that negotiate no block size, against an export whose device has a 4 KiB minimum.

usage: nbd_default_sizes.py URI SIZE SEED ORACLE_OUT [INITIAL_IMAGE]

The export must initially hold the bytes of INITIAL_IMAGE, or without it pattern_byte(i) at
every offset i. Two kinds of client are used,
as the NBD spec allows a client to skip block-size negotiation:
  - handshake flags 0: not fixed-newstyle, so the client can only use NBD_OPT_EXPORT_NAME;
  - set_request_block_size(False): NBD_OPT_GO without NBD_INFO_BLOCK_SIZE.
Each does reads, writes and zeroes at odd 512-byte offsets and lengths (several in flight on
one 4 KiB block at once), compared against an oracle bytearray; the final oracle is written to
ORACLE_OUT so the caller can compare it with the device.
"""
import random
import sys

import nbd

uri, size, seed, oracle_out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
passed = 0
failed = 0


def check(name, cond):
    global passed, failed
    if cond:
        passed += 1
        print("PASS", name)
    else:
        failed += 1
        print("FAIL", name)


def pattern_byte(i):
    return (i * 7 + 3) % 251


if len(sys.argv) > 5:
    with open(sys.argv[5], "rb") as f:
        oracle = bytearray(f.read())
    assert len(oracle) == size, "the initial image must be SIZE bytes"
else:
    oracle = bytearray(pattern_byte(i) for i in range(size))


def connect(kind):
    h = nbd.NBD()
    if kind == "export-name":
        h.set_handshake_flags(0)
    else:
        h.set_request_block_size(False)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def rand_range(limit=64 * 1024):
    off = rng.randrange(0, size // 512 - 1) * 512
    n = rng.randrange(1, 1 + min(limit, size - off) // 512) * 512
    return off, n


for kind in ["export-name", "go-without-block-size"]:
    h = connect(kind)
    check(kind + ": size", h.get_size() == size)
    if kind == "export-name":
        check(kind + ": no fixed newstyle", h.get_handshake_flags() == 0)
    check(kind + ": no minimum announced", h.get_block_size(nbd.SIZE_MINIMUM) == 0)
    errors = 0
    for round_ in range(150):
        op = rng.choice(["write", "write", "zero", "read"])
        off, n = rand_range()
        try:
            if op == "write":
                data = bytes(rng.getrandbits(8) for _ in range(n))
                h.pwrite(data, off)
                oracle[off:off + n] = data
            elif op == "zero":
                h.zero(n, off)
                oracle[off:off + n] = bytes(n)
            got = h.pread(n, off)
            if got != bytes(oracle[off:off + n]):
                errors += 1
                print("mismatch", kind, op, off, n)
        except nbd.Error as e:
            errors += 1
            print("error", kind, op, off, n, e)
    check(kind + ": 150 odd-offset requests served and read back", errors == 0)

    # Eight 512-byte writes into one 4 KiB block, all in flight at once: each is a
    # read-modify-write of the same block on the server, and none may undo another.
    base = rng.randrange(1, size // 4096 - 1) * 4096
    bufs = []
    for k in range(8):
        data = bytes([k + 1]) * 512
        oracle[base + 512 * k:base + 512 * (k + 1)] = data
        b = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append(b)
        h.aio_pwrite(b, base + 512 * k)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    check(kind + ": concurrent writes into one block all kept",
          h.pread(4096, base) == bytes(oracle[base:base + 4096]))

    # A read straddling blocks, at an odd offset, of more than 4 KiB.
    off = 4096 * 3 + 1536
    check(kind + ": straddling read", h.pread(9 * 512, off) == bytes(oracle[off:off + 9 * 512]))
    # Byte-granular requests work too (the default minimum is 1).
    h.pwrite(b"xyz", 12345)
    oracle[12345:12348] = b"xyz"
    check(kind + ": 3-byte write and read", h.pread(7, 12343) == bytes(oracle[12343:12350]))

    if kind != "export-name":
        total = []

        def cb(metacontext, offset, entries, err):
            total.append(sum(entries[0::2]))

        h.block_status(8192, 4096 + 512, cb)
        check(kind + ": block status at an odd offset", len(total) == 1 and 0 < total[0] <= 8192)

    h.flush()
    h.shutdown()

# A second, fresh connection of each kind sees everything the first wrote.
for kind in ["export-name", "go-without-block-size"]:
    h = connect(kind)
    whole = bytearray()
    for off in range(0, size, 1 << 20):
        whole += h.pread(min(1 << 20, size - off), off)
    check(kind + ": whole device equals the oracle", whole == oracle)
    h.shutdown()

with open(oracle_out, "wb") as f:
    f.write(oracle)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
