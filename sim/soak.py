"""Soak: images through the simulated board while the link and the board misbehave.

Each image is three driver steps: ``load`` (LOAD_ACT), ``run`` (RUN and STATUS
polls, plus streamed codes) and ``read`` (READ_ACT). Before a step the soak may
inject one fault into it:

* a link fault (:mod:`host.faults`) on the step's request (``*_tx``) or its
  first response (``*_rx``): one byte dropped or one bit flipped (``drop``,
  ``flip``), a burst error of 17 to 64 bits (``burst``), bytes inserted or
  deleted (``insert``, ``delete``), a stuck line, a run of 0x00 or 0xFF bytes
  (``stuck``), the frame duplicated (``dup``) or held back behind the next one
  (``reorder``);
* ``reset``: the board's reset pressed in the middle of the step: part way
  through the LOAD_ACT frame, a random number of cycles into the run, or part
  way through the READ_ACT response.

A fault that makes the step fail is *caught*, by what the failure says: a CRC
(the device's, ``ERR_CRC``, or the driver's on a response), another check (a
length, opcode, state or size the device or the driver refused), or a timeout
(the driver's, or the device's link timeout on a frame cut short). A fault that
fired while every step succeeded *got through*: the image is then held against
the golden model like every other, and the line is drained so that what the
fault left there is not blamed on the next image.

After a failure the soak recovers the link (:meth:`host.driver.Driver.recover`),
reads the program back (:meth:`host.driver.Driver.verify_image`), reloads it if
it was damaged and computes the image again. A recovery that fails itself is
counted, the board is reset and the program reloaded, and that is tried
``retries`` times; an image is *lost* only once ``retries`` attempts at it have
failed. The verdict: no image silently wrong, none lost.

:class:`SoakState` holds the report as it grows, so that a soak stopped part
way (an error, Ctrl-C, SIGTERM) still gives the report of what it did, marked
partial (:func:`soak_session`).
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from pathlib import Path

import torch

from gen.config import AcceleratorConfig
from gen.program import Program
from host.driver import DeviceError, Driver, DriverError, LinkTimeout, RunError
from host.faults import BURST_BITS, FAULT_KINDS, FaultyTransport, burst_mask
from host.protocol import (CRC_BYTES, ERR_ADDRESS, ERR_CRC, ERR_LENGTH, ERR_OPCODE, ERR_STATE,
                           ERR_TIMEOUT, HEADER_BYTES, OP_ERROR, OP_IDENTIFY, OP_READ, OP_STATUS,
                           OP_WRITE, REGION_BASES, REGION_CONSTS, REGION_PROGRAM, REGION_STREAM,
                           RESPONSE, SYNC, FrameDecoder, crc16, encode_frame, identity_bytes)
from host.transport import Transport

from .board import SimulatedBoard

__all__ = ["PHASES", "KINDS", "CAUGHT_BY", "FRAME_KINDS", "ModelMismatch", "SoakState",
           "SoakOptions", "soak", "frame_fuzz", "soak_session", "caught_by"]

PHASES = ("load", "run", "read")
KINDS = FAULT_KINDS + ("reset",)
# What caught a fault: a CRC, another check (length, opcode, state, size), a timeout.
CAUGHT_BY = ("crc", "check", "timeout")
OUTCOMES = CAUGHT_BY + ("got_through", "not_fired")
# Bytes an insertion adds, a deletion removes, a stuck line covers.
INSERT_BYTES = (1, 4)
DELETE_BYTES = (2, 8)
STUCK_BYTES = (8, 64)


class SoakOptions:
    """The soak's knobs, each checked with the name of its command-line option.

    ``timeout`` is the driver's wait for an answer on top of the time its bytes
    take on the link, times ``margin``; ``run_timeout`` the wait for the first
    run (it measures how long a run takes; later runs wait ``timeout + margin x``
    that); ``truncated_wait`` the extra wait for the answer to a frame cut short
    (the device's ``link_timeout`` cycles); ``retries`` the attempts at an image,
    and at a recovery, before the image is lost.
    """

    RANGES = {
        "images": ("--images", 1, None, "a count >= 1"),
        "distinct": ("--distinct", 1, None, "a count >= 1"),
        "frames": ("--frames", 0, None, "a count >= 0"),
        "fault_rate": ("--fault-rate", 0.0, 1.0, "a share in [0, 1]"),
        "timeout": ("--timeout", 0.0, None, "seconds > 0"),
        "margin": ("--margin", 1.0, None, "a factor >= 1"),
        "run_timeout": ("--run-timeout", 0.0, None, "seconds > 0"),
        "truncated_wait": ("--truncated-wait", 0.0, None, "seconds >= 0"),
        "retries": ("--retries", 1, None, "a count >= 1"),
    }
    # Bounds that are themselves excluded.
    OPEN = {"timeout", "run_timeout"}

    def __init__(self, *, images: int = 1000, distinct: int = 100, frames: int = 1000,
                 fault_rate: float = 0.2, timeout: float = 3.0, margin: float = 4.0,
                 run_timeout: float = 120.0, truncated_wait: float = 60.0, retries: int = 3,
                 seed: int = 0, every_kind: bool = False):
        self.images, self.distinct, self.frames = images, distinct, frames
        self.fault_rate, self.timeout, self.margin = fault_rate, timeout, margin
        self.run_timeout, self.truncated_wait, self.retries = run_timeout, truncated_wait, retries
        self.seed, self.every_kind = seed, every_kind
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the options, one message per option."""
        out = []
        for name, (option, lo, hi, accepted) in self.RANGES.items():
            v = getattr(self, name)
            integral = isinstance(lo, int)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            if ok and integral:
                ok = float(v).is_integer()
            if ok:
                ok = (v > lo if name in self.OPEN else v >= lo) and (hi is None or v <= hi)
            if not ok:
                out.append(f"{option} {v!r}: accepted {accepted}")
        return out

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*self.RANGES, "seed", "every_kind")}


