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
import time
from collections import Counter

import torch

from gen.config import AcceleratorConfig
from gen.program import Program
from host.driver import Driver, DriverError
from host.faults import FAULT_KINDS, FaultyTransport
from host.protocol import CRC_BYTES, HEADER_BYTES
from host.transport import SerialTransport

from .board import SimulatedBoard

__all__ = ["PHASES", "KINDS", "soak"]

PHASES = ("load", "run", "read")
KINDS = FAULT_KINDS + ("reset",)
MAX_ATTEMPTS = 3


def soak(board: SimulatedBoard, config: AcceleratorConfig, program: Program, x_int: torch.Tensor,
         golden: torch.Tensor, *, images: int, fault_rate: float = 0.2, seed: int = 0,
         every_kind: bool = False, timeout: float = 3.0, run_timeout: float = 120.0,
         progress: bool = False) -> dict:
    """Run ``images`` images (cycling through ``x_int`` ``[N, C, H, W]``, expected
    outputs ``golden`` ``[N, classes]``) with faults in a ``fault_rate`` share of them.

    ``every_kind`` walks through every (kind, phase) pair in turn instead of drawing
    them at random, so a short soak covers them all. Returns the outcome counts and
    one row per fault.
    """
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"fault_rate {fault_rate}: accepted 0..1")
    if images < 1:
        raise ValueError(f"images {images}: accepted a count >= 1")
    rng = random.Random(seed)
    with FaultyTransport(SerialTransport(board.url, baud=config.baud)) as wire:
        return _soak(board, config, program, x_int, golden, wire, rng, images=images,
                     fault_rate=fault_rate, every_kind=every_kind, timeout=timeout,
                     run_timeout=run_timeout, progress=progress)


def _soak(board, config, program, x_int, golden, wire, rng, *, images, fault_rate, every_kind,
          timeout, run_timeout, progress):
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
