"""The request executor behind a real host link, on real memories: requests as the host
encodes them (host.protocol), answers decoded the same way."""

from __future__ import annotations

import random
import struct

import pytest
from amaranth.hdl import Elaboratable, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory

from host.protocol import (COUNTERS, ERR_ADDRESS, ERR_ARGUMENT, ERR_BUSY, ERR_LENGTH,
                           ERR_NO_RESULT, ERR_OPCODE, OP_ABORT, OP_COUNTERS, OP_ERROR, OP_IDENTIFY,
                           OP_READ, OP_READ_ACT, OP_RUN, OP_STATUS, STATE_DONE, STATE_ERROR, TAGS,
                           OP_WRITE, REGION_BASES, REGION_CONSTS, REGION_PROGRAM, RESPONSE,
                           FrameDecoder, const_bytes, encode_frame, identity_bytes, record_bytes)
from hw.executor import Executor
from hw.link import HostLink
from hw.memory import BlockMemory
from tests.support import TINY, TINY_COMPACT, put_stream, simulate

STATUS = 0x0102_4003   # state STATE_ERROR, error 0x40, layer 0x0102


def _counter(i):
    return 0x1_0000_0000 * i + 1000 + 7 * i


class _Bench(Elaboratable):
    """HostLink -> Executor -> the program, base store and constants memories; the
    sequencers' idle read ports stand in as one address register each (loaded by the
    executor's ``*_load``), the counters as fixed values, the run state as set by the
    testbench (``running``, ``status``); ``starts`` and ``aborts`` count the pulses."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.link, self.ex = HostLink(cfg), Executor(cfg)
        self.running = Signal()
        self.status = Signal(32, init=STATUS)
        self.starts, self.aborts = Signal(8), Signal(8)

    def elaborate(self, platform):
        m = Module()
        cfg, ex, link = self.cfg, self.ex, self.link
        m.submodules.link, m.submodules.ex = link, ex
        wiring.connect(m, link.o_req, ex.i_req)
        wiring.connect(m, ex.o_resp, link.i_resp)
        wiring.connect(m, ex.o_payload, link.i_payload)
        m.d.comb += [link.buf_addr.eq(ex.buf_addr), ex.buf_data.eq(link.buf_data),
                     link.o_tx.ready.eq(1)]
        m.submodules.prog = prog = Memory(shape=ex.prog_width, depth=cfg.max_layers * record_bytes(cfg) // ex.prog_lanes, init=[])
        m.submodules.bases = bases = BlockMemory(8, 1, cfg.base_store_bytes, name="bases")
        m.submodules.consts = consts = BlockMemory(8, const_bytes(cfg), cfg.const_depth,
                                                   granular=True, name="consts")
        for wp, w in ((prog.write_port(granularity=8), ex.prog_w), (bases.write_port(), ex.bases_w),
                      (consts.write_port(), ex.consts_w)):
            m.d.comb += [wp.addr.eq(w.addr), wp.data.eq(w.data), wp.en.eq(w.en)]
        prp = prog.read_port()
        m.d.comb += [prp.addr.eq(Mux(ex.prog_host, ex.prog_addr, 0)), ex.prog_data.eq(prp.data)]
        for mem, load, addr, data in ((bases, ex.bases_load, ex.bases_addr, ex.bases_data),
                                      (consts, ex.consts_load, ex.consts_addr, ex.consts_data)):
            rp = mem.read_port()
            reg = Signal.like(rp.addr)
            with m.If(load):
                m.d.sync += reg.eq(addr)
            m.d.comb += [rp.addr.eq(reg), data.eq(rp.data)]
        values = [_counter(i) % (1 << cfg.counter_bits) for i in range(len(COUNTERS))]
        m.d.comb += [ex.ctr_data.eq(Mux(ex.ctr_index == 0, values[0], 0)), ex.ctr_valid.eq(1)]
        for i, v in enumerate(values):
            with m.If(ex.ctr_index == i):
                m.d.comb += ex.ctr_data.eq(v)
        m.d.comb += [ex.running.eq(self.running), ex.status.eq(self.status)]
        with m.If(ex.start):
            m.d.sync += self.starts.eq(self.starts + 1)
        with m.If(ex.abort):
            m.d.sync += self.aborts.eq(self.aborts + 1)
        return m


async def _request(ctx, dut, op, payload=b""):
    """Send one request and return its answer (opcode, payload); the answer must carry
    the request's tag (a different one for every request of a bench)."""
    tag = _request.tags = (getattr(_request, "tags", 0) + 37) % TAGS
    await put_stream(ctx, dut.link.i_rx, encode_frame(op, payload, tag))
    dec = FrameDecoder()
    for _ in range(20000):
        valid, byte = ctx.get(dut.link.o_tx.valid), ctx.get(dut.link.o_tx.payload)
        await ctx.tick()
        if valid:
            dec.feed(bytes([byte]))
            if dec.frames:
                assert dec.frames[0].tag == tag, (op, dec.frames[0].tag, tag)
                return dec.frames[0].op, bytes(dec.frames[0].payload)
    raise AssertionError(f"no answer to request {op:#x}")


