"""The engine's post reader (:class:`hw.post_reader.PostReader`) and its requantizer.

The testbench plays the issue stage and the memories: it fills accumulator halves
(or the pool sums) tile by tile, each only once the post reader has freed it, and
answers the accumulator and residual reads two cycles after their addresses, as the
block RAM read registers do. The constants arrive with idle cycles. Every result
written back must be :func:`gen.integer.requant` of its accumulator, constants and
residual, at its place in the destination buffer: channel ``c``, pixel ``p`` in bank
``c mod rows`` at ``(c // rows) * pixels + p``, each exactly once.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from gen.integer import requant
from hw.post_reader import PostReader
from hw.postproc import CompactRequantizer, Requantizer
from tests.support import TINY, put_stream, simulate

# (6-bit activations, 8-bit multipliers: room for results that are neither clamped nor
# zero, so that every operand shows in them)
BASE = dataclasses.replace(TINY, a_bits=6, m_bits=8)
CONFIGS = {
    # rows > cols, two lanes: two lane groups per bank row (gi)
    "4x2": dataclasses.replace(BASE, rows=4, cols=2, max_ci=6, max_co=6, act_depth=54, act_buffers=3),
    # cols > rows, two lanes: two lane groups per output-channel tile (j)
    "2x4": dataclasses.replace(BASE, rows=2, cols=4, max_ci=6, max_co=6, act_depth=54, act_buffers=3),
    # one lane, the compact requantizer
    "2x2c": dataclasses.replace(BASE, max_ci=5, max_co=5, act_depth=45, act_buffers=3, compact=True,
                                layer_log=False),
}


def _run(cfg, *, pool, channels, pixels, relu, residual, seed):
    R, C, NB = cfg.rows, cfg.cols, cfg.act_buffers
    rng = random.Random(seed)
    dut = PostReader(cfg)
    assert isinstance(dut.requant, CompactRequantizer if cfg.compact else Requantizer)
    # (results mostly within the 6 bits, each operand worth a few units of them)
    acc = [[rng.randint(-300, 300) for _ in range(pixels)] for _ in range(channels)]
    consts = [{"mult": rng.randint(-100, 100), "bias": rng.randint(-2000, 2000)} for _ in range(channels)]
    res = [[rng.randint(-32, 31) for _ in range(pixels)] for _ in range(channels)]
    shift, m_res = 10, rng.randint(-100, 100)
    src, dst, rbuf = 0, 2, 1
    desc = {"op": int(pool), "ci": channels, "co": 1 if pool else channels, "relu": relu,
            "has_res": residual, "res": rbuf, "src": src, "dst": dst, "shift": shift, "m_res": m_res}
    # The residual buffer, in the bank layout.
    banks = {(rbuf, c % R, (c // R) * pixels + p): res[c][p] for c in range(channels) for p in range(pixels)}
    tile = R if pool else C
    tiles = [list(range(t, min(t + tile, channels))) for t in range(0, channels, tile)]
    writes = []
    acc_mem = [[[0] * C for _ in range(pixels)] for _ in range(2)]    # [half][pixel][column]

    async def memories(ctx):
        acc_hist, res_hist = [None, None], [None, None]
        while True:
            acc_hist.append((ctx.get(dut.acc_rd_en), ctx.get(dut.acc_rd_addr)))
            res_hist.append((ctx.get(dut.res_rd_en), ctx.get(dut.res_rd_addr)))
            en, addr = acc_hist[-3] or (0, 0)
            for h in range(2):
                for c in range(C):
                    ctx.set(dut.i_acc_data[h][c], acc_mem[h][addr][c] if en else rng.randint(-9, 9))
            en, addr = res_hist[-3] or (0, 0)
            for b in range(NB):
                for r in range(R):
                    hit = (en >> (b * R + r)) & 1
                    ctx.set(dut.i_rd_data[b][r], banks.get((b, r, addr), 0) if hit else rng.randint(-32, 31))
            wb = ctx.get(dut.wb_en)
            for i in range(NB * R):
                if (wb >> i) & 1:
                    writes.append((i // R, i % R, ctx.get(dut.wb_addr), ctx.get(dut.wb_data[i % R])))
            await ctx.tick()

    async def issue(ctx):
        # The issue stage: start, then each tile into its half (or the pool sums) once free.
        ctx.set(dut.desc, desc)
        ctx.set(dut.i_pixels, pixels)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        await ctx.tick().repeat(2)
        ctx.set(dut.in_layer, 1)
        for t, chans in enumerate(tiles):
            half = t % 2
            while not (ctx.get(dut.pool_free) if pool else not (ctx.get(dut.half_busy) >> half) & 1):
                await ctx.tick()
            ctx.set(dut.pool_claim if pool else dut.claim, 1)
            ctx.set(dut.claim_half, half)
            await ctx.tick()
            ctx.set(dut.pool_claim if pool else dut.claim, 0)
            # (a tile's first vector reaches the pool adder two cycles after its claim,
            # its sum a cycle later; the accumulators take longer)
            await ctx.tick().repeat(rng.randint(2, 6))
            if pool:
                for r in range(R):
                    ctx.set(dut.i_pool_sum[r], acc[chans[r]][0] if r < len(chans) else 0)
                ctx.set(dut.i_pool_done, 1)
            else:
                for p in range(pixels):
                    acc_mem[half][p] = [acc[chans[c]][p] if c < len(chans) else 0
                                                 for c in range(C)]
                ctx.set(dut.i_full, 1)
                ctx.set(dut.i_full_half, half)
            await ctx.tick()
            ctx.set(dut.i_pool_done, 0)
            ctx.set(dut.i_full, 0)

    async def constants(ctx):
        layout = dut.i_chan.payload.shape()
        await put_stream(ctx, dut.i_chan, [layout.const(k).as_bits() for k in consts], rng,
                         idle=0.5, max_gap=3)

    async def tb(ctx):
        for _ in range(60 * channels * pixels + 200):
            if ctx.get(dut.in_layer) and ctx.get(dut.done):
                break
            await ctx.tick()
        assert ctx.get(dut.done)

    simulate(dut, tb, background=[memories, issue, constants])

    want = requant(torch.tensor(acc).view(1, channels, 1, pixels),
                   torch.tensor([k["mult"] for k in consts]), torch.tensor([k["bias"] for k in consts]),
                   shift, cfg.a_bits, relu,
                   res=torch.tensor(res).view(1, channels, 1, pixels) if residual else None,
                   m_res=m_res).view(channels, pixels)
    expected = sorted((dst, c % R, (c // R) * pixels + p, int(want[c][p]))
                      for c in range(channels) for p in range(pixels))
    assert sorted(writes) == expected


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("channels,pixels,relu,residual", [(6, 5, True, False), (5, 3, False, True),
                                                          (3, 1, True, True)])
def test_post_reader_requantizes_conv_tiles_into_the_destination(name, channels, pixels, relu,
                                                                 residual):
    cfg = CONFIGS[name]
    channels = min(channels, cfg.max_co)
    _run(cfg, pool=False, channels=channels, pixels=pixels, relu=relu, residual=residual, seed=channels)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_post_reader_requantizes_pool_sums(name):
    cfg = CONFIGS[name]
    _run(cfg, pool=True, channels=5, pixels=1, relu=False, residual=False, seed=3)
