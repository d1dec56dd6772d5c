"""The post-processing blocks of :mod:`hw.postproc` against the integer contract.

Both requantizers are checked lane by lane against :func:`gen.integer.requant` on
extreme and random operands (with and without ReLU and a residual, every shift),
for their latency and ``busy``; the pool accumulator against a sum of its inputs.
"""

from __future__ import annotations

import gc
import random
import warnings

import pytest
import torch
from amaranth.hdl import UnusedElaboratable, unsigned

from gen.config import AcceleratorConfig
from gen.integer import requant
from hw.postproc import CompactRequantizer, PoolAccumulator, Requantizer, requantizer_class
from tests.support import TINY, TINY_COMPACT, simulate


def _config(compact: bool, max_ci: int) -> AcceleratorConfig:
    return AcceleratorConfig(rows=4, cols=4, a_bits=6, w_bits=5, m_bits=10, max_ci=max_ci,
                             max_co=8, max_k=3, max_h=4, max_w=4, act_depth=128, compact=compact)


@pytest.mark.parametrize("cls,max_ci,acc_bits", [(Requantizer, 8, 18), (Requantizer, 1, 15),
                                                 (CompactRequantizer, 8, 18),
                                                 (CompactRequantizer, 1, 15)])
def test_requantizer_matches_integer_contract(cls, max_ci, acc_bits):
    # (acc_bits 18: the product is split in two, for 18- and for 16-bit multipliers; 15:
    # one product, and the compact lane's multiply-add takes the whole accumulator)
    cfg = _config(cls is CompactRequantizer, max_ci)
    assert cfg.acc_bits == acc_bits
    lanes, rng = 3, random.Random(11)
    dut = cls(cfg, lanes, unsigned(8))

    def extreme(bits):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return rng.choice((lo, hi, 0, -1, 1, rng.randint(lo, hi), rng.randint(lo, hi)))

    batches = []
    for _ in range(40):
        shift = rng.choice((0, 1, 2, rng.randint(0, cfg.shift_max), cfg.shift_max))
        consts = dict(shift=shift, relu=rng.random() < 0.5, has_res=rng.random() < 0.5,
                      m_res=extreme(cfg.m_bits))
        items = [[(extreme(cfg.acc_bits), extreme(cfg.m_bits), extreme(cfg.bias_bits), extreme(cfg.a_bits))
                  for _ in range(lanes)] for _ in range(4)]
        batches.append((consts, items))

    async def tb(ctx):
        for consts, items in batches:
            for name, v in consts.items():
                ctx.set(getattr(dut, name), v)
            # (the layer constants are stable from one cycle before the first input)
            await ctx.tick()
            got = []
            for i in range(len(items) + dut.latency):
                ctx.set(dut.i_valid, i < len(items))
                if i < len(items):
                    ctx.set(dut.i_tag, i)
                    ctx.set(dut.i_lanes, (1 << lanes) - 1)
                    for g, (acc, mult, bias, res) in enumerate(items[i]):
                        ctx.set(dut.i_acc[g], acc)
                        ctx.set(dut.i_mult[g], mult)
                        ctx.set(dut.i_bias[g], bias)
                        ctx.set(dut.i_res[g], res)
                await ctx.tick()
                if ctx.get(dut.o_valid):
                    got.append((ctx.get(dut.o_tag), [ctx.get(dut.o_y[g]) for g in range(lanes)]))
            for tag, ys in got:
                acc, mult, bias, res = (torch.tensor([it[j] for it in items[tag]]) for j in range(4))
                want = requant(acc.view(1, -1), mult, bias, consts["shift"], cfg.a_bits, consts["relu"],
                               res=res.view(1, -1) if consts["has_res"] else None,
                               m_res=consts["m_res"])
                assert ys == want.view(-1).tolist(), (consts, items[tag])
            assert [t for t, _ in got] == list(range(len(items)))

    simulate(dut, tb)


@pytest.mark.parametrize("cls,latency", [(Requantizer, 8), (CompactRequantizer, 4)])
def test_requantizer_latency_and_busy(cls, latency):
    """One input: its result comes out ``latency`` cycles later (the documented figure),
    and ``busy`` is high from the cycle after the input until the result."""
    cfg = _config(cls is CompactRequantizer, 8)
    dut = cls(cfg, 2, unsigned(4))
    assert dut.latency == latency

    async def tb(ctx):
        ctx.set(dut.shift, 1)
        await ctx.tick()
        ctx.set(dut.i_valid, 1)
        ctx.set(dut.i_lanes, 0b10)
        ctx.set(dut.i_tag, 9)
        for g, acc in enumerate((7, -7)):
            ctx.set(dut.i_acc[g], acc)
            ctx.set(dut.i_mult[g], 3)
        await ctx.tick()
        ctx.set(dut.i_valid, 0)
        for cycle in range(1, latency + 3):
            valid, busy = ctx.get(dut.o_valid), ctx.get(dut.busy)
            assert valid == (cycle == latency), cycle
            assert busy == (cycle <= latency), cycle
            if valid:
                # (21 + 1) >> 1 and (-21 + 1) >> 1: round half up
                assert [ctx.get(dut.o_y[g]) for g in range(2)] == [11, -10]
                assert ctx.get(dut.o_lanes) == 0b10 and ctx.get(dut.o_tag) == 9
            await ctx.tick()

    simulate(dut, tb)


def test_requantizer_class_follows_the_config():
    assert requantizer_class(TINY) is Requantizer
    assert requantizer_class(TINY_COMPACT) is CompactRequantizer
    with warnings.catch_warnings():
        # (the refused requantizer is never elaborated; its warning comes when it is collected)
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match="CompactRequantizer lanes must be a positive integer"):
            CompactRequantizer(TINY_COMPACT, 0)
        gc.collect()


def test_pool_accumulator_sums_each_channel_over_the_map():
    cfg, rng = TINY, random.Random(4)
    dut = PoolAccumulator(cfg)
    lo, hi = -(1 << (cfg.a_bits - 1)), (1 << (cfg.a_bits - 1)) - 1
    maps = [[[rng.randint(lo, hi) for _ in range(cfg.rows)] for _ in range(n)] for n in (5, 1, 9)]

    async def tb(ctx):
        for pixels in maps:
            for i, px in enumerate(pixels):
                # an idle cycle now and then: the sums hold
                if rng.random() < 0.3:
                    await ctx.tick()
                ctx.set(dut.i_valid, 1)
                ctx.set(dut.i_first, i == 0)
                ctx.set(dut.i_last, i == len(pixels) - 1)
                for r, v in enumerate(px):
                    ctx.set(dut.i_act[r], v)
                await ctx.tick()
                ctx.set(dut.i_valid, 0)
                assert ctx.get(dut.o_done) == (i == len(pixels) - 1)
            await ctx.tick()
            assert [ctx.get(dut.o_sum[r]) for r in range(cfg.rows)] == \
                [sum(px[r] for px in pixels) for r in range(cfg.rows)]

    simulate(dut, tb)
