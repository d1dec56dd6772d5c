"""UART PHY: Amaranth-simulator tests of the transmitter and the receiver.

``MLG_SEED`` changes the seed.
"""

from __future__ import annotations

import gc
import os
import random
import warnings

import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable

from hw.uart import UARTRx, UARTTx, uart_divisor
from tests.support import put_stream, simulate

SEED = int(os.environ.get("MLG_SEED", "2024"))


def _frame_bits(byte):
    return [0] + [(byte >> i) & 1 for i in range(8)] + [1]


async def _drive_line(ctx, line, levels):
    """Drive ``line`` with ``(level, cycles)`` segments."""
    for level, cycles in levels:
        ctx.set(line, level)
        for _ in range(cycles):
            await ctx.tick()


def _line_frames(data, period, rng, max_gap, stop=1):
    """Line segments for ``data`` sent with a bit period of ``period`` cycles (fractional)."""
    levels = [(1, 3 * round(period))]
    for b in data:
        levels.append((1, rng.randint(0, max_gap)))
        bits = _frame_bits(b)
        bits[-1] = stop
        edges = [round(k * period) for k in range(11)]
        levels += [(bit, edges[k + 1] - edges[k]) for k, bit in enumerate(bits)]
    levels.append((1, 3 * round(period)))
    return levels


class _Collector:
    """Reads ``rx.o_stream`` under backpressure and accounts for every byte sent.

    A dropped byte is the one that completed while the output held an unread
    byte, so it follows that byte in the sent order; the overrun pulses seen
    before that byte is read name the bytes right after it.
    """

    def __init__(self, rx, sent):
        self.rx = rx
        self.sent = sent
        self.got = []
        self.dropped = []
        self.errors = 0
        self._pos = 0
        self._pending = 0

    def done(self):
        return self._pos + self._pending == len(self.sent)

    def step(self, ctx, ready):
        rx = self.rx
        ctx.set(rx.o_stream.ready, ready)
        self.errors += ctx.get(rx.o_error)
        if ctx.get(rx.o_overrun):
            assert ctx.get(rx.o_stream.valid), "overrun with an empty output"
            self._pending += 1
        if ready and ctx.get(rx.o_stream.valid):
            byte = ctx.get(rx.o_stream.payload)
            assert self._pos < len(self.sent), f"extra byte {byte:#04x}"
            assert byte == self.sent[self._pos], (self._pos, byte, self.sent[self._pos])
            self.got.append(byte)
            self.dropped += self.sent[self._pos + 1:self._pos + 1 + self._pending]
            self._pos += 1 + self._pending
            self._pending = 0


def _loopback(divisor, n, seed, max_gap, stall, max_stall):
    """Send ``n`` random bytes TX -> RX; the reader stalls with probability ``stall``
    for up to ``max_stall`` cycles at a time. Returns the collector."""
    rng = random.Random(seed)
    m = Module()
    m.submodules.tx = tx = UARTTx(divisor)
    m.submodules.rx = rx = UARTRx(divisor)
    m.d.comb += rx.i_rx.eq(tx.o_tx)
    sent = [rng.randrange(256) for _ in range(n)]
    col = _Collector(rx, sent)

    async def producer(ctx):
        await put_stream(ctx, tx.i_stream, sent, rng, max_gap=max_gap)

    async def consumer(ctx):
        limit = n * (10 * divisor + max_gap + 2) + 20 * divisor + max_stall + 100
        stalled = 0
        for _ in range(limit):
            if col.done():
                break
            if stalled:
                stalled -= 1
            elif rng.random() < stall:
                stalled = rng.randint(1, max_stall)
            col.step(ctx, 0 if stalled else 1)
            await ctx.tick()
        assert col.done(), (len(col.got), len(col.dropped), n)
        # Nothing more may come out once every byte is accounted for.
        ctx.set(rx.o_stream.ready, 1)
        for _ in range(12 * divisor):
            assert not ctx.get(rx.o_stream.valid)
            assert not ctx.get(rx.o_overrun)
            assert not ctx.get(rx.o_error)
            await ctx.tick()

    simulate(m, consumer, background=[producer])
    assert col.errors == 0
    assert len(col.got) + len(col.dropped) == n
    return col


@pytest.mark.parametrize("divisor", [4, 5, 7, 16])
def test_loopback_random_gaps_and_backpressure(divisor):
    """Random bytes with random gaps; the reader is slow for a few cycles at a time,
    well within a frame, so no byte is lost."""
    col = _loopback(divisor, 40, SEED + divisor, max_gap=3 * divisor, stall=0.3, max_stall=4 * divisor)
    assert col.dropped == []


@pytest.mark.parametrize("divisor", [4, 9])
def test_loopback_overrun(divisor):
    """The reader stalls for several frames at a time: the bytes completed meanwhile are
    dropped with an overrun pulse each, the bytes read are exactly the others."""
    col = _loopback(divisor, 40, SEED + 100 + divisor, max_gap=divisor, stall=0.1, max_stall=40 * divisor)
    assert col.dropped, "no overrun happened"
    assert col.got


