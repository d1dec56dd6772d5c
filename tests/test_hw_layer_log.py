"""The layer log: entries written in one cycle read back word by word."""

from __future__ import annotations

import dataclasses
import random

from gen.contract import LOG_COUNTERS
from hw.layer_log import LayerLog
from tests.support import TINY, simulate

CONFIG = dataclasses.replace(TINY, max_layers=5)


def test_layer_log_keeps_each_layers_counts():
    """Random entries written in random order (some twice); every word of every entry
    reads back as last written, the cycle after its layer is addressed."""
    cfg = CONFIG
    dut = LayerLog(cfg)
    rng = random.Random(1)
    bits = cfg.counter_bits
    model = {}

    async def bench(ctx):
        for _ in range(3 * cfg.max_layers):
            layer = rng.randrange(cfg.max_layers)
            counts = {name: rng.randrange(1 << bits) for name in LOG_COUNTERS}
            ctx.set(dut.we, 1)
            ctx.set(dut.layer, layer)
            for name, v in counts.items():
                ctx.set(dut.counts[name], v)
            await ctx.tick()
            model[layer] = counts
            ctx.set(dut.we, 0)
            for _ in range(rng.randint(0, 2)):
                await ctx.tick()
        for layer, counts in model.items():
            ctx.set(dut.rd_layer, layer)
            await ctx.tick()
            for i, name in enumerate(LOG_COUNTERS):
                ctx.set(dut.rd_word, i)
                assert ctx.get(dut.rd_data) == counts[name], (layer, name)

    simulate(dut, bench)
    assert len(model) > 1
