"""Shared helpers of the Amaranth-simulator unit tests: stream drivers and small configs.

The drivers take the port of a ``amaranth.lib.stream`` interface as the DUT sees it
(``valid``/``ready``/``payload``) and a ``random.Random`` for the gaps, so a test's
idle and back-pressure patterns are reproducible from its seed.
"""

from __future__ import annotations

import dataclasses
import random

from amaranth.sim import Simulator

from gen.config import AcceleratorConfig

__all__ = ["simulate", "put_stream", "take_stream", "raises_while_building", "TINY", "TINY_SERIAL",
           "TINY_COMPACT", "LINK", "LINK_BANK", "SMOKE", "small_program"]

# The small configs of the formal checks (2 x 2 array, 3 x 3 maps, 4-bit data; the
# serial generation unit) serve the unit tests too; a compact build of TINY.
from hw.flow.formal import TINY, TINY_SERIAL  # noqa: E402

TINY_COMPACT = dataclasses.replace(TINY, compact=True, layer_log=False)
# A host link with the smallest frame buffer and timeout a config allows (64 bytes, 16
# cycles) and 16-bit counters; its counters as events (AcceleratorConfig.counter_bank).
LINK = dataclasses.replace(TINY, max_payload=64, link_timeout=16, counter_bits=16)
LINK_BANK = dataclasses.replace(LINK, compact=True, layer_log=False)
# The smallest useful accelerator for the board tops and the synthesis flow (the smoke
# test builds it for the ULX3S).
SMOKE = AcceleratorConfig(rows=2, cols=2, max_ci=8, max_co=8, max_h=8, max_w=8, max_bo=4,
                          act_depth=256, base_store_bytes=512, const_depth=64, max_payload=256,
                          max_layers=8, gen_lanes=2, baud=115200)


def small_program(seed: int = 3, rows: int = 4, cols: int = 4):
    """A random network of the accelerator tests compiled for a ``rows`` x ``cols``
    array: the compile result and its program as read back."""
    from gen.compiler import compile_network
    from gen.program import read_program
    from tests.test_accelerator import random_network

    result = compile_network(random_network(seed=seed), rows=rows, cols=cols)
    return result, read_program(result.program, config=result.config)


def simulate(dut, *testbenches, background=(), period: float = 1e-8, vcd: str | None = None):
    """Run ``testbenches`` (and ``background`` ones) on ``dut`` with one clock."""
    sim = Simulator(dut)
    sim.add_clock(period)
    for tb in background:
        sim.add_testbench(tb, background=True)
    for tb in testbenches:
        sim.add_testbench(tb)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()


async def put_stream(ctx, port, items, rng: random.Random | None = None, *, idle: float = 0.0,
                     max_gap: int = 0):
    """Send ``items`` on the sink ``port`` one transfer each: before every item, a gap
    of idle cycles drawn from ``rng`` (each cycle idle with probability ``idle``, then
    up to ``max_gap`` more); ``valid`` stays high until the DUT takes the item."""
    rng = rng or random.Random(0)
    for item in items:
        while idle and rng.random() < idle:
            await ctx.tick()
        for _ in range(rng.randint(0, max_gap) if max_gap else 0):
            await ctx.tick()
        # (A structured payload takes a dict of its fields, or its bits as an int.)
        payload = port.payload
        ctx.set(payload.as_value() if isinstance(item, int) and hasattr(payload, "as_value")
                else payload, item)
        ctx.set(port.valid, 1)
        while True:
            ready = ctx.get(port.ready)
            await ctx.tick()
            if ready:
                break
        ctx.set(port.valid, 0)


async def take_stream(ctx, port, n: int, rng: random.Random | None = None, *,
                      backpressure: float = 0.0, fields=None) -> list:
    """Take ``n`` transfers from the source ``port``, holding ``ready`` low for a
    random cycle with probability ``backpressure`` before each; returns the payloads
    (as ints, or tuples of the named ``fields`` of a structured payload)."""
    rng = rng or random.Random(0)
    got = []
    for _ in range(n):
        while backpressure and rng.random() < backpressure:
            await ctx.tick()
        ctx.set(port.ready, 1)
        if fields:
            values = await ctx.tick().sample(*(getattr(port.payload, f) for f in fields)).until(
                port.valid)
            got.append(tuple(values))
        else:
            (value,) = await ctx.tick().sample(port.payload).until(port.valid)
            got.append(value)
        ctx.set(port.ready, 0)
    return got


def raises_while_building(exc, match: str, build):
    """``build()`` raises ``exc`` with a message matching ``match``; the half-built
    component it leaves is not reported as unused."""
    import gc
    import warnings

    import pytest
    from amaranth.hdl import UnusedElaboratable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(exc, match=match):
            build()
        gc.collect()