@pytest.mark.parametrize("divisor", [4, 7])
def test_tx_waveform(divisor):
    """Two bytes sent back to back give exactly start, 8 data bits LSB first, stop, each
    ``divisor`` cycles, with no idle cycle between the frames; the line idles high and
    the next byte is taken only in the last cycle of a stop bit."""
    dut = UARTTx(divisor)
    data = [0xA5, 0x3C]
    want = [bit for b in data for bit in _frame_bits(b) for _ in range(divisor)] + [1] * (2 * divisor)
    taken = []

    async def producer(ctx):
        for _ in range(5):
            await ctx.tick()
        cycle = 5
        for b in data:
            ctx.set(dut.i_stream.payload, b)
            ctx.set(dut.i_stream.valid, 1)
            while True:
                ready = ctx.get(dut.i_stream.ready)
                await ctx.tick()
                cycle += 1
                if ready:
                    taken.append(cycle)
                    break
        ctx.set(dut.i_stream.valid, 0)

    async def monitor(ctx):
        line = []
        for _ in range(5):
            assert ctx.get(dut.o_tx) == 1
            await ctx.tick()
        for _ in range(len(want)):
            await ctx.tick()
            line.append(ctx.get(dut.o_tx))
        assert line == want
        assert ctx.get(dut.i_stream.ready)

    simulate(dut, monitor, background=[producer])
    assert taken == [6, 6 + 10 * divisor]


@pytest.mark.parametrize("divisor", [4, 5, 8, 13, 16])
@pytest.mark.parametrize("skew", [-0.02, 0.0, 0.02])
def test_rx_baud_mismatch(divisor, skew):
    """The line runs 2 % slower or faster than the receiver, frames back to back or with
    gaps; every byte still decodes."""
    rng = random.Random(SEED + divisor * 7 + int(skew * 100))
    dut = UARTRx(divisor)
    sent = [rng.randrange(256) for _ in range(12)] + [0x00, 0xFF, 0x55, 0xAA]
    levels = _line_frames(sent, divisor * (1 + skew), rng, max_gap=divisor)
    col = _Collector(dut, sent)

    async def line(ctx):
        await _drive_line(ctx, dut.i_rx, levels)

    async def reader(ctx):
        for _ in range(sum(c for _, c in levels)):
            col.step(ctx, 1)
            await ctx.tick()

    simulate(dut, reader, background=[line])
    assert col.got == sent
    assert col.errors == 0


@pytest.mark.parametrize("divisor", [5, 16])
def test_rx_start_glitch_ignored(divisor):
    """A low pulse shorter than half a bit is not a start bit; a real frame after it decodes."""
    dut = UARTRx(divisor)
    glitch = (divisor - 1) // 2
    levels = [(1, 3 * divisor), (0, glitch), (1, 2 * divisor)]
    levels += [(bit, divisor) for bit in _frame_bits(0x96)] + [(1, 3 * divisor)]
    col = _Collector(dut, [0x96])

    async def line(ctx):
        await _drive_line(ctx, dut.i_rx, levels)

    async def reader(ctx):
        for _ in range(sum(c for _, c in levels)):
            col.step(ctx, 1)
            await ctx.tick()

    simulate(dut, reader, background=[line])
    assert col.got == [0x96]
    assert col.errors == 0


@pytest.mark.parametrize("divisor", [4, 11])
def test_rx_framing_error(divisor):
    """A frame with a low stop bit pulses o_error once and delivers nothing, also when
    the line then stays low for several frame times; the next good frame decodes."""
    rng = random.Random(SEED + 300 + divisor)
    dut = UARTRx(divisor)
    levels = _line_frames([0x5A], divisor, rng, max_gap=0, stop=0)
    levels += _line_frames([0xC3], divisor, rng, max_gap=0, stop=0)
    levels.insert(-1, (0, 25 * divisor))
    levels += _line_frames([0x81], divisor, rng, max_gap=divisor)
    col = _Collector(dut, [0x81])
    pulses = []

    async def line(ctx):
        await _drive_line(ctx, dut.i_rx, levels)

    async def reader(ctx):
        cycle = 0
        for _ in range(sum(c for _, c in levels)):
            if ctx.get(dut.o_error):
                pulses.append(cycle)
            col.step(ctx, 1)
            await ctx.tick()
            cycle += 1

    simulate(dut, reader, background=[line])
    assert len(pulses) == 2
    assert pulses[1] - pulses[0] > 10 * divisor
    assert col.got == [0x81]


@pytest.mark.parametrize("cls", [UARTTx, UARTRx])
@pytest.mark.parametrize("divisor", [3, 0, -8, 4.5, "16", True])
def test_divisor_rejected(cls, divisor):
    # The half-built component must not be reported as unused.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=r"divisor .* out of range; accepted an integer >= 4") as info:
            cls(divisor)
        message = str(info.value)
        del info
        gc.collect()
    assert repr(divisor) in message


@pytest.mark.parametrize("cls", [UARTTx, UARTRx])
@pytest.mark.parametrize("divisor", [4, 868])
def test_divisor_accepted(cls, divisor):
    dut = cls(divisor)
    assert dut.divisor == divisor
    Fragment.get(dut, None)


def test_uart_divisor():
    assert uart_divisor(100_000_000, 115_200) == 868
    assert uart_divisor(48_000_000, 3_000_000) == 16
    assert uart_divisor(12_000_000, 115_200) == 104
    # 1.5 % off: accepted.
    assert uart_divisor(1_015_000, 250_000) == 4
    with pytest.raises(ValueError, match=r"clk 1000000 Hz cannot make baud 115200: .*error 3\.5"):
        uart_divisor(1_000_000, 115_200)
    with pytest.raises(ValueError, match=r"clk 25000000 Hz cannot make baud 3000000: .*error 4\.17%"):
        uart_divisor(25_000_000, 3_000_000)
    with pytest.raises(ValueError, match=r"divisor 3, accepted >= 4"):
        uart_divisor(3_000_000, 1_000_000)
    with pytest.raises(ValueError, match="positive"):
        uart_divisor(0, 115_200)
    with pytest.raises(ValueError, match="positive"):
        uart_divisor(100_000_000, -1)