def caught_by(error: DriverError) -> str:
    """What caught the fault behind ``error``: ``crc``, ``check`` or ``timeout``."""
    if isinstance(error, LinkTimeout):
        return "timeout"
    if isinstance(error, DeviceError):
        return {ERR_CRC: "crc", ERR_TIMEOUT: "timeout"}.get(error.code, "check")
    text = str(error)
    if isinstance(error, RunError) and "did not finish" in text:
        return "timeout"
    if "CRC" in text:
        return "crc"
    return "check"


class SoakState:
    """The report of a soak as it grows: the frame fuzz's counts, then the images'.

    :meth:`report` gives it at any moment; ``partial`` says whether the soak ran
    to its end.
    """

    def __init__(self, options: SoakOptions | None = None):
        self.options = options
        self.counts = Counter()
        self.errors = Counter()
        self.by_kind = {k: dict.fromkeys(("injected",) + OUTCOMES, 0) for k in KINDS}
        self.by_kind_phase = Counter()
        self.faults: list[dict] = []
        self.fuzz: dict | None = None
        self.fuzz_counts = Counter()
        self.stage = "start"
        self.images_requested = options.images if options else 0
        self.cycles_per_run: int | None = None
        self.run_seconds: float | None = None
        self.byte_seconds: float | None = None
        self.resets_fired = 0
        self.t0 = time.monotonic()
        self.extra: dict = {}

    def outcome(self, fault: dict, outcome: str) -> None:
        fault["outcome"] = outcome
        self.by_kind[fault["kind"]][outcome] += 1
        self.counts["got_through" if outcome == "got_through" else
                    "not_fired" if outcome == "not_fired" else "caught"] += 1

    def report(self, partial: bool = False, stopped_by: str | None = None) -> dict:
        c = self.counts
        caught = {k: sum(v[k] for v in self.by_kind.values()) for k in CAUGHT_BY}
        fuzz = self.fuzz if self.fuzz is not None else {
            "frames": sum(self.fuzz_counts.values()), "by_kind": dict(sorted(self.fuzz_counts.items())),
            "kinds_left_out": [], "partial": True}
        r = {
            "partial": partial,
            "stopped_by": stopped_by,
            "stage": self.stage,
            "images": self.images_requested,
            "images_done": c["images_done"],
            "computed_bit_exact": c["computed"],
            "silently_wrong": c["silently_wrong"],
            "images_lost": c["lost"],
            "faults_injected": c["faults"],
            "faults_caught": c["caught"],
            "caught_by": caught,
            "faults_got_through": c["got_through"],
            "faults_not_fired": c["not_fired"],
            "by_kind": {k: v for k, v in self.by_kind.items() if v["injected"]},
            "faults_by_kind_phase": dict(sorted(self.by_kind_phase.items())),
            "failures_without_fault": c["unexpected_failures"],
            "recoveries": c["recoveries"],
            "recovery_failures": c["recovery_failures"],
            "board_resets_by_soak": c["soak_resets"],
            "program_reloads": c["program_reloads"],
            "resets_fired": self.resets_fired,
            "errors": dict(self.errors),
            "cycles_per_run": self.cycles_per_run,
            "run_seconds": self.run_seconds,
            "byte_seconds": self.byte_seconds,
            "options": self.options.as_dict() if self.options else None,
            "wall_seconds": time.monotonic() - self.t0,
            "frame_fuzz": fuzz,
            "faults": self.faults,
        }
        r.update(self.extra)
        return r


