"""Host link: Amaranth-simulator tests of the frame receiver, the frame transmitter and
the whole link, against the frame format of :mod:`host.protocol`.

``MLG_SEED`` changes the seed.
"""

from __future__ import annotations

import os
import random

import pytest
from amaranth.hdl import Module, Signal

from hw.link import LINK_COUNTERS, HostLink
from hw.link_rx import FrameReceiver
from hw.link_tx import FrameTransmitter
from host.protocol import (CRC_BYTES, ERR_CRC, ERR_LENGTH, ERR_TIMEOUT, HEADER_BYTES, OP_ERROR,
                           OP_WRITE, REGION_BASES, REQUESTS, SYNC, TAGS, FrameDecoder, crc16,
                           encode_frame)
from tests.support import LINK, LINK_BANK, put_stream, simulate, take_stream

SEED = int(os.environ.get("MLG_SEED", "2024"))
T = LINK.link_timeout
MAX = LINK.max_payload


def _frame(rng, length=None, op=None):
    length = rng.randint(0, MAX) if length is None else length
    op = rng.randrange(256) if op is None else op
    return op, bytes(rng.randrange(256) for _ in range(length))


def _junk(rng, n):
    return bytes(rng.choice([b for b in range(256) if b != SYNC]) for _ in range(n))


def _oversized(rng, op, length, inner=b"", tag=0):
    """A whole frame (valid CRC) whose LEN ``length`` is above max_payload, its payload
    ``inner`` (a complete frame, say) padded with junk."""
    body = bytes([op]) + length.to_bytes(2, "little") + bytes([tag])
    body += inner + _junk(rng, length - len(inner))
    return bytes([SYNC]) + body + crc16(body).to_bytes(2, "big")


def _hidden_write(tag=0):
    """A complete, valid WRITE of 16 zero bytes to the base store's address 0."""
    return encode_frame(OP_WRITE, REQUESTS[OP_WRITE].pack_args(REGION_BASES, 0) + bytes(16), tag)


# ---- the receiver ------------------------------------------------------------------

def _receive(segments, *, seed, max_gap=2, answer=3):
    """Feed ``segments`` (bytes, or an int: that many idle cycles) to a FrameReceiver.
    The environment takes a request as soon as it is offered and, ``answer`` cycles
    after a request was taken or an error raised, pulses ``i_done``.

    Returns the trace: the cycle of every byte taken, the requests (cycle, op, len,
    the frame buffer's first ``len`` bytes), the refusals (cycle ``error`` rose,
    code, op, tag) and the cycles of ``ev_frame``, ``ev_refused``, ``waiting``,
    ``i_done`` and of every frame buffer write (``writes``)."""
    rng = random.Random(seed)
    dut = FrameReceiver(LINK)
    tr = {k: [] for k in ("fires", "requests", "errors", "ev_frame", "ev_refused", "waiting",
                          "done", "writes")}
    mem = {}

    async def host(ctx):
        for seg in segments:
            if isinstance(seg, int):
                for _ in range(seg):
                    await ctx.tick()
            else:
                await put_stream(ctx, dut.i_rx, seg, rng, max_gap=max_gap)
        for _ in range(T + 2 * answer + 10):
            await ctx.tick()

    async def env(ctx):
        cycle, wait, was_error = 0, None, False
        while True:
            ready = done = 0
            if wait is None:
                if ctx.get(dut.o_req.valid):
                    ready, wait = 1, answer
                elif ctx.get(dut.error):
                    wait = answer
            elif wait == 0:
                done, wait = 1, None
            else:
                wait -= 1
            ctx.set(dut.o_req.ready, ready)
            ctx.set(dut.i_done, done)
            _, _, fire, valid, op, length, error, code, err_op, we, addr, data, ev_f, ev_r, \
                waiting, tag = await ctx.tick().sample(
                    dut.i_rx.valid & dut.i_rx.ready, dut.o_req.valid, dut.o_req.payload.op,
                    dut.o_req.payload.len, dut.error, dut.err_code, dut.err_op, dut.buf_we,
                    dut.buf_waddr, dut.buf_wdata, dut.ev_frame, dut.ev_refused, dut.waiting,
                    dut.tag)
            if we:
                mem[addr] = data
                tr["writes"].append(cycle)
            if fire:
                tr["fires"].append(cycle)
            if valid and ready:
                tr["requests"].append((cycle, op, length, bytes(mem.get(i) for i in range(length)),
                                       tag))
            if error and not was_error:
                tr["errors"].append((cycle, code, err_op, tag))
            was_error = error
            for name, flag in (("ev_frame", ev_f), ("ev_refused", ev_r), ("waiting", waiting),
                               ("done", done)):
                if flag:
                    tr[name].append(cycle)
            cycle += 1

    simulate(dut, host, background=[env])
    return tr


