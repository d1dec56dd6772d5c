"""Faults on purpose: link faults and board resets on the simulated board.

A short soak walks through every fault kind (bits, bursts, inserted, deleted and
stuck bytes, duplicated and reordered frames, resets); each must be caught (or,
where it leaves the traffic intact, get through harmlessly), and every image
computed around them must be bit-exact. A recovery that fails is retried; a
soak stopped by SIGTERM leaves its partial report. Then the board is reset once in each phase of the device's work
(program load, activation load, generation, compute, read-back) and must come
back to a clean state that computes bit-exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gen.golden import golden_forward
from host.driver import Driver, DriverError, LinkTimeout
from host.faults import FaultyTransport, burst_mask
from host.protocol import CRC_BYTES, HEADER_BYTES, OP_WRITE, REGION_BASES, encode_frame
from host.transport import SerialTransport
from mlg.cli import main
from sim.board import SimulatedBoard
from sim.runner import simulator_available
from sim.soak import CAUGHT_BY, FRAME_KINDS, KINDS, PHASES, SoakOptions, frame_fuzz, soak

from .test_accelerator import _build, _images

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not simulator_available("verilator"),
                                reason="Verilator not installed")


@pytest.fixture(scope="module")
def build():
    return _build()


@pytest.fixture
def board_and_build(build):
    """A fresh simulated board for the build, and a connection to it."""
    config, program = build
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as transport:
            yield board, transport, config, program


class _Line:
    """A transport that keeps what is written and answers reads from a script."""

    byte_seconds = 0.0

    def __init__(self, chunks=()):
        self.data = b""
        self.chunks = list(chunks)

    def write(self, d):
        self.data += d

    def read(self, n, timeout):
        return self.chunks.pop(0) if self.chunks else b""

    def close(self):
        pass


def test_faulty_transport_damages_the_chosen_byte():
    mem = _Line([b"\x10\x20\x30"])
    wire = FaultyTransport(mem)
    wire.arm("flip_tx", 5, bit=2)
    wire.write(b"\x00" * 4)
    wire.write(b"\x00" * 4)
    assert mem.data == b"\x00" * 5 + b"\x04" + b"\x00" * 2
    wire.write(b"\x00")                      # fired once only
    assert mem.data[-1] == 0 and len(wire.fired) == 1 and wire.fired[0].original == b"\x00"
    wire.arm("drop_rx", 1)
    assert wire.read(3, 0.1) == b"\x10\x30"
    with pytest.raises(ValueError, match="fault kind 'bogus'"):
        wire.arm("bogus", 0)


def test_faulty_transport_bursts_insertions_deletions_and_stuck_lines():
    rng = random.Random(5)
    for bits in (17, 40, 64):
        mask = burst_mask(bits, 3, rng)
        value = int.from_bytes(mask, "little") >> 3
        assert value.bit_length() == bits and value & 1, "the burst spans exactly its bits"
    with pytest.raises(ValueError, match="accepted 17..64 bits"):
        burst_mask(16, 0, rng)
    data = bytes(range(1, 21))

    def through(kind, at, chunks=(7, 13), **args):
        mem = _Line()
        wire = FaultyTransport(mem)
        fault = wire.arm(kind, at, **args)
        for lo, hi in zip((0,) + chunks, chunks + (len(data),)):
            wire.write(data[lo:hi])           # the fault spans the writes
        return mem.data, fault

    mask = burst_mask(30, 5, rng)
    out, f = through("burst_tx", 6, mask=mask)
    assert bytes(a ^ b for a, b in zip(out, data)) == bytes(6) + mask + bytes(20 - 6 - len(mask))
    assert f.fired and f.original == data[6:6 + len(mask)]
    out, _ = through("insert_tx", 7, data=b"\xAA\xBB")
    assert out == data[:7] + b"\xAA\xBB" + data[7:]
    out, _ = through("delete_tx", 5, length=4)
    assert out == data[:5] + data[9:]
    out, _ = through("stuck_tx", 10, length=6, value=0xFF)
    assert out == data[:10] + b"\xFF" * 6 + data[16:]
    with pytest.raises(ValueError, match="stuck at 0x00 or 0xFF"):
        FaultyTransport(_Line()).arm("stuck_rx", 0, length=3, value=0x55)


def test_faulty_transport_duplicates_and_reorders_frames():
    a, b, c = (encode_frame(OP_WRITE, bytes([i]) * 5) for i in (1, 2, 3))
    mem = _Line()
    wire = FaultyTransport(mem)
    wire.arm("dup_tx", 1)
    for f in (a, b, c):
        wire.write(f)
    assert mem.data == a + b + b + c
    mem.data = b""
    wire.arm("reorder_tx", 0)
    wire.write(a)
    assert mem.data == b""                   # held back
    wire.write(b)
    assert mem.data == b + a
    # Responses, cut into frames across reads: bytes before a SYNC pass.
    stream = b"\x00\x00" + a + b + c
    wire = FaultyTransport(_Line([stream[:5], stream[5:17], stream[17:]]))
    wire.arm("reorder_rx", 0)
    got = b"".join(wire.read(4096, 0.1) for _ in range(3))
    assert got == b"\x00\x00" + b + a + c
    wire = FaultyTransport(_Line([stream]))
    wire.arm("dup_rx", 2)
    assert wire.read(4096, 0.1) == b"\x00\x00" + a + b + c + c
    # A frame still held back when the faults end goes out late.
    mem = _Line()
    wire = FaultyTransport(mem)
    wire.arm("reorder_tx", 0)
    wire.write(a)
    wire.disarm()
    assert mem.data == a
    wire = FaultyTransport(_Line([a]))
    wire.arm("reorder_rx", 0)
    assert wire.read(4096, 0.1) == b""
    wire.disarm()
    assert wire.read(4096, 0.1) == a


def test_soak_catches_every_fault_kind(board_and_build):
    """Every kind once (each in one of the phases), on a measured link: nothing silently
    wrong, nothing lost, every fault fired and accounted for."""
    board, transport, config, program = board_and_build
    board.measure_link(transport, timeout=2.0)
    assert transport.byte_seconds > 0
    net = program.network()
    x = _images(program, 4, seed=21)
    golden = golden_forward(net, x)
    r = soak(board, transport, config, program, x, golden, images=len(KINDS) + 1,
             fault_rate=1.0, every_kind=True, seed=3, timeout=2.0)
    assert r["faults_injected"] == len(KINDS)
    assert set(r["by_kind"]) == set(KINDS)
    assert r["silently_wrong"] == 0 and r["images_lost"] == 0 and r["faults_not_fired"] == 0
    assert r["computed_bit_exact"] == len(KINDS) + 1 and r["failures_without_fault"] == 0
    for kind, v in r["by_kind"].items():
        assert v["injected"] == 1 and v["not_fired"] == 0, (kind, v)
        caught = sum(v[k] for k in CAUGHT_BY)
        # Bytes inserted before a frame are skipped as noise, and a duplicated last
        # answer leaves the image right: those may get through. Nothing else may.
        if not kind.startswith(("insert", "dup")):
            assert caught == 1, (kind, v, [f for f in r["faults"] if f.get("kind") == kind])
    assert r["faults_caught"] + r["faults_got_through"] == len(KINDS)
    # The CRC and the waits catch some of these faults each. (Since answers carry their
    # request's tag, an answer damaged into a frame of another tag is dropped and the
    # request times out: which faults the other checks catch depends on the draw.)
    assert r["caught_by"]["crc"] > 0 and r["caught_by"]["timeout"] > 0, r["caught_by"]
    assert r["by_kind"]["reorder_tx"]["timeout"] == 1 and r["by_kind"]["reorder_rx"]["timeout"] == 1


def test_soak_in_every_phase_for_the_byte_faults(board_and_build):
    """The one-byte faults and resets in each of the three phases."""
    board, transport, config, program = board_and_build
    net = program.network()
    x = _images(program, 4, seed=22)
    kinds = ("drop_tx", "flip_rx", "reset")
    r = soak(board, transport, config, program, x, golden_forward(net, x),
             images=3 * len(kinds) + 1, fault_rate=1.0, every_kind=True, kinds=kinds, seed=4,
             timeout=2.0)
    assert set(r["faults_by_kind_phase"]) == {f"{k}/{p}" for k in kinds for p in PHASES}
    assert r["faults_caught"] == 3 * len(kinds), [f for f in r["faults"] if f.get("outcome")
                                                   not in CAUGHT_BY]
    assert r["silently_wrong"] == 0 and r["images_lost"] == 0
    assert r["resets_fired"] == len(PHASES)
    assert all(f["failed_step"] == f["phase"] for f in r["faults"])


def test_a_failed_recovery_is_counted_and_retried(board_and_build, monkeypatch):
    """A LinkTimeout inside the recovery's read-back: the soak resets the board,
    recovers again and goes on; no image is lost."""
    board, transport, config, program = board_and_build
    net = program.network()
    x = _images(program, 2, seed=23)
    calls = []
    real = Driver.verify_image

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            raise LinkTimeout("no response to READ within 0.1 s (made to fail)")
        return real(self)

    monkeypatch.setattr(Driver, "verify_image", flaky)
    r = soak(board, transport, config, program, x, golden_forward(net, x), images=3,
             fault_rate=1.0, kinds=("flip_tx",), seed=5, timeout=2.0)
    assert len(calls) >= 2
    assert r["recovery_failures"] == 1 and r["board_resets_by_soak"] == 1
    assert r["errors"]["recovery: LinkTimeout"] == 1
    assert r["images_lost"] == 0 and r["computed_bit_exact"] == 3 and r["silently_wrong"] == 0


def test_an_image_is_lost_only_past_the_bound(board_and_build, monkeypatch):
    board, transport, config, program = board_and_build
    net = program.network()
    x = _images(program, 2, seed=24)
    monkeypatch.setattr(Driver, "verify_image",
                        lambda self: (_ for _ in ()).throw(LinkTimeout("made to fail")))
    r = soak(board, transport, config, program, x, golden_forward(net, x), images=2,
             fault_rate=1.0, kinds=("flip_tx",), seed=6, timeout=2.0, retries=2)
    assert r["recovery_failures"] == 2 and r["images_lost"] == 1 and r["computed_bit_exact"] == 1
    assert r["images_done"] == 2


def test_soak_options_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        SoakOptions(fault_rate=1.5, distinct=0, margin=0.5, retries=0)
    for needle in ("--fault-rate 1.5: accepted a share in [0, 1]",
                   "--distinct 0: accepted a count >= 1", "--margin 0.5: accepted a factor >= 1",
                   "--retries 0: accepted a count >= 1"):
        assert needle in str(e.value)
    # Named on the command line before the build (here: none) is even read.
    assert main(["soak", str(tmp_path / "no-build"), "--fault-rate", "1.5"]) == 2
    assert "--fault-rate 1.5: accepted a share in [0, 1]" in capsys.readouterr().err
    assert main(["soak", str(tmp_path / "no-build"), "--timeout", "0"]) == 2
    assert "--timeout 0.0: accepted seconds > 0" in capsys.readouterr().err


_SOAK_SCRIPT = """
import sys
from gen.golden import golden_forward
from hw.flow.procs import Terminated, end_on_signals
from sim.soak import SoakOptions, soak_session
from tests.test_accelerator import _build, _images

