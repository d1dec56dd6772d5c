"""The controller's sequencers on real program, base store and constants memories: what
they hand the units, in what order, and the run's state."""

from __future__ import annotations

import dataclasses
import random

import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory

from host.protocol import STATE_DONE, STATE_ERROR, STATE_RUNNING, const_bytes, pack_struct, record_bytes
from gen.contract import channel_layout
from gen.contract import layer_record_layout
from hw.memory import BlockMemory
from hw.sequencer import ERR_ABORTED, EngineSequencer, GenerationSequencer
from tests.support import TINY, TINY_COMPACT, put_stream, simulate, take_stream

CONFIGS = {"wide": dataclasses.replace(TINY, max_layers=4),
           "compact": dataclasses.replace(TINY_COMPACT, max_layers=4)}


def _record(cfg, desc, **fields):
    layout = layer_record_layout(cfg)
    return pack_struct(layout, {"desc": pack_struct(layout["desc"].shape, desc), **fields})


class _Bench(Elaboratable):
    """A sequencer with the program memory (holding ``records``) and a block memory
    (the base store or the constants) that the testbench writes through ``wp``."""

    def __init__(self, seq, cfg, records, mem, port):
        self.seq, self.cfg, self.mem, self.port = seq, cfg, mem, port
        rb = record_bytes(cfg)
        if cfg.compact:
            self.prog = Memory(shape=8, depth=cfg.max_layers * rb,
                               init=[(r >> 8 * i) & 0xFF for r in records for i in range(rb)])
        else:
            self.prog = Memory(shape=8 * rb, depth=cfg.max_layers, init=records)
        self.wp = mem.write_port()
        # The stream FIFO that the host fills (its write side is the testbench's).
        if "i_stream" in seq.signature.members:
            self.fifo = SyncFIFOBuffered(width=8, depth=4)
            self.stream_in = self.fifo.w_stream

    def elaborate(self, platform):
        m = Module()
        m.submodules.seq, m.submodules.prog, m.submodules.mem = self.seq, self.prog, self.mem
        if "i_stream" in self.seq.signature.members:
            m.submodules.fifo = self.fifo
            wiring.connect(m, self.fifo.r_stream, self.seq.i_stream)
        prog_rp, rp, port = self.prog.read_port(), self.mem.read_port(), self.port
        m.d.comb += [prog_rp.addr.eq(self.seq.prog.addr), self.seq.prog.data.eq(prog_rp.data),
                     rp.addr.eq(port.addr), rp.en.eq(port.en), rp.out_en.eq(port.out_en),
                     port.data.eq(rp.data)]
        return m


