"""Drives the server with libnbd in relaxed strict mode to send requests a careful client never
would, and checks each error value and that the connection stays usable afterwards.

Usage: nbd_errors.py URI_RW URI_RO URI_NOFAST
  URI_RW     writable export, 4 MiB, block sizes min 512 / preferred 4096 / max 1 MiB
  URI_RO     read-only export, 1 MiB
  URI_NOFAST writable export whose device cannot zero fast
"""
import errno
import sys

import nbd

RW, RO, NOFAST = sys.argv[1:4]
MIB = 1024 * 1024
passed = []
failed = []


def check(name, cond, detail=""):
    (passed if cond else failed).append(name)
    print(("PASS " if cond else "FAIL ") + name + ("" if cond else ": " + detail))


def expect_errno(name, want, fn):
    try:
        fn()
    except nbd.Error as e:
        check(name, e.errnum == want, "got errno %s (%s), want %s" % (e.errnum, e.string, want))
        return
    check(name, False, "request succeeded, want errno %s" % want)


def expect_ok(name, fn):
    try:
        r = fn()
    except nbd.Error as e:
        check(name, False, "failed: %s" % e.string)
        return None
    check(name, True)
    return r


def connect(uri, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    # Let every request through to the server; the server must reject the bad ones itself.
    h.set_strict_mode(0)
    return h


def alive(name, h):
    expect_ok(name + " (connection still up)", lambda: h.pread(512, 0))


h = connect(RW)
size = h.get_size()
check("size", size == 4 * MIB, str(size))
check("block size minimum", h.get_block_size(nbd.SIZE_MINIMUM) == 512)
check("block size preferred", h.get_block_size(nbd.SIZE_PREFERRED) == 4096)
check("block size maximum", h.get_block_size(nbd.SIZE_MAXIMUM) == MIB)
check("multi-conn advertised", h.can_multi_conn())
check("df advertised", h.can_df())

# Misaligned and out-of-range reads.
expect_errno("unaligned offset read", errno.EINVAL, lambda: h.pread(512, 1))
expect_errno("unaligned length read", errno.EINVAL, lambda: h.pread(100, 0))
expect_errno("read past end", errno.EINVAL, lambda: h.pread(1024, size - 512))
expect_errno("read at end", errno.EINVAL, lambda: h.pread(512, size))
expect_errno("read at huge offset", errno.EINVAL, lambda: h.pread(512, 2**63))
expect_errno("read over maximum payload", errno.EINVAL, lambda: h.pread(2 * MIB, 0))
expect_errno("unaligned trim", errno.EINVAL, lambda: h.trim(100, 0))
expect_errno("trim past end", errno.EINVAL, lambda: h.trim(4096, size))
expect_errno("cache past end", errno.EINVAL, lambda: h.cache(4096, size))
alive("after range errors", h)

# Writes past the end.
expect_errno("write past end", errno.ENOSPC, lambda: h.pwrite(b"x" * 512, size))
expect_errno("write straddling end", errno.ENOSPC, lambda: h.pwrite(b"x" * 1024, size - 512))
expect_errno("zero past end", errno.ENOSPC, lambda: h.zero(4096, size))
alive("after ENOSPC", h)

# Zero-length requests are answered and do not end the connection.
check("zero-length read", expect_ok("zero-length read ok", lambda: h.pread(0, 0)) == b"")
expect_ok("zero-length write", lambda: h.pwrite(b"", 0))
expect_ok("zero-length write at end", lambda: h.pwrite(b"", size))
expect_ok("zero-length zero", lambda: h.zero(0, 0))
expect_ok("zero-length trim", lambda: h.trim(0, 0))
expect_ok("zero-length cache", lambda: h.cache(0, 0))
expect_errno("zero-length block status", errno.EINVAL, lambda: h.block_status(0, 0, lambda *a: 0))
alive("after zero-length requests", h)

# Unknown and misplaced flags.
expect_errno("unknown flag on read", errno.EINVAL, lambda: h.pread(512, 0, flags=0x40))
expect_errno("unknown high flag on write", errno.EINVAL, lambda: h.pwrite(b"y" * 512, 0, flags=0x8000))
expect_errno("REQ_ONE on read", errno.EINVAL, lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE))
expect_errno("DF on write", errno.EINVAL, lambda: h.pwrite(b"y" * 512, 0, flags=nbd.CMD_FLAG_DF))
expect_errno("NO_HOLE on trim", errno.EINVAL, lambda: h.trim(4096, 0, flags=nbd.CMD_FLAG_NO_HOLE))
alive("after flag errors", h)