@pytest.mark.parametrize("cfg", [TINY, TINY_COMPACT], ids=["wide", "compact"])
def test_executor_serves_memories_status_counters_and_refuses_what_it_must(cfg):
    dut = _Bench(cfg)
    rng = random.Random(5)
    rb, cb = record_bytes(cfg), const_bytes(cfg)

    async def bench(ctx):
        async def req(op, payload=b""):
            return await _request(ctx, dut, op, payload)

        async def error(op, payload, code):
            assert await req(op, payload) == (OP_ERROR, bytes([code, op])), (op, payload)

        assert await req(OP_IDENTIFY) == (OP_IDENTIFY | RESPONSE, identity_bytes(cfg))
        # Memory writes read back, at any offset.
        memory = {}
        for region, size, word in ((REGION_BASES, cfg.base_store_bytes, 1),
                                   (REGION_PROGRAM, cfg.max_layers * rb, rb),
                                   (REGION_CONSTS, cfg.const_depth * cb, cb)):
            n = min(size, 4 * word)
            addr = (size - n) // word * word
            data = bytes(rng.randrange(256) for _ in range(n))
            assert await req(OP_WRITE, struct.pack("<BI", region, addr) + data) == (
                OP_WRITE | RESPONSE, b"")
            memory[region] = (addr, data)
        for region, (addr, data) in memory.items():
            for off, n in ((0, len(data)), (1, len(data) - 2)):
                assert await req(OP_READ, struct.pack("<BIH", region, addr + off, n)) == (
                    OP_READ | RESPONSE, data[off:off + n]), (region, off)
        assert await req(OP_STATUS) == (OP_STATUS | RESPONSE, struct.pack("<I", STATUS))
        mask = (1 << cfg.counter_bits) - 1
        want = b"".join(struct.pack("<Q", _counter(i) & mask) for i in range(len(COUNTERS)))
        assert await req(OP_COUNTERS) == (OP_COUNTERS | RESPONSE, want)
        # RUN starts a run; while it runs, memory and RUN requests are refused.
        assert await req(OP_RUN, struct.pack("<H", 1)) == (OP_RUN | RESPONSE, b"")
        assert ctx.get(dut.starts) == 1 and ctx.get(dut.ex.n_layers) == 1
        ctx.set(dut.running, 1)
        await error(OP_RUN, struct.pack("<H", 1), ERR_BUSY)
        await error(OP_WRITE, struct.pack("<BI", REGION_BASES, 0) + b"\x01", ERR_BUSY)
        assert await req(OP_ABORT) == (OP_ABORT | RESPONSE, b"")
        assert ctx.get(dut.aborts) == 1
        ctx.set(dut.running, 0)
        # Refused requests, and nothing written by them.
        await error(OP_RUN, struct.pack("<H", cfg.max_layers + 1), ERR_ARGUMENT)
        await error(0x42, b"", ERR_OPCODE)
        await error(OP_STATUS, b"\x00", ERR_LENGTH)
        await error(OP_READ, struct.pack("<BIH", REGION_BASES, 0, 0), ERR_ARGUMENT)
        await error(OP_WRITE, struct.pack("<BI", REGION_PROGRAM, 1) + b"\x00" * rb, ERR_ADDRESS)
        addr, data = memory[REGION_BASES]
        await error(OP_WRITE, struct.pack("<BI", REGION_BASES, addr) + b"\xee" * (len(data) + 1),
                    ERR_ADDRESS)
        assert await req(OP_READ, struct.pack("<BIH", REGION_BASES, addr, len(data))) == (
            OP_READ | RESPONSE, data)
        assert ctx.get(dut.starts) == 1
        # A run that stopped in the error state left no result: READ_ACT is refused
        # (while running it is busy first), whatever its arguments.
        assert STATUS & 0xFF == STATE_ERROR
        act = struct.pack("<BHI", 0, 1, 1)
        await error(OP_READ_ACT, act, ERR_NO_RESULT)
        await error(OP_READ_ACT, struct.pack("<BHI", cfg.act_buffers, 1, 1), ERR_NO_RESULT)
        ctx.set(dut.running, 1)
        await error(OP_READ_ACT, act, ERR_BUSY)
        ctx.set(dut.running, 0)
        # In another state the same request passes that check (a bad buffer is then
        # what it is refused for).
        ctx.set(dut.status, (STATUS & ~0xFF) | STATE_DONE)
        await error(OP_READ_ACT, struct.pack("<BHI", cfg.act_buffers, 1, 1), ERR_ADDRESS)

    simulate(dut, bench)