async def _fill(ctx, wp, words, lanes=1):
    for addr, word in enumerate(words):
        ctx.set(wp.addr, addr)
        ctx.set(wp.data, word if lanes == 1 else [(word >> 8 * i) & 0xFF for i in range(lanes)])
        ctx.set(wp.en, (1 << lanes) - 1)
        await ctx.tick()
    ctx.set(wp.en, 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_generation_sequencer_hands_each_conv_layer_its_codes(name):
    """Conv layers from the base store and from the stream, with a pool between them (no
    weights: skipped): the unit gets each conv layer's descriptor and exactly its code
    bytes, in order, under random stalls on every stream; then nothing more."""
    cfg = CONFIGS[name]
    rng = random.Random(7)
    bases = [rng.randrange(256) for _ in range(cfg.base_store_bytes)]
    streamed = [rng.randrange(256) for _ in range(9)]
    layers = [({"ci": 1, "co": 2, "k": 3}, dict(code_addr=5, code_len=11)),
              ({"op": 1, "ci": 2, "co": 2}, dict(code_addr=0, code_len=3)),
              ({"ci": 2, "co": 1, "k": 1}, dict(streamed=1, code_len=len(streamed))),
              ({"ci": 2, "co": 2, "k": 3}, dict(code_addr=40, code_len=20))]
    seq = GenerationSequencer(cfg)
    dut = _Bench(seq, cfg, [_record(cfg, d, **f) for d, f in layers], BlockMemory(8, 1, cfg.base_store_bytes), seq.bases)
    conv = [(d, f) for d, f in layers if not d.get("op")]
    want_codes = []
    for _, f in conv:
        want_codes += streamed if f.get("streamed") else bases[f["code_addr"]:f["code_addr"] + f["code_len"]]
    got = {}

    async def control(ctx):
        await _fill(ctx, dut.wp, bases)
        ctx.set(seq.n_layers, len(layers))
        ctx.set(seq.start, 1)
        await ctx.tick()
        ctx.set(seq.start, 0)

    async def stream_in(ctx):
        await put_stream(ctx, dut.stream_in, streamed, random.Random(1), idle=0.5)

    async def descs(ctx):
        got["desc"] = await take_stream(ctx, seq.o_desc, len(conv), random.Random(2),
                                        backpressure=0.5, fields=("op", "ci", "co", "k"))
        for _ in range(60):
            assert not ctx.get(seq.o_desc.valid)
            await ctx.tick()

    async def codes(ctx):
        got["codes"] = await take_stream(ctx, seq.o_codes, len(want_codes), random.Random(3),
                                         backpressure=0.3)
        for _ in range(40):
            assert not ctx.get(seq.o_codes.valid)
            await ctx.tick()

    simulate(dut, descs, codes, background=(control, stream_in))
    assert got["desc"] == [(0, d["ci"], d["co"], d["k"]) for d, _ in conv]
    assert got["codes"] == want_codes


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_sequencer_runs_every_layer_and_ends_the_run(name):
    """Every layer's descriptor and constants (``co`` words, ``ci`` for a pool) reach the
    engine, a layer's end is reported the cycle after its ``done``, and the run ends in
    ``done``; a run with an engine error ends in ``error`` with its bits and layer; an
    abort ends a run in ``error`` with ERR_ABORTED."""
    cfg = CONFIGS[name]
    cb = const_bytes(cfg)
    rng = random.Random(11)
    consts = [rng.randrange(1 << (8 * cb)) for _ in range(cfg.const_depth)]
    mask = (1 << channel_layout(cfg).size) - 1
    layers = [({"ci": 1, "co": 2}, dict(const_addr=0)),
              ({"op": 1, "ci": 2, "co": 1}, dict(const_addr=2)),
              ({"ci": 2, "co": 1}, dict(const_addr=3))]
    seq = EngineSequencer(cfg)
    dut = _Bench(seq, cfg, [_record(cfg, d, **f) for d, f in layers],
                 BlockMemory(8, cb, cfg.const_depth, granular=True), seq.consts)
    ended = []

    async def engine(ctx, n, error_at=None):
        """One run of ``n`` layers as the engine sees it."""
        for i, (d, f) in enumerate(layers[:n]):
            (desc,) = await take_stream(ctx, seq.o_desc, 1, rng, backpressure=0.5, fields=("op", "co"))
            assert desc == (d.get("op", 0), d["co"])
            n_out = d["ci"] if d.get("op") else d["co"]
            chans = await take_stream(ctx, seq.o_chan, n_out, rng, backpressure=0.5)
            want = [consts[f["const_addr"] + j] & mask for j in range(n_out)]
            assert [c.as_bits() for c in chans] == want
            for _ in range(rng.randint(0, 3)):
                assert ctx.get(seq.running) and ctx.get(seq.state) == STATE_RUNNING
                await ctx.tick()
            ctx.set(seq.done, 1)
            ctx.set(seq.error, 2 if i == error_at else 0)
            assert ctx.get(seq.layer_done) and ctx.get(seq.fault) == (i == error_at)
            await ctx.tick()
            ctx.set(seq.done, 0)
            ctx.set(seq.error, 0)
            if i == error_at:
                assert not ctx.get(seq.ended)
                return
            assert ctx.get(seq.ended) and ctx.get(seq.ended_layer) == i
            ended.append(i)

    async def start(ctx, n):
        ctx.set(seq.n_layers, n)
        ctx.set(seq.start, 1)
        await ctx.tick()
        ctx.set(seq.start, 0)

    async def bench(ctx):
        await _fill(ctx, dut.wp, consts, cb)
        await start(ctx, 3)
        await engine(ctx, 3)
        await ctx.tick()
        assert (ctx.get(seq.running), ctx.get(seq.state)) == (0, STATE_DONE)
        assert ended == [0, 1, 2]
        await start(ctx, 3)
        await engine(ctx, 3, error_at=1)
        assert (ctx.get(seq.running), ctx.get(seq.state), ctx.get(seq.status_err),
                ctx.get(seq.layer)) == (0, STATE_ERROR, 2, 1)
        await start(ctx, 2)
        for _ in range(rng.randint(1, 10)):
            await ctx.tick()
        ctx.set(seq.abort, 1)
        await ctx.tick()
        ctx.set(seq.abort, 0)
        assert (ctx.get(seq.running), ctx.get(seq.state), ctx.get(seq.status_err)) == (
            0, STATE_ERROR, ERR_ABORTED)
        for _ in range(20):
            assert not ctx.get(seq.o_desc.valid)
            await ctx.tick()

    simulate(dut, bench)
