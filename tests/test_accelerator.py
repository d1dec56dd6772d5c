"""The whole accelerator on the simulated board, through the host driver.

A small random network exercises every layer kind the controller sequences
(dense, level 1 + 2, level 1 only, level 2 only, stride 2, residual, pool,
classifier); every logit is compared with the golden model. The link is fed
malformed frames and random bytes; each gets its error response, nothing
changes state, and the device still computes bit-exactly afterwards.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import time

import pytest
import torch

from gen.compiler import compile_network
from gen.golden import golden_forward
from gen.integer import bitlen, conv2d_int, int_range, pool_multiplier, w2_shift
from gen.network import LayerSpec, QuantizedNetwork
from gen.program import read_program
from gen.contract import ERR_ABORTED, REQUESTS
from host.driver import DeviceError, Driver, DriverError, RunError
from host.image import ImageError, build_image
from host.protocol import (ERR_ADDRESS, ERR_ARGUMENT, ERR_CRC, ERR_LENGTH, ERR_OPCODE,
                           ERR_STATE, ERR_TIMEOUT, OP_ERROR, OP_IDENTIFY, OP_LOAD_ACT, OP_READ, OP_READ_ACT, OP_RUN,
                           OP_STATUS, OP_WRITE, REGION_BASES, REGION_CONSTS, REGION_LOG, REGION_PROGRAM, REGION_STREAM, LOG_COUNTERS, SYNC, TAGS, FrameDecoder,
                           crc16, encode_frame)
from host.transport import SerialTransport
from sim.board import SimulatedBoard
from sim.runner import simulator_available

LINK_TIMEOUT = 4000


def _codes(gen, shape, bits):
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64)


def random_network(seed: int = 0, plain: bool = False, w_bits: int = 8) -> QuantizedNetwork:
    """Random integer network with calibrated shifts (outputs neither all 0 nor saturated):
    every layer kind, or with ``plain`` conv layers without level 2 or a residual; PE
    weights of ``w_bits``."""
    g = torch.Generator().manual_seed(seed)
    net = QuantizedNetwork(arch="test", input_shape=(2, 8, 8), input_scale=1.0, num_classes=5,
                           a_bits=8, w_bits=w_bits, m_bits=16, qb=3, qu=6, qv=3, qd=7, decode="odd")
    specs = [  # name, ci, co, k, stride, pad, bi, bo, l1, l2, src, dst, res, relu
        ("dense", 2, 6, 3, 1, 1, 0, 6, False, False, 0, 1, None, True),
        ("both_s2", 6, 8, 3, 2, 1, 2, 4, True, True, 1, 2, None, True),
        ("l1_only", 8, 8, 3, 1, 1, 2, 8, True, False, 2, 3, None, True),
        ("l2_only_res", 8, 8, 3, 1, 1, 0, 4, False, True, 3, 4, 2, True),
        ("pool", 8, 8, 1, 1, 0, 0, 0, False, False, 4, 5, None, False),
        ("classifier", 8, 5, 1, 1, 0, 0, 5, False, False, 5, 6, None, False),
    ]
    if plain:
        specs = [
            ("dense", 2, 6, 3, 1, 1, 0, 6, False, False, 0, 1, None, True),
            ("l1_s2", 6, 8, 3, 2, 1, 2, 8, True, False, 1, 2, None, True),
            ("l1_only", 8, 8, 3, 1, 1, 2, 8, True, False, 2, 0, None, True),
            ("classifier", 8, 5, 1, 1, 0, 0, 5, False, False, 0, 1, None, False),
        ]
    bufs = {0: torch.randint(-100, 100, (1, 2, 8, 8), generator=g)}
    h = 8
    for name, ci, co, k, s, p, bi, bo, l1, l2, src, dst, res, relu in specs:
        x = bufs[src]
        h = x.shape[2]
        if name == "pool":
            m, shift = pool_multiplier(h * h, net.m_bits)
            layer = LayerSpec(name=name, op="pool", ci=ci, co=ci, h=h, w=h, src=src, dst=dst,
                              mult=torch.full((ci,), m), bias=torch.zeros(ci, dtype=torch.int64),
                              shift=shift)
        else:
            kk = k * k
            dense = not (l1 or l2)
            b = _codes(g, (bo, bi, kk) if l1 else (bo, ci, kk), net.qd if dense else net.qb)
            layer = LayerSpec(name=name, op="conv", ci=ci, co=co, h=h, w=h, k=k, stride=s, pad=p,
                              bi=bi if l1 else 0, bo=bo, src=src, dst=dst, res=res, relu=relu, b=b,
                              u=_codes(g, (bo, ci, bi), net.qu) if l1 else None,
                              v=_codes(g, (co, bo), net.qv) if l2 else None)
            layer.w_shift = w2_shift(layer.weights_w2(net), net.w_bits)
            acc = conv2d_int(x, layer.weights_pe(net), s, p)
            layer.mult = torch.randint(1 << 12, 1 << 14, (co,), generator=g)
            peak = int((acc * layer.mult.view(1, -1, 1, 1)).abs().max())
            layer.shift = max(1, bitlen(peak) - (net.a_bits - 1))
            layer.bias = torch.randint(-(1 << layer.shift), 1 << layer.shift, (co,), generator=g)
            if res is not None:
                layer.m_res = 1 << min(layer.shift - 1, net.m_bits - 2)
        net.layers.append(layer)
        bufs[dst] = _golden_layer(net, layer, bufs)
    net.validate("random network")
    return net


def _golden_layer(net, layer, bufs):
    from gen.golden import golden_layer

    return golden_layer(net, layer, bufs[layer.src], bufs[layer.res] if layer.res is not None else None)


def _build(rows=4, cols=4, gen_lanes=4, plain=False, **overrides):
    result = compile_network(random_network(seed=1, plain=plain), rows=rows, cols=cols,
                             gen_lanes=gen_lanes, link_timeout=LINK_TIMEOUT, **overrides)
    return result.config, read_program(result.program, config=result.config)


@pytest.fixture(scope="module")
def build():
    """Every layer's codes resident in the base store."""
    return _build()