def verdict(report: dict) -> bool:
    """The soak passed: it ran to its end, no image silently wrong, none lost."""
    return (not report["partial"] and report["silently_wrong"] == 0
            and report["images_lost"] == 0)


def soak(board: SimulatedBoard, transport: Transport, config: AcceleratorConfig,
         program: Program, x_int: torch.Tensor, golden: torch.Tensor, *, images: int,
         fault_rate: float = 0.2, seed: int = 0, every_kind: bool = False,
         kinds: tuple[str, ...] | None = None, timeout: float = 3.0, margin: float = 4.0,
         run_timeout: float = 120.0, retries: int = 3, state: SoakState | None = None,
         progress: bool = False) -> dict:
    """Run ``images`` images (cycling through ``x_int`` ``[N, C, H, W]``, expected
    outputs ``golden`` ``[N, classes]``) with faults in a ``fault_rate`` share of them,
    over ``transport`` (the board's link, connected; its ``byte_seconds`` set, see
    :meth:`SimulatedBoard.measure_link`).

    ``kinds`` (default :data:`KINDS`) are the faults drawn. ``every_kind`` walks
    through them in turn instead of drawing them at random, each kind in another
    phase from round to round: the first ``len(kinds)`` faults cover every kind,
    ``3 x len(kinds)`` every (kind, phase) pair. ``state`` collects the report as
    it grows (see :class:`SoakState`). Returns the report.
    """
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"fault_rate {fault_rate}: accepted 0..1")
    if images < 1:
        raise ValueError(f"images {images}: accepted a count >= 1")
    if retries < 1:
        raise ValueError(f"retries {retries}: accepted a count >= 1")
    kinds = tuple(kinds) if kinds is not None else KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"fault kinds {sorted(unknown) or '(none)'}: accepted {', '.join(KINDS)}")
    st = state if state is not None else SoakState()
    st.stage = "images"
    st.images_requested = images
    rng = random.Random(seed)
    wire = FaultyTransport(transport)
    combos = [(k, PHASES[(i + r) % len(PHASES)]) for r in range(len(PHASES))
              for i, k in enumerate(kinds)]
    net = program.network()
    first, last = net.layers[0], net.layers[-1]
    out_pixels = last.ho * last.wo
    drv = Driver(wire, timeout=timeout, margin=margin)
    drv.load_program(config, program)
    ab = drv.identity.act_bytes
    in_elems = int(x_int[0].numel())
    request = {"load": HEADER_BYTES + 7 + in_elems * ab + CRC_BYTES,
               "run": HEADER_BYTES + 2 + CRC_BYTES,
               "read": HEADER_BYTES + 7 + CRC_BYTES}
    response = {"load": HEADER_BYTES + CRC_BYTES, "run": HEADER_BYTES + CRC_BYTES,
                "read": HEADER_BYTES + last.out_channels * out_pixels * ab + CRC_BYTES}
    c = st.counts
    resets_seen = board.resets()

    def run_wait() -> float:
        if st.run_seconds is None:
            return run_timeout
        return timeout + margin * st.run_seconds

    def recover() -> bool:
        """Link back, program checked (reloaded if damaged); a recovery that fails
        is counted and tried again after a board reset, ``retries`` times in all."""
        for attempt in range(retries):
            c["recoveries"] += 1
            try:
                if attempt:
                    _press_reset(board, drv)
                    c["soak_resets"] += 1
                drv.recover()
                damaged = drv.verify_image()
                if damaged:
                    c["program_reloads"] += 1
                    drv.load_program(config, program)
                return True
            except DriverError as e:
                c["recovery_failures"] += 1
                st.errors[f"recovery: {type(e).__name__}"] += 1
                wire.disarm()
        return False

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images, desc="soak", unit="img", leave=False)
    try:
        for i in range(images):
            j = i % x_int.shape[0]
            fault = None
            # The first image runs clean: it measures the cycles and seconds a run takes.
            if i > 0 and rng.random() < fault_rate:
                kind, phase = combos[c["faults"] % len(combos)] if every_kind else (
                    rng.choice(kinds), rng.choice(PHASES))
                fault = {"image": i, "kind": kind, "phase": phase}
                c["faults"] += 1
                st.by_kind[kind]["injected"] += 1
                st.by_kind_phase[f"{kind}/{phase}"] += 1
                st.faults.append(fault)
            done = False
            for attempt in range(retries):
                armed = fault if attempt == 0 else None
                step = None
                try:
                    for step in PHASES:
                        if armed and armed["phase"] == step:
                            _arm(board, wire, rng, armed, request[step], response[step],
                                 st.cycles_per_run)
                        if step == "load":
                            drv.load_activations(first.src, x_int[j])
                        elif step == "run":
                            t_run = time.monotonic()
                            drv.run(timeout=run_wait())
                            t_run = time.monotonic() - t_run
                        else:
                            out = drv.read_activations(last.dst, last.out_channels, out_pixels)
                except DriverError as e:
                    st.errors[type(e).__name__] += 1
                    wire.disarm()
                    fired = armed is not None and _fired(board, armed, resets_seen)
                    if armed:
                        armed.update(error=f"{type(e).__name__}: {e}", failed_step=step)
                        st.outcome(armed, caught_by(e) if fired else "not_fired")
                    if not fired:
                        c["unexpected_failures"] += 1
                        st.faults.append({"image": i, "kind": None, "phase": step,
                                          "outcome": "failed", "error": f"{type(e).__name__}: {e}"})
                    ok = recover()
                    resets_seen = board.resets()
                    if not ok:
                        break
                    continue
                # The attempt went through.
                if armed:
                    fired = _fired(board, armed, resets_seen)
                    wire.disarm()
                    resets_seen = board.resets()
                    st.outcome(armed, "got_through" if fired else "not_fired")
                    if fired:
                        # What the fault left on the line (a second answer) is its own.
                        wire.drain(max(0.3, margin * response[step] * wire.byte_seconds))
                        drv.resync()
                got = out.reshape(-1)
                if torch.equal(got, golden[j]):
                    c["computed"] += 1
                else:
                    c["silently_wrong"] += 1
                    st.faults.append({"image": i, "kind": fault["kind"] if fault else None,
                                      "phase": None, "outcome": "silently wrong",
                                      "differing": int((got != golden[j]).sum())})
                if st.cycles_per_run is None:
                    st.cycles_per_run = drv.counters()["cycles"]
                    st.run_seconds = t_run
                done = True
                break
            if not done:
                c["lost"] += 1
                st.faults.append({"image": i, "kind": None, "phase": None, "outcome": "lost"})
            if fault:
                fault.pop("_fault", None)
            c["images_done"] += 1
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
        st.resets_fired = board.resets()
    return st.report()


