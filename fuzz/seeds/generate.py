#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets whose interesting paths sit
behind many exact values a fuzzer rarely guesses (a valid vsock header in a
valid descriptor chain; a full virtio-mmio activation). `make fuzz-smoke`
and the commands in fuzz/README.md pass seeds/<target> next to the corpus.
Run from fuzz/: python3 seeds/generate.py"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def vsock_hdr(op, length, src_cid=3, dst_cid=2, sport=1234, dport=1025):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, sport, dport, length,
                       1, op, 0, 65536, 0)


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


NEXT, WRITE, INDIRECT = 1, 2, 4


def tx_memory(descs, heads, blobs):
    """Descriptor table at 0, available ring at 0x100 (used ring at 0x200),
    `blobs` {address: bytes} for headers and payloads."""
    mem = bytearray(0x400)
    for i, d in enumerate(descs):
        mem[i * 16:(i + 1) * 16] = d
    mem[0x100:0x104] = struct.pack("<HH", 0, len(heads))
    for i, h in enumerate(heads):
        mem[0x104 + 2 * i:0x106 + 2 * i] = struct.pack("<H", h)
    for addr, b in blobs.items():
        end = addr + len(b)
        if end > len(mem):
            mem.extend(bytes(end - len(mem)))
        mem[addr:end] = b
    return bytes(mem)


def balloon_queues():
    # First byte: 0 reports, 1 page lists, 2 statistics; then guest memory.
    write("balloon_queues", "report-two-ranges", b"\x00" + tx_memory(
        [desc(0x1000, 0x1000, NEXT | WRITE, 1), desc(0x3000, 0x2000, WRITE)], [0], {}))
    write("balloon_queues", "report-then-unaligned", b"\x00" + tx_memory(
        [desc(0x4000, 0x1000, WRITE), desc(0x4100, 0x1000, WRITE)], [0, 1], {}))
    pfns = struct.pack("<4I", 4, 5, 6, 9)
    write("balloon_queues", "inflate-list", b"\x01" + tx_memory(
        [desc(0x300, len(pfns))], [0], {0x300: pfns}))
    stats = b"".join(struct.pack("<HQ", t, v) for t, v in
                     [(4, 1 << 20), (5, 128 << 20), (6, 64 << 20), (7, 1 << 22)])
    write("balloon_queues", "stats-two-descriptors", b"\x02" + tx_memory(
        [desc(0x300, 20, NEXT, 1), desc(0x320, len(stats) - 20)], [0],
        {0x300: stats[:20], 0x320: stats[20:]}))


def vsock_tx_chain():
    rw = vsock_hdr(5, 10)
    # RW packet: header and payload in two descriptors.
    write("vsock_tx_chain", "rw-two-descriptors", tx_memory(
        [desc(0x300, 44, NEXT, 1), desc(0x340, 10)], [0],
        {0x300: rw, 0x340: b"helloworld"}))
    # REQUEST, header only; then a second chain with a short payload.
    write("vsock_tx_chain", "request-then-short", tx_memory(
        [desc(0x300, 44), desc(0x340, 44 + 4)], [0, 1],
        {0x300: vsock_hdr(1, 0), 0x340: rw}))
    # An indirect table at 0x280 holding header + payload.
    write("vsock_tx_chain", "indirect", tx_memory(
        [desc(0x280, 32, INDIRECT)], [0],
        {0x280: desc(0x300, 44, NEXT, 1) + desc(0x340, 10),
         0x300: rw, 0x340: b"0123456789"}))
    # A header, then a device-writable descriptor.
    write("vsock_tx_chain", "readable-then-writable", tx_memory(
        [desc(0x300, 44, NEXT, 1), desc(0x340, 10, WRITE)], [0],
        {0x300: rw}))


def mmio_activation():
    """A driver's full bring-up of the 3-queue vsock device (virtio-mmio v2),
    in the target's 7-byte operations: [kind, offset lo, offset hi, value]."""
    ops = bytearray()

    def w(off, val):
        ops.extend(struct.pack("<BHI", 0x81, off, val))

    def r(off):
        ops.extend(struct.pack("<BHI", 0x80, off, 0))

    r(0x000)  # MagicValue
    w(0x070, 1)
    w(0x070, 3)
    w(0x024, 1)  # DriverFeaturesSel = 1
    w(0x020, 1)  # VIRTIO_F_VERSION_1
    w(0x070, 0xb)
    r(0x070)
    for q in range(3):
        base = 0x1000 * (q + 1)
        w(0x030, q)
        r(0x034)  # QueueNumMax
        w(0x038, 16)
        w(0x080, base)
        w(0x084, 0)
        w(0x090, base + 0x100)
        w(0x094, 0)
        w(0x0a0, base + 0x200)
        w(0x0a4, 0)
        w(0x044, 1)
    w(0x070, 0xf)
    r(0x070)
    write("mmio_transport", "activate", bytes(ops))


def vsock_packets():
    """Guest and host sides of two connections: a guest-initiated one to the
    listening service on port 1025 (small credit, then a credit update) and a
    host-initiated one the guest accepts; both carry data both ways, then
    shut down. See the target for the action encoding."""
    def guest(op, sport=1, dport=1, length=0, buf_alloc=100, fwd=0, steer=0, flags=0):
        # src_cid even = steered: bit 1 picks the host-initiated port range.
        return bytes([0]) + struct.pack("<QQIIIHHIII", steer, 0, sport, dport,
                                        length, 1, op, flags, buf_alloc, fwd)
    seq = bytearray()
    seq += guest(1)                      # REQUEST to service port 1025
    seq += bytes([5])                    # the service accepts
    seq += bytes([6, 0, 4])              # it writes 256 bytes
    seq += guest(6, fwd=100)             # guest consumed 100: credit update
    seq += guest(5, length=5) + b"hello" # guest data to the service
    seq += bytes([7, 2])                 # service reads
    seq += bytes([4, 1])                 # host CONNECT 1
    seq += guest(2, dport=0, buf_alloc=1000, steer=2)  # guest accepts
    seq += bytes([6, 1, 2])              # host writes 128 bytes on it
    seq += guest(4, flags=3)             # guest shuts the first one down
    seq += bytes([7, 4 + 1])             # host half-closes the second
    write("vsock_packets", "two-connections", bytes(seq))


def net_tx_chain():
    frame = bytes(range(60))
    hdr = bytes(12)
    # Header and frame in two descriptors.
    write("net_tx_chain", "two-descriptors", tx_memory(
        [desc(0x300, 12, NEXT, 1), desc(0x340, 60)], [0],
        {0x300: hdr, 0x340: frame}))
    # One descriptor holding both; then a header asking for a checksum.
    csum = bytes([1]) + bytes(11)
    write("net_tx_chain", "one-then-offload", tx_memory(
        [desc(0x300, 72), desc(0x380, 72)], [0, 1],
        {0x300: hdr + frame, 0x380: csum + frame}))


if __name__ == "__main__":
    net_tx_chain()
    balloon_queues()
    vsock_packets()
    vsock_tx_chain()
    mmio_activation()