@pytest.fixture(scope="module")
def streamed_build():
    """A base store of 128 bytes: the first layer resident, the others streamed."""
    return _build(base_store_budget=128)


def _images(program, n, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = int_range(program.a_bits)
    return torch.randint(lo, hi + 1, (n, *program.input_shape), generator=g)


def _check_images(driver, program, n, seed):
    net = program.network()
    x = _images(program, n, seed)
    golden = golden_forward(net, x)
    assert golden.abs().sum() > 0
    for i in range(n):
        assert torch.equal(driver.infer(x[i]), golden[i]), f"image {i} differs from the golden model"


def _raw(driver, frame: bytes, quiet: float = 0.3):
    """Send raw bytes; return every frame that comes back before the line goes quiet."""
    driver.transport.write(frame)
    dec = FrameDecoder()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        chunk = driver.transport.read(4096, quiet)
        if not chunk and dec.frames:
            break
        dec.feed(chunk)
    return dec.frames


def _expect_error(driver, frame: bytes, code: int):
    frames = _raw(driver, frame)
    assert [(f.op, f.payload[0]) for f in frames] == [(OP_ERROR, code)], frames


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_board_verilator_bit_exact_counters_and_faults(streamed_build):
    config, program = streamed_build
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            image = drv.load_program(config, program)
            assert image.bases and len(image.streamed) >= 3
            assert drv.read(REGION_BASES, 0, len(image.bases)) == image.bases
            _check_images(drv, program, 3, seed=11)
            c = drv.counters()
            net = program.network()
            # Every conv layer's codes reach the generation unit once per image, from
            # the base store or the stream; every MAC is counted.
            assert c["code_bytes"] == len(image.bases) + image.streamed_bytes
            assert c["macs"] == sum(layer.macs for layer in net.layers)
            assert 0 < c["engine_busy"] <= c["cycles"] and c["mac_cycles"] <= c["engine_busy"]
            # The layer log splits the last run's counters by layer.
            log = drv.layer_log()
            assert [e["macs"] for e in log] == [layer.macs for layer in net.layers]
            for name in LOG_COUNTERS:
                assert sum(e[name] for e in log) <= c[name], name
            assert sum(e["code_bytes"] for e in log) == c["code_bytes"]
            assert log[-1]["end"] <= c["cycles"] and all(e["cycles"] > 0 for e in log)
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_LOG, 0) + b"\x00"),
                          ERR_ADDRESS)

            # Malformed frames: one error response each, no state change.
            bad_crc = bytearray(encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES, 0) + b"\xAA" * 8))
            bad_crc[-1] ^= 0x5A
            _expect_error(drv, bytes(bad_crc), ERR_CRC)
            assert drv.read(REGION_BASES, 0, 8) == image.bases[:8]
            # A frame whose length is above max_payload is read to its declared end and
            # refused: a valid WRITE hidden in its payload is not executed. A header
            # whose declared rest never comes is refused after a gap of link_timeout.
            hidden = encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES, 0)
                                  + bytes(b ^ 0xFF for b in image.bases[:16]))
            n = config.max_payload + 1
            body = struct.pack("<BHB", OP_WRITE, n, 0) + hidden + bytes(n - len(hidden))
            _expect_error(drv, bytes([SYNC]) + body + struct.pack(">H", crc16(body)), ERR_LENGTH)
            assert drv.read(REGION_BASES, 0, len(image.bases)) == image.bases
            _expect_error(drv, bytes([SYNC, OP_STATUS]) + struct.pack("<HB", 0xFFFF, 0), ERR_LENGTH)
            _expect_error(drv, encode_frame(0x42), ERR_OPCODE)
            _expect_error(drv, encode_frame(OP_STATUS, b"\x00"), ERR_LENGTH)
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", 7, 0) + b"\x00"), ERR_ADDRESS)
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES,
                                                                  config.base_store_bytes - 2) + b"\x00" * 4),
                          ERR_ADDRESS)
            _expect_error(drv, encode_frame(OP_READ, struct.pack("<BIH", REGION_BASES, 0, 0)), ERR_ARGUMENT)
            _expect_error(drv, encode_frame(OP_READ, struct.pack("<BIH", REGION_STREAM, 0, 1)), ERR_ADDRESS)
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_STREAM, 4) + b"\x00"),
                          ERR_ADDRESS)
            # Streamed codes with no run to take them would wait forever: refused.
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_STREAM, 0) + b"\x00"),
                          ERR_STATE)
            _expect_error(drv, encode_frame(OP_RUN, struct.pack("<H", 0)), ERR_ARGUMENT)
            _expect_error(drv, encode_frame(OP_LOAD_ACT, struct.pack("<BHI", config.act_buffers, 1, 1) + b"\x00"),
                          ERR_ADDRESS)
            _expect_error(drv, encode_frame(OP_LOAD_ACT, struct.pack("<BHI", 0, 2, 4) + b"\x00" * 7),
                          ERR_LENGTH)
            # A truncated frame is dropped after the link timeout.
            _expect_error(drv, encode_frame(OP_IDENTIFY)[:3], ERR_TIMEOUT)
            with pytest.raises(DeviceError, match="READ: address out of range"):
                drv.read(REGION_BASES, config.base_store_bytes, 1)

            # A late answer (to a request the host gave up on) is told from the awaited
            # one by its tag, and dropped.
            stale = drv.stale
            drv.transport.write(encode_frame(OP_STATUS, b"", (drv.tag + TAGS // 2) % TAGS))
            assert drv.identify().config_digest == config.digest
            assert drv.stale == stale + 1
            # A run stopped by ABORT leaves no result: READ_ACT is refused and the driver
            # raises a run error (the run waits for streamed codes that never come).
            net = program.network()
            first, last = net.layers[0], net.layers[-1]
            drv.load_activations(first.src, _images(program, 1, seed=17)[0])
            drv.request(OP_RUN, REQUESTS[OP_RUN].pack_args(image.n_layers))
            assert drv.status().name == "running"
            drv.abort()
            st = drv.status()
            assert (st.name, st.error) == ("error", ERR_ABORTED)
            with pytest.raises(RunError, match="no result to read: .*aborted"):
                drv.read_activations(last.dst, last.out_channels, last.ho * last.wo)

            # Random bytes: whatever comes back is error frames only.
            rng = random.Random(5)
            junk = bytes(rng.randrange(256) for _ in range(300))
            frames = _raw(drv, junk, quiet=1.0)
            assert all(f.op == OP_ERROR for f in frames)
            drv.resync()
            assert drv.identify().config_digest == config.digest
            assert drv.read(REGION_BASES, 0, len(image.bases)) == image.bases
            _check_images(drv, program, 2, seed=12)
            assert drv.counters()["frame_errors"] >= 3


@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog not installed")
def test_board_icarus_bit_exact(build):
    config, program = build
    with SimulatedBoard(config, "icarus") as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=60)
            drv.load_program(config, program)
            _check_images(drv, program, 1, seed=13)


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_board_compact_narrow_counters_without_layer_log():
    """A small-device build: 2 x 2 array, 16-bit counters, no layer log, compact."""
    bits = 16
    config, program = _build(rows=2, cols=2, gen_lanes=2, counter_bits=bits, layer_log=False,
                             compact=True)
    assert config.counter_bits == bits and not config.layer_log and config.compact
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            assert drv.identify().config_digest == config.digest
            image = drv.load_program(config, program)
            # The byte-wide program memory reads back what was written, at any offset.
            rb = drv.identify().record_bytes
            assert drv.read(REGION_PROGRAM, 0, len(image.records)) == image.records
            assert drv.read(REGION_PROGRAM, rb + 3, 5) == image.records[rb + 3:rb + 8]
            cb = drv.identify().const_bytes
            assert drv.read(REGION_CONSTS, cb + 3, 7) == image.consts[cb + 3:cb + 10]
            _expect_error(drv, encode_frame(OP_LOAD_ACT, struct.pack("<BHI", 0, 2, 4) + b"\x00" * 7),
                          ERR_LENGTH)
            # Its address arithmetic is as wide as the largest region: an address, count or
            # pixel count whose low bits are in range is refused for its high bits.
            top = 1 << max(config.base_store_bytes, config.const_depth * drv.identify().const_bytes,
                           config.max_layers * rb).bit_length()
            for region, addr, count in ((REGION_BASES, top, 1), (REGION_BASES, 1 << 31, 1),
                                        (REGION_PROGRAM, top + rb, 1), (REGION_BASES, 0, top + 1)):
                _expect_error(drv, encode_frame(OP_READ, struct.pack("<BIH", region, addr, count)),
                              ERR_ADDRESS)
            _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES, top) + b"\x00"),
                          ERR_ADDRESS)
            pix = 1 << (config.max_h * config.max_w).bit_length()
            for pixels in (pix + 1, (1 << 31) + 1):
                _expect_error(drv, encode_frame(OP_READ_ACT, struct.pack("<BHI", 0, 1, pixels)),
                              ERR_ARGUMENT)
            _check_images(drv, program, 2, seed=14)
            c = drv.counters()
            net = program.network()
            wrap = (1 << bits) - 1
            assert all(v <= wrap for v in c.values()), c
            # The counters count what the host knows exactly, modulo their width.
            assert c["macs"] == sum(layer.macs for layer in net.layers) & wrap
            assert c["code_bytes"] == len(image.bases) & wrap
            assert c["bytes_in"] == tr.bytes_sent & wrap
            assert 0 < c["engine_busy"] <= c["cycles"]
            # No log: its region is refused like any unknown one, and the driver says why.
            _expect_error(drv, encode_frame(OP_READ, struct.pack("<BIH", REGION_LOG, 0, 8)),
                          ERR_ADDRESS)
            with pytest.raises(DriverError, match="no layer log.*layer_log = false"):
                drv.layer_log()
            _check_images(drv, program, 1, seed=15)


