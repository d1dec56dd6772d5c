"""Faults on purpose: link faults and board resets on the simulated board.

A short soak walks through every fault kind in every phase of an image; each
must surface as a driver error, and every image computed around them must be
bit-exact. Then the board is reset once in each phase of the device's work
(program load, activation load, generation, compute, read-back) and must come
back to a clean state that computes bit-exactly.
"""

from __future__ import annotations

import struct

import pytest
import torch

from gen.golden import golden_forward
from host.driver import Driver, DriverError
from host.faults import FaultyTransport
from host.protocol import CRC_BYTES, HEADER_BYTES, OP_WRITE, REGION_BASES, encode_frame
from host.transport import SerialTransport
from sim.board import SimulatedBoard
from sim.runner import simulator_available
from sim.soak import FRAME_KINDS, KINDS, PHASES, frame_fuzz, soak

from .test_accelerator import _build, _images

pytestmark = pytest.mark.skipif(not simulator_available("verilator"),
                                reason="Verilator not installed")


@pytest.fixture(scope="module")
def build():
    return _build()


@pytest.fixture
def board_and_build(build):
    """A fresh simulated board (it takes one connection) for the build."""
    config, program = build
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as transport:
            yield board, transport, config, program


def test_faulty_transport_damages_the_chosen_byte():
    class Mem:
        def __init__(self):
            self.data = b""

        def write(self, d):
            self.data += d

        def read(self, n, timeout):
            return b"\x10\x20\x30"

        def close(self):
            pass

    mem = Mem()
    wire = FaultyTransport(mem)
    wire.arm("flip_tx", 5, bit=2)
    wire.write(b"\x00" * 4)
    wire.write(b"\x00" * 4)
    assert mem.data == b"\x00" * 5 + b"\x04" + b"\x00" * 2
    wire.write(b"\x00")                      # fired once only
    assert mem.data[-1] == 0 and len(wire.fired) == 1 and wire.fired[0].value == 0
    wire.arm("drop_rx", 1)
    assert wire.read(3, 0.1) == b"\x10\x30"
    with pytest.raises(ValueError, match="fault kind 'bogus'"):
        wire.arm("bogus", 0)


def test_soak_reports_every_fault_kind_in_every_phase(board_and_build):
    board, transport, config, program = board_and_build
    net = program.network()
    x = _images(program, 4, seed=21)
    golden = golden_forward(net, x)
    n_faults = len(KINDS) * len(PHASES)
    r = soak(board, transport, config, program, x, golden, images=n_faults + 1, fault_rate=1.0,
             every_kind=True, seed=3, timeout=2.0)
    assert r["faults_injected"] == n_faults
    assert set(r["faults_by_kind"]) == {f"{k}/{p}" for k in KINDS for p in PHASES}
    assert r["faults_reported"] == n_faults, [f for f in r["faults"] if f.get("outcome") != "reported"]
    assert r["silently_wrong"] == 0 and r["faults_absorbed"] == 0 and r["faults_not_fired"] == 0
    assert r["unexpected_failures"] == 0 and r["images_given_up"] == 0
    assert r["computed_bit_exact"] == n_faults + 1
    assert r["resets_fired"] == len(PHASES)
    # Each fault failed the step it was injected into.
    assert all(f["failed_step"] == f["phase"] for f in r["faults"])


def _infer_checked(drv, program, seed):
    net = program.network()
    x = _images(program, 1, seed=seed)
    assert torch.equal(drv.infer(x[0]), golden_forward(net, x)[0])


def test_reset_anywhere_returns_to_a_clean_state(board_and_build):
    board, tr, config, program = board_and_build
    drv = Driver(tr, timeout=2.0)
    image = drv.load_program(config, program)
    _infer_checked(drv, program, seed=30)
    net = program.network()
    first, last = net.layers[0], net.layers[-1]
    x = _images(program, 1, seed=31)[0]
    run_cycles = drv.counters()["cycles"]
    assert run_cycles > 1000
    fired = board.resets()

    def expect_failure(action):
        nonlocal fired
        with pytest.raises(DriverError):
            action()
        drv.recover()
        assert board.resets() == fired + 1, "the armed reset did not fire"
        fired += 1
        # A reset leaves the device idle, with its program memories as they were.
        assert drv.status().name == "idle"

    # Program load: the frame carrying the bases is cut after half its bytes, and
    # another one right after its last byte (before its CRC check).
    chunk = image.bases[:64]
    frame_len = len(encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES, 0) + chunk))
    for after in (frame_len // 2, frame_len):
        board.reset_after(rx=after)
        expect_failure(lambda: drv.write(REGION_BASES, 0, chunk))
        assert drv.verify_image() == []
    # Activation load, part way through the LOAD_ACT frame.
    board.reset_after(rx=HEADER_BYTES + 7 + 3)
    expect_failure(lambda: drv.load_activations(first.src, x))
    # Generation (the first cycles of a run) and compute (late in the run).
    for cycles in (20, run_cycles // 2, run_cycles - 200):
        drv.load_activations(first.src, x)
        board.reset_after(rx=HEADER_BYTES + 2 + CRC_BYTES, cycles=cycles)
        expect_failure(drv.run)
    # Read-back, part way through the READ_ACT response.
    drv.load_activations(first.src, x)
    drv.run()
    board.reset_after(rx=HEADER_BYTES + 7 + CRC_BYTES, tx=HEADER_BYTES + 2)
    expect_failure(lambda: drv.read_activations(last.dst, last.out_channels, last.ho * last.wo))
    # After all that the device computes bit-exactly again, and its counters and
    # status start from a clean state.
    assert drv.verify_image() == []
    _infer_checked(drv, program, seed=32)
    assert drv.status().name == "done"
    assert drv.counters()["cycles"] == run_cycles


def test_random_frame_sequence_matches_the_device_model(board_and_build):
    board, transport, config, program = board_and_build
    net = program.network()
    x = _images(program, 4, seed=41)
    r = frame_fuzz(board, transport, config, program, x, golden_forward(net, x), frames=300, seed=7,
                   timeout=3.0)
    assert set(r["by_kind"]) == set(FRAME_KINDS) and not r["kinds_left_out"]
    assert r["frames"] == 300
    # The image soak goes on over the same connection, as in mlg soak.
    r = soak(board, transport, config, program, x, golden_forward(net, x), images=3, fault_rate=0.0)
    assert r["computed_bit_exact"] == 3 and r["faults_injected"] == 0