def test_receiver_hands_over_good_frames_with_their_payload():
    """Frames of every kind of length (none, one byte, the frame buffer's size, random)
    between junk bytes: each becomes one request with its opcode, length and payload,
    offered 3 cycles after the CRC's last byte; nothing is taken from the line from
    then until the answer is sent."""
    rng = random.Random(SEED)
    frames = [_frame(rng, n) for n in (0, 1, MAX, None, None, 2)]
    segments, last = [], []
    pos = 0
    for op, payload in frames:
        seg = _junk(rng, rng.randint(0, 3)) + encode_frame(op, payload)
        segments.append(seg)
        pos += len(seg)
        last.append(pos - 1)
    tr = _receive(segments, seed=SEED)
    assert [(op, n, p) for _, op, n, p, _ in tr["requests"]] == [(op, len(p), p) for op, p in frames]
    assert tr["errors"] == [] and tr["ev_refused"] == []
    assert len(tr["fires"]) == pos
    for (cycle, *_), i, done in zip(tr["requests"], last, tr["done"]):
        assert cycle == tr["fires"][i] + 3
        # The frame is accepted the cycle before it is offered; ``waiting`` from the cycle
        # after it is taken until the answer is sent; the line waits meanwhile.
        assert cycle - 1 in tr["ev_frame"]
        assert [c for c in tr["waiting"] if cycle < c <= done] == list(range(cycle + 1, done + 1))
        assert not [f for f in tr["fires"] if tr["fires"][i] < f <= done]
    assert len(tr["ev_frame"]) == len(frames)
    assert len(tr["waiting"]) == sum(d - c for (c, *_), d in zip(tr["requests"], tr["done"]))


def test_receiver_refuses_a_bad_crc_and_goes_on():
    """A frame with a corrupt CRC or payload is refused with ERR_CRC and its opcode 3
    cycles after its last byte and never offered; the next frame is accepted."""
    rng = random.Random(SEED + 1)
    (op1, p1), (op2, p2), (op3, p3) = _frame(rng, 5), _frame(rng, 3), _frame(rng, 4)
    bad_crc = bytearray(encode_frame(op1, p1))
    bad_crc[-1] ^= 0x10
    bad_payload = bytearray(encode_frame(op2, p2))
    bad_payload[5] ^= 0x01
    segments = [bytes(bad_crc), bytes(bad_payload), encode_frame(op3, p3)]
    tr = _receive(segments, seed=SEED + 1)
    ends = [len(segments[0]) - 1, len(segments[0]) + len(segments[1]) - 1]
    assert tr["errors"] == [(tr["fires"][ends[0]] + 3, ERR_CRC, op1, 0),
                            (tr["fires"][ends[1]] + 3, ERR_CRC, op2, 0)]
    assert [(op, p) for _, op, _, p, _ in tr["requests"]] == [(op3, p3)]
    # One refusal event each, the cycle after the refusal.
    assert tr["ev_refused"] == [c for c, *_ in tr["errors"]]
    assert len(tr["ev_frame"]) == 1