@pytest.mark.parametrize("budget", [None, 128])
def test_board_trimmed_compact_build_runs_a_network_without_those_features(budget):
    """``--trim`` on a network with neither level 2, residuals nor pooling: the build
    leaves all three out (its generation unit is the serial one) and still runs it bit
    for bit, with its codes resident or (a base store of 128 bytes) streamed."""
    config, program = _build(rows=2, cols=2, gen_lanes=1, plain=True, counter_bits=16,
                             layer_log=False, compact=True, trim=True,
                             **({"base_store_budget": budget} if budget else {}))
    assert (config.level2, config.residual, config.pool) == (False, False, False)
    # Code streaming stays only where the base store does not hold every layer's codes.
    assert config.stream == bool(budget)
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            assert drv.identify().config_digest == config.digest
            image = drv.load_program(config, program)
            assert bool(image.streamed) == bool(budget)
            if not config.stream:
                # No stream region: refused by address (with one, by state: no run).
                _expect_error(drv, encode_frame(OP_WRITE, struct.pack("<BI", REGION_STREAM, 0)
                                                + b"\x00"), ERR_ADDRESS)
            _check_images(drv, program, 3, seed=16)


def test_device_image_without_code_streaming_needs_every_layer_resident(streamed_build):
    config, program = streamed_build
    config = dataclasses.replace(config, stream=False)
    with pytest.raises(ImageError,
                       match=r"layer '[^']+': its \d+ code bytes.*base store.*128 bytes.*stream = false"):
        build_image(program, config)


def test_device_image_fits_the_derived_config(build, streamed_build):
    config, program = build
    image = build_image(program, config)
    assert len(image.bases) <= config.base_store_bytes and not image.streamed
    config, program = streamed_build
    image = build_image(program, config)
    assert config.base_store_bytes == 128 and len(image.bases) <= 128
    assert [i for i, _ in image.streamed] == [1, 2, 3, 5]