def _fired(board: SimulatedBoard, fault: dict, resets_seen: int) -> bool:
    """Whether the armed ``fault`` fired; a board reset that did not is disarmed."""
    if fault["kind"] == "reset":
        fault["fired"] = board.resets() > resets_seen
        if not fault["fired"]:
            board.disarm()
    else:
        armed = fault.pop("_fault", None)      # (None: its step was not reached)
        fault["fired"] = armed is not None and armed.fired
    return fault["fired"]


def _press_reset(board: SimulatedBoard, drv: Driver) -> None:
    """Reset the board now and wait for it (as long as a short request may take)."""
    before = board.resets()
    board.reset_after()
    deadline = time.monotonic() + drv.wait_seconds(HEADER_BYTES + CRC_BYTES)
    while board.resets() == before:
        if time.monotonic() > deadline:
            raise LinkTimeout("the board reset did not fire")
        time.sleep(0.01)


def _arm(board, wire, rng, fault, req_len, resp_len, run_cycles):
    """Arm ``fault`` for the step about to start: its request is ``req_len`` bytes,
    its first response ``resp_len``."""
    kind, phase = fault["kind"], fault["phase"]
    if kind != "reset":
        base = kind.rsplit("_", 1)[0]
        n = req_len if kind.endswith("_tx") else resp_len
        args = {}
        if base in ("dup", "reorder"):
            fault["frame"] = 0                    # the step's first frame
            fault["_fault"] = wire.arm(kind, 0)
            return
        fault["byte"] = rng.randrange(n)
        if base == "flip":
            args["bit"] = fault["bit"] = rng.randrange(8)
        elif base == "burst":
            fault["bits"] = rng.randint(*BURST_BITS)
            fault["first_bit"] = rng.randrange(8)
            args["mask"] = burst_mask(fault["bits"], fault["first_bit"], rng)
        elif base == "insert":
            args["data"] = bytes(rng.randrange(256) for _ in range(rng.randint(*INSERT_BYTES)))
            fault["inserted"] = args["data"].hex()
        elif base == "delete":
            args["length"] = fault["length"] = rng.randint(*DELETE_BYTES)
        elif base == "stuck":
            args["length"] = fault["length"] = rng.randint(*STUCK_BYTES)
            args["value"] = fault["value"] = rng.choice((0x00, 0xFF))
        fault["_fault"] = wire.arm(kind, fault["byte"], **args)
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
# The shortest watch for an answer that must not come (plus the time the bytes take).
NO_ANSWER_SECONDS = 0.2
FRAME_KINDS = ("write", "read", "identify", "status", "counters", "bad_crc", "bad_length",
               "hidden_frame", "bad_opcode", "bad_address", "truncated", "noise", "stream_idle", "reset", "image")