def test_receiver_refuses_a_length_above_the_frame_buffer():
    """A length of max_payload + 1 is refused with ERR_LENGTH 3 cycles after the frame's
    declared last byte; the declared rest is taken but never written to the frame
    buffer, and a complete valid frame hidden in it is not executed; max_payload
    itself is accepted, and so is the frame after the refused one."""
    rng = random.Random(SEED + 2)
    hidden = encode_frame(0x42, bytes(16), tag=7)
    over = _oversized(rng, 0x44, MAX + 1, _junk(rng, 3) + hidden, tag=9)
    op, payload = _frame(rng, MAX)
    tr = _receive([over, 1, encode_frame(op, payload, tag=3)], seed=SEED + 2)
    end = len(over) - 1
    assert tr["errors"] == [(tr["fires"][end] + 3, ERR_LENGTH, 0x44, 9)]
    assert tr["ev_refused"] == [tr["errors"][0][0]]
    assert [(o, p, t) for _, o, _, p, t in tr["requests"]] == [(op, payload, 3)]
    assert not [c for c in tr["writes"] if c <= tr["fires"][end]]
    assert len(tr["ev_frame"]) == 1


@pytest.mark.parametrize("length", [MAX + 1, 0xFFFF])
def test_receiver_ends_a_refused_frame_on_a_gap(length):
    """An oversized frame whose declared rest never comes (a corrupt LEN): a gap of
    ``link_timeout`` cycles ends the drop with ERR_LENGTH ``link_timeout + 1`` cycles
    after the last byte; the frame after it is accepted."""
    rng = random.Random(SEED + 4)
    head = bytes([SYNC, 0x44]) + length.to_bytes(2, "little") + bytes([5]) + _junk(rng, 10)
    op, payload = _frame(rng, 4)
    tr = _receive([head, T, encode_frame(op, payload, tag=6)], seed=SEED + 4)
    last = len(head) - 1
    assert tr["errors"] == [(tr["fires"][last] + T + 1, ERR_LENGTH, 0x44, 5)]
    assert [(o, p, t) for _, o, _, p, t in tr["requests"]] == [(op, payload, 6)]
    assert not [c for c in tr["writes"] if c <= tr["errors"][0][0]]


@pytest.mark.parametrize("pause", [T - 1, T])
def test_receiver_times_out_a_frame_that_stops(pause):
    """Inside a frame, ``link_timeout - 1`` idle cycles between two bytes are waited out;
    ``link_timeout`` drop the frame with ERR_TIMEOUT ``link_timeout + 1`` cycles after
    the last byte, and the bytes that follow are hunted through for the next SYNC."""
    rng = random.Random(SEED + 3)
    frame = bytes([SYNC])
    while SYNC in frame[7:] or len(frame) == 1:   # (the frame's rest: no SYNC in it)
        op, payload = _frame(rng, 6)
        frame = encode_frame(op, payload)
    op2, p2 = _frame(rng, 2)
    tr = _receive([frame[:7], pause, frame[7:], encode_frame(op2, p2)], seed=SEED + 3,
                  max_gap=0)
    got = [(o, p) for _, o, _, p, _ in tr["requests"]]
    if pause < T:
        assert tr["fires"][7] - tr["fires"][6] == pause + 1
        assert tr["errors"] == []
        assert got == [(op, payload), (op2, p2)]
    else:
        assert tr["errors"] == [(tr["fires"][6] + T + 1, ERR_TIMEOUT, op, 0)]
        assert tr["fires"][7] > tr["errors"][0][0]
        assert got == [(op2, p2)]


# ---- the transmitter ---------------------------------------------------------------

