"""Soak: images through the simulated board while the link and the board misbehave.

Each image is three driver steps: ``load`` (LOAD_ACT), ``run`` (RUN and STATUS
polls, plus streamed codes) and ``read`` (READ_ACT). Before a step the soak may
inject one fault into it:

* a link fault (:mod:`host.faults`): one byte of the step's request dropped or
  one bit flipped (``drop_tx``, ``flip_tx``), or the same on its response
  (``drop_rx``, ``flip_rx``);
* ``reset``: the board's reset pressed in the middle of the step: part way
  through the LOAD_ACT frame, a random number of cycles into the run, or part
  way through the READ_ACT response.

A faulted step must fail with a driver error: the fault is then *reported*. The
soak recovers the link (:meth:`host.driver.Driver.recover`), reads the program
back (:meth:`host.driver.Driver.verify_image`), reloads it if it was damaged and
computes the image again. Every computed image is compared with the golden
model. The outcome counts ``computed`` (bit-exact), ``silently_wrong``
(computed but different from the golden model) and ``absorbed`` (a fault fired
and the step still succeeded); the last two must be 0.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter

import torch

from gen.config import AcceleratorConfig
from gen.program import Program
from host.driver import Driver, DriverError
from host.faults import FAULT_KINDS, FaultyTransport
from host.protocol import (CRC_BYTES, ERR_ADDRESS, ERR_CRC, ERR_LENGTH, ERR_OPCODE, ERR_STATE,
                           ERR_TIMEOUT, HEADER_BYTES, OP_ERROR, OP_IDENTIFY, OP_READ, OP_STATUS,
                           OP_WRITE, REGION_BASES, REGION_CONSTS, REGION_PROGRAM, REGION_STREAM,
                           RESPONSE, SYNC, FrameDecoder, crc16, encode_frame, identity_bytes)
from host.transport import Transport

from .board import SimulatedBoard

__all__ = ["PHASES", "KINDS", "FRAME_KINDS", "ModelMismatch", "soak", "frame_fuzz"]

PHASES = ("load", "run", "read")
KINDS = FAULT_KINDS + ("reset",)
MAX_ATTEMPTS = 3


def soak(board: SimulatedBoard, transport: Transport, config: AcceleratorConfig,
         program: Program, x_int: torch.Tensor, golden: torch.Tensor, *, images: int, fault_rate: float = 0.2, seed: int = 0,
         every_kind: bool = False, timeout: float = 3.0, run_timeout: float = 120.0,
         progress: bool = False) -> dict:
    """Run ``images`` images (cycling through ``x_int`` ``[N, C, H, W]``, expected
    outputs ``golden`` ``[N, classes]``) with faults in a ``fault_rate`` share of them,
    over ``transport`` (the board's link, connected).

    ``every_kind`` walks through every (kind, phase) pair in turn instead of drawing
    them at random, so a short soak covers them all. Returns the outcome counts and
    one row per fault.
    """
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"fault_rate {fault_rate}: accepted 0..1")
    if images < 1:
        raise ValueError(f"images {images}: accepted a count >= 1")
    rng = random.Random(seed)
    wire = FaultyTransport(transport)
    combos = [(k, p) for k in KINDS for p in PHASES]
    rng.shuffle(combos)
    net = program.network()
    first, last = net.layers[0], net.layers[-1]
    out_pixels = last.ho * last.wo
    drv = Driver(wire, timeout=timeout)
    drv.load_program(config, program)
    ab = drv.identity.act_bytes
    in_elems = int(x_int[0].numel())
    request = {"load": HEADER_BYTES + 7 + in_elems * ab + CRC_BYTES,
               "run": HEADER_BYTES + 2 + CRC_BYTES,
               "read": HEADER_BYTES + 7 + CRC_BYTES}
    response = {"load": HEADER_BYTES + CRC_BYTES, "run": HEADER_BYTES + CRC_BYTES,
                "read": HEADER_BYTES + last.out_channels * out_pixels * ab + CRC_BYTES}
    run_cycles = None

    counts = Counter()
    errors = Counter()
    faults = []
    resets_seen = board.resets()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images, desc="soak", unit="img", leave=False)
    t0 = time.monotonic()
    for i in range(images):
        j = i % x_int.shape[0]
        fault = None
        # The first image runs clean: it measures the cycles a run takes.
        if i > 0 and rng.random() < fault_rate:
            kind, phase = combos[counts["faults"] % len(combos)] if every_kind else (
                rng.choice(KINDS), rng.choice(PHASES))
            fault = {"image": i, "kind": kind, "phase": phase}
            counts["faults"] += 1
        for attempt in range(MAX_ATTEMPTS):
            armed = fault if attempt == 0 else None
            step = None
            try:
                for step in PHASES:
                    if armed and armed["phase"] == step:
                        _arm(board, wire, rng, armed, request[step], response[step], run_cycles)
                    if step == "load":
                        drv.load_activations(first.src, x_int[j])
                    elif step == "run":
                        drv.run(timeout=run_timeout)
                    else:
                        out = drv.read_activations(last.dst, last.out_channels, out_pixels)
            except DriverError as e:
                errors[type(e).__name__] += 1
                wire.disarm()
                if armed:
                    armed.update(outcome="reported", error=f"{type(e).__name__}: {e}",
                                 failed_step=step)
                else:
                    counts["unexpected_failures"] += 1
                    faults.append({"image": i, "kind": None, "phase": step, "outcome": "failed",
                                   "error": f"{type(e).__name__}: {e}"})
                drv.recover()
                if armed and armed["kind"] == "reset":
                    armed["fired"] = board.resets() > resets_seen
                    resets_seen = board.resets()
                    if not armed["fired"]:
                        board.disarm()
                damaged = drv.verify_image()
                if damaged:
                    counts["program_reloads"] += 1
                    if armed:
                        armed["damaged"] = damaged
                    drv.load_program(config, program)
                continue
            # The attempt went through.
            if armed:
                if armed["kind"] == "reset":
                    fired = board.resets() > resets_seen
                    if not fired:
                        board.disarm()
                else:
                    fired = armed.pop("_fault").fired
                    wire.disarm()
                resets_seen = board.resets()
                armed["outcome"] = "absorbed" if fired else "not fired"
                counts["absorbed" if fired else "not_fired"] += 1
            got = out.reshape(-1)
            if torch.equal(got, golden[j]):
                counts["computed"] += 1
            else:
                counts["silently_wrong"] += 1
                faults.append({"image": i, "kind": None, "phase": None, "outcome": "silently wrong",
                               "differing": int((got != golden[j]).sum())})
            if run_cycles is None:
                run_cycles = drv.counters()["cycles"]
            break
        else:
            counts["gave_up"] += 1
        if fault:
            fault.pop("_fault", None)
            if fault.get("outcome") == "reported":
                counts["reported"] += 1
            faults.append(fault)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    wall = time.monotonic() - t0
    by_kind = Counter(f"{f['kind']}/{f['phase']}" for f in faults if f.get("kind"))
    return {
        "images": images,
        "computed_bit_exact": counts["computed"],
        "silently_wrong": counts["silently_wrong"],
        "faults_injected": counts["faults"],
        "faults_reported": counts["reported"],
        "faults_absorbed": counts["absorbed"],
        "faults_not_fired": counts["not_fired"],
        "unexpected_failures": counts["unexpected_failures"],
        "images_given_up": counts["gave_up"],
        "program_reloads": counts["program_reloads"],
        "resets_fired": board.resets(),
        "errors": dict(errors),
        "faults_by_kind": dict(sorted(by_kind.items())),
        "cycles_per_run": run_cycles,
        "wall_seconds": wall,
        "faults": faults,
    }


def _arm(board, wire, rng, fault, req_len, resp_len, run_cycles):
    """Arm ``fault`` for the step about to start: its request is ``req_len`` bytes,
    its first response ``resp_len``."""
    kind, phase = fault["kind"], fault["phase"]
    if kind != "reset":
        n = req_len if kind.endswith("_tx") else resp_len
        fault["byte"] = rng.randrange(n)
        fault["bit"] = rng.randrange(8)
        fault["_fault"] = wire.arm(kind, fault["byte"], fault["bit"])
    elif phase == "load":
        # Part way through the frame, or right after its last byte (before its check).
        fault["after_rx"] = rng.randrange(1, req_len + 1)
        board.reset_after(rx=fault["after_rx"])
    elif phase == "run":
        fault["after_cycles"] = rng.randrange(max(1, int(0.9 * (run_cycles or 1000))))
        board.reset_after(rx=req_len, cycles=fault["after_cycles"])
    else:
        fault["after_tx"] = rng.randrange(resp_len)
        board.reset_after(rx=req_len, tx=fault["after_tx"])


# ---- random frame sequences against a model of the device ---------------------------

class ModelMismatch(RuntimeError):
    """The device answered a frame otherwise than its model says it must."""


def _expect(ok: bool, what) -> None:
    if not ok:
        raise ModelMismatch(str(what))


TRUNCATED_MAX_TIMEOUT = 100_000
FRAME_KINDS = ("write", "read", "identify", "status", "counters", "bad_crc", "bad_length",
               "hidden_frame", "bad_opcode", "bad_address", "truncated", "noise", "stream_idle", "reset", "image")


def frame_fuzz(board: SimulatedBoard, transport: Transport, config: AcceleratorConfig,
               program: Program, x_int: torch.Tensor, golden: torch.Tensor, *, frames: int, seed: int = 0,
               timeout: float = 5.0, truncated_wait: float = 60.0,
               kinds: tuple[str, ...] | None = None, progress: bool = False) -> dict:
    """Send ``frames`` random requests: valid commands, corrupted frames, bytes that
    are not frames, board resets and whole images, and hold every answer against a
    model of the device.

    The model knows the memories (the loaded program, plus random writes to the
    parts of the base store and constants the program leaves unused), which error
    each bad frame must get, how many frames the link refused and how many bytes
    it took since the last reset. A run must give the golden outputs: no bad frame
    may have changed the program. A frame refused for its length is sent whole (its
    declared payload and CRC): with a valid WRITE hidden in that payload
    (``hidden_frame``: 16 bytes to the base store's address 0 that differ from what
    it holds), which must not be executed. A frame cut short is answered only after the
    config's ``link_timeout`` cycles: ``truncated_wait`` more seconds are allowed
    for it. By default ``kinds`` leaves truncated frames out when ``link_timeout``
    exceeds :data:`TRUNCATED_MAX_TIMEOUT` cycles (a simulator takes minutes to
    get there); the report lists the kinds left out. Returns counts per kind;
    raises :class:`ModelMismatch`
    on the first answer that differs from the model.
    """
    rng = random.Random(seed)
    if kinds is None:
        kinds = tuple(k for k in FRAME_KINDS
                      if k != "truncated" or config.link_timeout <= TRUNCATED_MAX_TIMEOUT)
    unknown = set(kinds) - set(FRAME_KINDS)
    if unknown or not kinds:
        raise ValueError(f"frame kinds {sorted(unknown) or '(none)'}: accepted {', '.join(FRAME_KINDS)}")
    net = program.network()
    first, last = net.layers[0], net.layers[-1]
    tr = transport
    drv = Driver(tr, timeout=timeout)
    image = drv.load_program(config, program)
    ident = drv.identity
    sizes = {REGION_PROGRAM: config.max_layers * ident.record_bytes,
             REGION_BASES: config.base_store_bytes,
             REGION_CONSTS: config.const_depth * ident.const_bytes}
    words = {REGION_PROGRAM: ident.record_bytes, REGION_BASES: 1, REGION_CONSTS: ident.const_bytes}
    _expect(drv.verify_image() == [], "the program did not load")
    mem = {region: bytearray(drv.read(region, 0, size)) for region, size in sizes.items()}
    # Random writes go where the program does not look.
    scratch = {REGION_BASES: len(image.bases),
               REGION_CONSTS: -(-len(image.consts) // words[REGION_CONSTS]) * words[REGION_CONSTS]}
    scratch = {r: lo for r, lo in scratch.items() if sizes[r] - lo >= words[r]}
    c = drv.counters()
    model = {"frame_errors": c["frame_errors"], "bytes_in": c["bytes_in"]}
    base_sent = tr.bytes_sent
    counts = Counter()

    def exchange(data: bytes, expect_answer: bool = True, wait: float = timeout):
        """Raw bytes out; the one frame that comes back (None if none is due)."""
        tr.write(data)
        dec = FrameDecoder()
        deadline = time.monotonic() + (wait if expect_answer else 0.2)
        while time.monotonic() < deadline and not dec.frames:
            dec.feed(tr.read(4096, 0.05))
        if not expect_answer:
            _expect(not dec.frames, f"bytes that are no frame were answered: {dec.frames}")
            return None
        _expect(len(dec.frames) == 1, f"expected one answer to {data[:8].hex()}..., got {dec.frames}")
        return dec.frames[0]

    def expect_error(data: bytes, code: int, link_refused: bool, wait: float = timeout):
        f = exchange(data, wait=wait)
        _expect(f.op == OP_ERROR and f.payload[0] == code,
                f"{data[:8].hex()}...: expected error {code}, got op 0x{f.op:02x} {f.payload.hex()}")
        model["frame_errors"] += link_refused

    def some_frame() -> bytes:
        region = rng.choice(list(sizes))
        return encode_frame(OP_WRITE, struct.pack("<BI", region, 0) + bytes(words[region]))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=frames, desc="frames", unit="frame", leave=False)
    for _ in range(frames):
        kind = rng.choice(kinds)
        counts[kind] += 1
        if kind == "write" and scratch:
            region = rng.choice(list(scratch))
            w = words[region]
            lo = scratch[region]
            n = w * rng.randint(1, max(1, min(ident.max_payload - 5, sizes[region] - lo) // w))
            addr = lo + w * rng.randrange((sizes[region] - lo - n) // w + 1)
            data = bytes(rng.randrange(256) for _ in range(n))
            f = exchange(encode_frame(OP_WRITE, struct.pack("<BI", region, addr) + data))
            _expect(f.op == OP_WRITE | RESPONSE, f"WRITE answered with {f}")
            mem[region][addr:addr + n] = data
        elif kind == "read":
            region = rng.choice(list(sizes))
            n = rng.randint(1, min(64, sizes[region]))
            addr = rng.randrange(sizes[region] - n + 1)
            f = exchange(encode_frame(OP_READ, struct.pack("<BIH", region, addr, n)))
            _expect(f.op == OP_READ | RESPONSE and f.payload == bytes(mem[region][addr:addr + n]),
                    f"READ of {n} bytes at {addr} of region {region}: device and model differ")
        elif kind == "identify":
            f = exchange(encode_frame(OP_IDENTIFY))
            _expect(f.payload == identity_bytes(config), f"IDENTIFY answered {f}")
        elif kind == "status":
            f = exchange(encode_frame(OP_STATUS))
            _expect(f.op == OP_STATUS | RESPONSE and len(f.payload) == 4 and f.payload[0] != 1,
                    f"STATUS answered {f} with no run going on")
        elif kind == "counters":
            c = drv.counters()
            # (the counters wrap at their width)
            wrap = (1 << config.counter_bits) - 1
            want_errors = model["frame_errors"] & wrap
            want_in = (model["bytes_in"] + tr.bytes_sent - base_sent) & wrap
            _expect(c["frame_errors"] == want_errors,
                    f"frames refused: device {c['frame_errors']}, model {want_errors}")
            _expect(c["bytes_in"] == want_in, f"bytes in: device {c['bytes_in']}, model {want_in}")
        elif kind == "bad_crc":
            frame = bytearray(some_frame())
            # Any bit after the length field: the frame is whole, only its CRC fails.
            i = rng.choice([1] + list(range(HEADER_BYTES, len(frame))))
            frame[i] ^= 1 << rng.randrange(8)
            expect_error(bytes(frame), ERR_CRC, True)
        elif kind in ("bad_length", "hidden_frame"):
            # The whole declared frame: the link reads it to its end and refuses it.
            n = rng.randint(ident.max_payload + 1, ident.max_payload + 64)
            flipped = bytes(b ^ 0xFF for b in mem[REGION_BASES][:16])
            inner = (encode_frame(OP_WRITE, struct.pack("<BI", REGION_BASES, 0) + flipped)
                     if kind == "hidden_frame" else b"")
            body = (struct.pack("<BHB", OP_WRITE, n, rng.randrange(256)) + inner
                    + bytes(rng.randrange(256) for _ in range(n - len(inner))))
            expect_error(bytes([SYNC]) + body + struct.pack(">H", crc16(body)), ERR_LENGTH, True)
            if kind == "hidden_frame":
                got = drv.read(REGION_BASES, 0, 16)
                _expect(got == bytes(mem[REGION_BASES][:16]),
                        "a WRITE hidden in a frame refused for its length changed the base store")
        elif kind == "bad_opcode":
            op = rng.choice([0x00, 0x0A, 0x42, 0x7F, 0x81, 0xFE])
            expect_error(encode_frame(op, bytes(rng.randrange(4))), ERR_OPCODE, False)
        elif kind == "bad_address":
            region = rng.choice(list(sizes))
            expect_error(encode_frame(OP_WRITE, struct.pack("<BI", region, sizes[region])
                                      + bytes(words[region])), ERR_ADDRESS, False)
        elif kind == "truncated":
            frame = some_frame()
            # Answered after link_timeout cycles of silence: give the simulator time.
            expect_error(frame[:rng.randrange(1, len(frame))], ERR_TIMEOUT, True,
                         wait=timeout + truncated_wait)
        elif kind == "noise":
            noise = bytes(rng.choice([b for b in range(256) if b != SYNC])
                          for _ in range(rng.randint(1, 64)))
            exchange(noise, expect_answer=False)
        elif kind == "stream_idle":
            expect_error(encode_frame(OP_WRITE, struct.pack("<BI", REGION_STREAM, 0) + b"\0"),
                         ERR_STATE, False)
        elif kind == "reset":
            before = board.resets()
            board.reset_after()
            deadline = time.monotonic() + timeout
            while board.resets() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            _expect(board.resets() == before + 1, "the board reset did not fire")
            model["frame_errors"] = 0
            model["bytes_in"] = 0
            base_sent = tr.bytes_sent
            _expect(drv.status().name == "idle", "the device is not idle after a reset")
        elif kind == "image":
            j = rng.randrange(x_int.shape[0])
            drv.load_activations(first.src, x_int[j])
            drv.run()
            out = drv.read_activations(last.dst, last.out_channels, last.ho * last.wo)
            _expect(torch.equal(out.reshape(-1), golden[j]), "an image differs from the golden model")
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    c = drv.counters()
    return {"frames": frames, "by_kind": dict(sorted(counts.items())),
            "kinds_left_out": [k for k in FRAME_KINDS if k not in kinds],
            "link_frames": c["frames"], "frame_errors": c["frame_errors"]}