def frame_fuzz(board: SimulatedBoard, transport: Transport, config: AcceleratorConfig,
               program: Program, x_int: torch.Tensor, golden: torch.Tensor, *, frames: int, seed: int = 0,
               timeout: float = 3.0, margin: float = 4.0, truncated_wait: float = 60.0,
               run_timeout: float = 120.0, kinds: tuple[str, ...] | None = None,
               state: SoakState | None = None, progress: bool = False) -> dict:
    """Send ``frames`` random requests: valid commands, corrupted frames, bytes that
    are not frames, board resets and whole images, and hold every answer against a
    model of the device.

    The model knows the memories (the loaded program, plus random writes to the
    parts of the base store and constants the program leaves unused), which error
    each bad frame must get, how many frames the link refused and how many bytes
    it took since the last reset. A run must give the golden outputs: no bad frame
    may have changed the program. Each answer is waited for as the driver waits
    (``timeout`` plus ``margin`` times the time its bytes take on the link, the
    transport's ``byte_seconds``); bytes that must get no answer are watched for
    as long. A frame refused for its length is sent whole (its declared payload
    and CRC): with a valid WRITE hidden in that payload (``hidden_frame``: 16
    bytes to the base store's address 0 that differ from what it holds), which
    must not be executed. A frame cut short is answered only after the config's
    ``link_timeout`` cycles: ``truncated_wait`` more seconds are allowed for it.
    A run waits ``run_timeout`` seconds at most. ``state`` counts the frames as
    they go (see :class:`SoakState`). By default ``kinds`` leaves truncated frames
    out when ``link_timeout``
    exceeds :data:`TRUNCATED_MAX_TIMEOUT` cycles (a simulator takes minutes to
    get there); the report lists the kinds left out. Returns counts per kind;
    raises :class:`ModelMismatch`
    on the first answer that differs from the model.
    """
    rng = random.Random(seed)
    st = state if state is not None else SoakState()
    st.stage = "frames"
    if kinds is None:
        kinds = tuple(k for k in FRAME_KINDS
                      if k != "truncated" or config.link_timeout <= TRUNCATED_MAX_TIMEOUT)
    unknown = set(kinds) - set(FRAME_KINDS)
    if unknown or not kinds:
        raise ValueError(f"frame kinds {sorted(unknown) or '(none)'}: accepted {', '.join(FRAME_KINDS)}")
    net = program.network()
    first, last = net.layers[0], net.layers[-1]
    tr = transport
    drv = Driver(tr, timeout=timeout, margin=margin)
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
    counts = st.fuzz_counts
    short_answer = HEADER_BYTES + 2 + CRC_BYTES

    def exchange(data: bytes, expect_answer: bool = True, answer: int = short_answer,
                 extra: float = 0.0):
        """Raw bytes out; the one frame that comes back (None if none is due)."""
        tr.write(data)
        dec = FrameDecoder()
        wait = drv.wait_seconds(len(data) + answer) + extra
        if not expect_answer:
            # As long as an answer would take to arrive, without the fixed wait.
            wait = max(NO_ANSWER_SECONDS, wait - timeout)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not dec.frames:
            dec.feed(tr.read(4096, 0.05))
        if not expect_answer:
            _expect(not dec.frames, f"bytes that are no frame were answered: {dec.frames}")
            return None
        _expect(len(dec.frames) == 1, f"expected one answer to {data[:8].hex()}..., got {dec.frames}")
        return dec.frames[0]

    def expect_error(data: bytes, code: int, link_refused: bool, extra: float = 0.0):
        f = exchange(data, extra=extra)
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
            f = exchange(encode_frame(OP_READ, struct.pack("<BIH", region, addr, n)),
                         answer=short_answer + n)
            _expect(f.op == OP_READ | RESPONSE and f.payload == bytes(mem[region][addr:addr + n]),
                    f"READ of {n} bytes at {addr} of region {region}: device and model differ")
        elif kind == "identify":
            f = exchange(encode_frame(OP_IDENTIFY), answer=short_answer + len(identity_bytes(config)))
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
                         extra=truncated_wait)
        elif kind == "noise":
            noise = bytes(rng.choice([b for b in range(256) if b != SYNC])
                          for _ in range(rng.randint(1, 64)))
            exchange(noise, expect_answer=False)
        elif kind == "stream_idle":
            expect_error(encode_frame(OP_WRITE, struct.pack("<BI", REGION_STREAM, 0) + b"\0"),
                         ERR_STATE, False)
        elif kind == "reset":
            before = board.resets()
            try:
                _press_reset(board, drv)
            except LinkTimeout:
                pass
            _expect(board.resets() == before + 1, "the board reset did not fire")
            model["frame_errors"] = 0
            model["bytes_in"] = 0
            base_sent = tr.bytes_sent
            _expect(drv.status().name == "idle", "the device is not idle after a reset")
        elif kind == "image":
            j = rng.randrange(x_int.shape[0])
            drv.load_activations(first.src, x_int[j])
            drv.run(timeout=run_timeout)
            out = drv.read_activations(last.dst, last.out_channels, last.ho * last.wo)
            _expect(torch.equal(out.reshape(-1), golden[j]), "an image differs from the golden model")
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    c = drv.counters()
    st.fuzz = {"frames": frames, "by_kind": dict(sorted(counts.items())),
               "kinds_left_out": [k for k in FRAME_KINDS if k not in kinds],
               "link_frames": c["frames"], "frame_errors": c["frame_errors"]}
    return st.fuzz