def _transmit(frames, *, seed, error_first=None, backpressure=0.3, max_gap=2, tag=0):
    """Have a FrameTransmitter send the responses ``frames`` ((op, payload), each header
    offered with ``accept`` high and ``tag`` on its tag input, its payload with random
    gaps), and, with ``error_first`` = (code, op), an error frame raised together with
    the first header.
    The line side takes bytes under random backpressure. Returns the bytes sent, the
    cycles ``done`` was high, the cycle each header was taken and the (cycle, byte)
    of every cycle ``o_tx.valid`` was high."""
    rng = random.Random(seed)
    dut = FrameTransmitter()
    sent, dones, taken, offered = [], [], [], []
    total = (sum(HEADER_BYTES + len(p) + CRC_BYTES for _, p in frames)
             + (HEADER_BYTES + 2 + CRC_BYTES if error_first else 0))

    top = Module()
    top.submodules.tx = dut
    if error_first:
        # The receiver's side: ``error`` a register from reset, falling at ``done``.
        raised = Signal(init=1)
        with top.If(dut.done):
            top.d.sync += raised.eq(0)
        top.d.comb += [dut.error.eq(raised), dut.err_code.eq(error_first[0]),
                       dut.err_op.eq(error_first[1])]

    async def executor(ctx):
        ctx.set(dut.accept, 1)
        ctx.set(dut.tag, tag)
        for op, payload in frames:
            await put_stream(ctx, dut.i_resp, [{"op": op, "len": len(payload)}], rng,
                             max_gap=max_gap)
            await put_stream(ctx, dut.i_payload, payload, rng, max_gap=max_gap)

    async def monitor(ctx):
        cycle = 0
        while True:
            _, _, done, resp, valid, payload = await ctx.tick().sample(
                dut.done, dut.i_resp.valid & dut.i_resp.ready, dut.o_tx.valid, dut.o_tx.payload)
            if done:
                dones.append(cycle)
            if resp:
                taken.append(cycle)
            if valid:
                offered.append((cycle, payload))
            cycle += 1

    async def line(ctx):
        sent.extend(await take_stream(ctx, dut.o_tx, total, rng, backpressure=backpressure))
        for _ in range(20):
            assert not ctx.get(dut.o_tx.valid)
            await ctx.tick()

    simulate(top, line, background=[executor, monitor])
    return bytes(sent), dones, taken, offered


def test_transmitter_frames_responses_as_the_protocol_decodes_them():
    """Responses of random lengths (none and max_payload among them), payload bytes with
    gaps, the line with backpressure: the bytes decode to the same frames, ``done``
    pulses once per frame, and each header is taken only when the last frame is out."""
    rng = random.Random(SEED + 10)
    frames = [_frame(rng, n) for n in (0, 1, MAX, None, None)]
    tag = rng.randrange(TAGS)
    sent, dones, taken, _ = _transmit(frames, seed=SEED + 10, tag=tag)
    assert sent == b"".join(encode_frame(op, p, tag) for op, p in frames)
    decoded = FrameDecoder(max_payload=MAX).feed(sent)
    assert [(f.op, f.payload, f.tag) for f in decoded] == [(op, p, tag) for op, p in frames]
    assert len(dones) == len(frames)
    assert all(d < t for d, t in zip(dones, taken[1:]))


def test_transmitter_offers_sync_the_cycle_after_the_header():
    """With the line always ready, SYNC is offered the cycle after the header is taken."""
    rng = random.Random(SEED + 11)
    frames = [_frame(rng, 3), _frame(rng, 0)]
    sent, _, taken, offered = _transmit(frames, seed=SEED + 11, backpressure=0.0, max_gap=0)
    assert sent == b"".join(encode_frame(op, p) for op, p in frames)
    assert len(taken) == 2
    for t in taken:
        assert next((c, b) for c, b in offered if c > t) == (t + 1, SYNC)


def test_transmitter_sends_the_error_frame_first():
    """An error raised while a response header is offered: the error frame (OP_ERROR,
    code, opcode, with the tag) goes out first, the response after it."""
    rng = random.Random(SEED + 12)
    frames = [_frame(rng, 4)]
    sent, dones, _, _ = _transmit(frames, seed=SEED + 12, error_first=(ERR_CRC, 0x5A), tag=0x3C)
    assert sent == (encode_frame(OP_ERROR, bytes([ERR_CRC, 0x5A]), 0x3C)
                    + encode_frame(*frames[0], 0x3C))
    assert len(dones) == 2


# ---- the whole link ----------------------------------------------------------------