# Normal operation, including FUA, DF, NO_HOLE and FAST_ZERO on a device that zeroes fast.
expect_ok("fua write", lambda: h.pwrite(b"\xab" * 8192, 8192, flags=nbd.CMD_FLAG_FUA))
check("read back", h.pread(8192, 8192) == b"\xab" * 8192)
chunks = []
expect_ok(
    "df read",
    lambda: h.pread_structured(16384, 4096, lambda buf, off, status, err: chunks.append((off, status)),
                               flags=nbd.CMD_FLAG_DF),
)
check("df read is one data chunk", chunks == [(4096, nbd.READ_DATA)], repr(chunks))
chunks = []
h.pread_structured(65536, 0, lambda buf, off, status, err: chunks.append((off, status)))
# Data at 0..4K (initial) and 8K..16K (the FUA write), holes elsewhere.
want = [(0, nbd.READ_DATA), (4096, nbd.READ_HOLE), (8192, nbd.READ_DATA), (16384, nbd.READ_HOLE)]
check("sparse read uses hole chunks", chunks == want, repr(chunks))
# libnbd argument order is (count, offset): allocate zeroes at 8K..12K, punch 12K..16K.
expect_ok("zero no-hole", lambda: h.zero(4096, 8192, flags=nbd.CMD_FLAG_NO_HOLE))
expect_ok("fast zero", lambda: h.zero(4096, 12288, flags=nbd.CMD_FLAG_FAST_ZERO))
check("zeroed ranges read as zero", h.pread(8192, 8192) == bytes(8192))
expect_ok("flush", lambda: h.flush())

extents = []
h.block_status(65536, 0, lambda ctx, off, ents, err: extents.append(list(ents)))
# (length, flags): data, hole+zero, zero (allocated by NO_HOLE), hole+zero to the end of the query.
check("block status extents", extents == [[4096, 0, 4096, 3, 4096, 2, 65536 - 12288, 3]], repr(extents))
extents = []
h.block_status(65536, 0, lambda ctx, off, ents, err: extents.append(list(ents)), flags=nbd.CMD_FLAG_REQ_ONE)
check("block status REQ_ONE", extents == [[4096, 0]], repr(extents))
extents = []
h.block_status(2048, 5120, lambda ctx, off, ents, err: extents.append(list(ents)), flags=nbd.CMD_FLAG_REQ_ONE)
check("block status REQ_ONE clipped to the request", extents == [[2048, 3]], repr(extents))
expect_errno("block status past end", errno.EINVAL, lambda: h.block_status(4096, size, lambda *a: 0))
h.shutdown()

# Block status without a negotiated context.
h = connect(RW, meta=False)
expect_errno("block status without context", errno.EINVAL, lambda: h.block_status(4096, 0, lambda *a: 0))
alive("after block status error", h)
h.shutdown()

# Read-only export.
h = connect(RO)
check("read-only advertised", h.is_read_only())
expect_errno("write to read-only", errno.EPERM, lambda: h.pwrite(b"z" * 512, 0))
expect_errno("trim on read-only", errno.EPERM, lambda: h.trim(512, 0))
expect_errno("zero on read-only", errno.EPERM, lambda: h.zero(512, 0))
expect_errno("FUA on read-only read", errno.EINVAL, lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_FUA))
expect_ok("flush on read-only", lambda: h.flush())
alive("after EPERM", h)
h.shutdown()

# FAST_ZERO on a device that cannot zero fast fails quickly with ENOTSUP.
h = connect(NOFAST)
check("fast zero advertised", h.can_fast_zero())
expect_errno("fast zero unsupported", errno.ENOTSUP, lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_FAST_ZERO))
expect_ok("plain zero", lambda: h.zero(4096, 0))
h.shutdown()

print("%d passed, %d failed" % (len(passed), len(failed)))
sys.exit(1 if failed else 0)