# ---- a whole soak, its report written however it ends -------------------------------

def _stopped_by(error: BaseException) -> str:
    import signal

    if isinstance(error, KeyboardInterrupt):
        return "SIGINT"
    signum = getattr(error, "signum", None)
    if signum is not None:
        return signal.Signals(signum).name
    return f"{type(error).__name__}: {error}"


def write_report(path: str | Path | None, report: dict) -> None:
    """Write ``report`` (JSON) to ``path`` (nothing without one), whole or not at all."""
    if not path:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def soak_session(config: AcceleratorConfig, program: Program, x_int: torch.Tensor,
                 golden: torch.Tensor, options: SoakOptions, *, simulator: str = "verilator",
                 fast_build: bool = False, start_timeout: float = 900.0,
                 out: str | Path | None = None, log=print, progress: bool = False) -> dict:
    """Start the simulated board, measure its link, run the frame fuzz and the image
    soak of ``options``; returns the report and writes it (JSON) to ``out``.

    However the soak ends (an error, Ctrl-C, a signal turned into an exception), the
    report of what it did is written to ``out``, marked ``partial`` with what
    stopped it (``stopped_by``), and set on the exception as ``soak_report`` before
    it goes on up.
    """
    from host.transport import SerialTransport

    st = SoakState(options)
    st.extra["simulator"] = simulator
    try:
        st.stage = "board"
        t0 = time.monotonic()
        with SimulatedBoard(config, simulator, fast_build=fast_build,
                            start_timeout=start_timeout) as board:
            with SerialTransport(board.url, baud=config.baud) as transport:
                st.stage = "measure"
                st.byte_seconds = board.measure_link(transport, timeout=options.timeout)
                log(f"simulated board on {board.url} after {time.monotonic() - t0:.0f} s, "
                    f"{st.byte_seconds * 1e6:.0f} us per byte on its link; {options.frames} "
                    f"random frames, then {options.images} images with faults in "
                    f"{options.fault_rate:.0%} of them")
                frame_fuzz(board, transport, config, program, x_int, golden,
                           frames=options.frames, seed=options.seed, timeout=options.timeout,
                           margin=options.margin, truncated_wait=options.truncated_wait,
                           run_timeout=options.run_timeout, state=st, progress=progress)
                soak(board, transport, config, program, x_int, golden, images=options.images,
                     fault_rate=options.fault_rate, seed=options.seed,
                     every_kind=options.every_kind, timeout=options.timeout,
                     margin=options.margin, run_timeout=options.run_timeout,
                     retries=options.retries, state=st, progress=progress)
                st.stage = "done"
    except BaseException as e:
        report = st.report(partial=True, stopped_by=_stopped_by(e))
        write_report(out, report)
        try:
            e.soak_report = report
        except AttributeError:
            pass
        raise
    report = st.report()
    write_report(out, report)
    return report