def _link_session(config, requests, *, seed):
    """A host sends ``requests`` (frame bytes) one at a time to a HostLink and reads each
    response; the executor answers a request (op, payload) with op | 0x80 and the
    payload reversed, read from the frame buffer. Returns the decoded responses and the
    counters (the counter outputs, or the events counted)."""
    rng = random.Random(seed)
    dut = HostLink(config)
    responses = []
    events = {name: 0 for name in LINK_COUNTERS}

    async def host(ctx):
        for frame in requests:
            await put_stream(ctx, dut.i_rx, frame, rng, max_gap=2)
            head = await take_stream(ctx, dut.o_tx, HEADER_BYTES, rng, backpressure=0.2)
            rest = await take_stream(ctx, dut.o_tx, head[2] + 256 * head[3] + 2, rng,
                                     backpressure=0.2)
            responses.extend(FrameDecoder().feed(bytes(head + rest)))
        for _ in range(4):
            await ctx.tick()
        if not config.counter_bank:
            events.update({name: ctx.get(getattr(dut, name)) for name in LINK_COUNTERS})

    async def executor(ctx):
        req = dut.o_req
        while True:
            # (polled rather than awaited with take_stream: this testbench is still
            # waiting for a request when the simulation ends)
            while not ctx.get(req.valid) or rng.random() < 0.3:
                await ctx.tick()
            op, length = ctx.get(req.payload.op), ctx.get(req.payload.len)
            ctx.set(req.ready, 1)
            await ctx.tick()
            ctx.set(req.ready, 0)
            payload = []
            for i in range(length):
                ctx.set(dut.buf_addr, i)
                await ctx.tick()
                payload.append(ctx.get(dut.buf_data))
            await put_stream(ctx, dut.i_resp, [{"op": op | 0x80, "len": length}], rng, max_gap=2)
            await put_stream(ctx, dut.i_payload, payload[::-1], rng, max_gap=2)

    async def counting(ctx):
        while True:
            _, _, *flags = await ctx.tick().sample(
                *(getattr(dut, f"ev_{name}") for name in LINK_COUNTERS))
            for name, flag in zip(LINK_COUNTERS, flags):
                events[name] += flag

    simulate(dut, host, background=[executor] + ([counting] if config.counter_bank else []))
    return [(f.op, f.payload, f.tag) for f in responses], events


@pytest.mark.parametrize("config", [LINK, LINK_BANK], ids=["counters", "events"])
def test_link_answers_every_frame_and_counts(config):
    """Good frames are executed and answered; a bad CRC and an oversized length (a
    valid WRITE hidden in its payload) get the link's own error frames. Every answer
    carries its request's tag. The counters: bytes in and out, frames executed,
    frames refused."""
    rng = random.Random(SEED + 20)
    good = [_frame(rng, n) for n in (0, 1, MAX, None)]
    tags = rng.sample(range(TAGS), 6)
    bad = bytearray(encode_frame(0x33, b"xyz", tags[1]))
    bad[-2] ^= 0xFF
    over = _oversized(rng, 0x44, MAX + 1, _hidden_write(tags[3]), tags[3])
    requests = [encode_frame(*good[0], tags[0]), bytes(bad), encode_frame(*good[1], tags[2]),
                over, encode_frame(*good[2], tags[4]), encode_frame(*good[3], tags[5])]
    responses, counts = _link_session(config, requests, seed=SEED + 20)
    want = [(good[0][0] | 0x80, good[0][1][::-1]), (OP_ERROR, bytes([ERR_CRC, 0x33])),
            (good[1][0] | 0x80, good[1][1][::-1]), (OP_ERROR, bytes([ERR_LENGTH, 0x44])),
            (good[2][0] | 0x80, good[2][1][::-1]), (good[3][0] | 0x80, good[3][1][::-1])]
    assert responses == [(op, p, t) for (op, p), t in zip(want, tags)]
    assert counts == {"bytes_in": sum(map(len, requests)),
                      "bytes_out": sum(len(encode_frame(op, p)) for op, p in want),
                      "frames": 4, "frame_errors": 2}