config, program = _build()
x = _images(program, 2, seed=25)
golden = golden_forward(program.network(), x)
try:
    with end_on_signals():
        soak_session(config, program, x, golden,
                     SoakOptions(images=100000, frames=0, timeout=2.0, fault_rate=0.5),
                     fast_build=True, out=sys.argv[1], log=lambda *a: print(*a, flush=True))
except Terminated as t:
    sys.exit(128 + t.signum)
"""


def test_partial_report_on_sigterm(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.Popen([sys.executable, "-c", _SOAK_SCRIPT, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()          # the board is up and its link measured
        assert "simulated board on" in line, line
        time.sleep(8)                          # images under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads(out.read_text())
    assert r["partial"] is True and r["stopped_by"] == "SIGTERM"
    assert r["stage"] in ("frames", "images") and r["byte_seconds"] > 0
    assert r["images"] == 100000 and r["images_done"] < 100000
    assert r["computed_bit_exact"] + r["silently_wrong"] + r["images_lost"] <= r["images_done"]
    assert {"by_kind", "caught_by", "faults_got_through", "frame_fuzz"} <= set(r)


def test_board_serves_connections_one_after_another(board_and_build):
    board, transport, config, program = board_and_build
    first = Driver(transport, timeout=2.0).identify()
    transport.close()
    for _ in range(2):
        with SerialTransport(board.url) as again:
            assert Driver(again, timeout=2.0).identify() == first


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


def test_what_caught_a_fault_is_named_by_its_error():
    from host.driver import DeviceError, DriverError, LinkTimeout, RunError
    from host.protocol import ERR_CRC, ERR_LENGTH, ERR_STATE, ERR_TIMEOUT, OP_WRITE
    from sim.soak import caught_by

    assert caught_by(DeviceError(ERR_CRC, OP_WRITE)) == "crc"
    assert caught_by(DeviceError(ERR_TIMEOUT, OP_WRITE)) == "timeout"
    assert caught_by(DeviceError(ERR_LENGTH, OP_WRITE)) == "check"
    assert caught_by(DeviceError(ERR_STATE, OP_WRITE)) == "check"
    assert caught_by(LinkTimeout("no response to RUN within 3.0 s")) == "timeout"
    assert caught_by(RunError("the run did not finish within 5 s")) == "timeout"
    assert caught_by(RunError("the run ended in the error state")) == "check"
    assert caught_by(DriverError("corrupt response to READ: bad CRC")) == "crc"
    assert caught_by(DriverError("response opcode 0x85 to READ, expected 0x83")) == "check"
