"""cocotb bench: the accelerator as a board on a TCP socket (127.0.0.1).

The bench listens on ``MLG_BOARD_PORT`` (0: any free port), writes the port it
got to ``MLG_BOARD_PORT_FILE`` and serves connections one after another: it
moves bytes between a connection and the DUT's ``i_rx``/``o_tx`` streams until
the host closes it, then takes the next one, as a board stays on between two
programs that open its port. The device keeps its state from one connection to
the next. The host side is the ordinary driver on ``socket://127.0.0.1:PORT``.
The bench ends on ``stop`` from the control port, when the control connection
closes (its host is gone), or when no one has connected to either port within
``MLG_BOARD_ACCEPT_TIMEOUT`` seconds of the start.

A second socket, the control port (its number is the second word of the port
file), takes board-level commands, one line each, answered with ``ok``:

* ``reset RX CYCLES TX``: arm a reset of the board. It fires once the DUT has
  taken ``RX`` more bytes from the line, then ``CYCLES`` more cycles have passed
  and the DUT has sent ``TX`` more bytes. The reset holds ``rst`` for four cycles
  and loses the bytes on the line at that moment, as pressing a board's reset
  button would; the bench then writes ``reset CYCLE`` on the control socket.
* ``disarm``: forget the armed reset.
* ``stop``: end the simulation once the current connection (if any) is closed.

While bytes move, the bench works cycle by cycle (at the falling edge, as the
DUT's valid and ready depend only on its registers then). While the line is
idle it lets the simulator run alone for growing stretches of up to
``MLG_BOARD_IDLE_STEP`` cycles between looks at the socket, so a computing
accelerator is simulated at full speed.
"""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, Timer

PERIOD_NS = 10


def _high(sig) -> bool:
    """A handshake bit; unresolved reads as low. Icarus leaves a combinational output X
    until one of its inputs changes, which for o_tx.valid is the first frame."""
    v = sig.value
    return v.is_resolvable and bool(int(v))


class _Control:
    """The control port: armed resets and their notices."""

    def __init__(self):
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.srv.setblocking(False)
        self.port = self.srv.getsockname()[1]
        self.conn: socket.socket | None = None
        self.line = bytearray()
        self.armed: list[int] | None = None   # [rx bytes, cycles, tx bytes] still to go
        self.connected = False
        self.stopped = False

    def poll(self) -> None:
        if self.conn is None:
            try:
                self.conn, _ = self.srv.accept()
                self.conn.setblocking(False)
                self.connected = True
            except BlockingIOError:
                return
        try:
            data = self.conn.recv(4096)
        except BlockingIOError:
            return
        if not data:
            self.conn.close()
            self.conn = None
            self.stopped = True      # the host that controls the board is gone
            return
        self.line += data
        while b"\n" in self.line:
            cmd, _, rest = bytes(self.line).partition(b"\n")
            self.line = bytearray(rest)
            words = cmd.decode(errors="replace").split()
            if len(words) == 4 and words[0] == "reset" and all(w.isdigit() for w in words[1:]):
                self.armed = [int(w) for w in words[1:]]
                _send(self.conn, b"ok\n")
            elif words == ["disarm"]:
                self.armed = None
                _send(self.conn, b"ok\n")
            elif words == ["stop"]:
                self.stopped = True
                _send(self.conn, b"ok\n")
            else:
                _send(self.conn, b"error: expected 'reset RX CYCLES TX', 'disarm' or 'stop'\n")

    def took(self, n: int = 1) -> None:
        if self.armed and self.armed[0]:
            self.armed[0] = max(0, self.armed[0] - n)

    def sent(self, n: int = 1) -> None:
        if self.armed and not self.armed[0] and not self.armed[1]:
            self.armed[2] = max(0, self.armed[2] - n)

    def idle_cycles(self) -> int | None:
        """Cycles the design may run alone before the armed reset is due (None: no limit)."""
        if self.armed is None or self.armed[0] or not self.armed[1]:
            return None
        return self.armed[1]

    def ran(self, n: int) -> None:
        if self.armed and not self.armed[0]:
            self.armed[1] = max(0, self.armed[1] - n)

    def due(self) -> bool:
        return self.armed is not None and not any(self.armed)

    def fired(self, cycle: int) -> None:
        self.armed = None
        if self.conn is not None:
            _send(self.conn, f"reset {cycle}\n".encode())


async def _reset(dut) -> None:
    dut.rst.value = 1
    dut.i_rx__valid.value = 0
    dut.o_tx__ready.value = 0
    await ClockCycles(dut.clk, 4)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


@cocotb.test()
async def board(dut):
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.i_rx__payload.value = 0
    await _reset(dut)

    max_step = int(os.environ.get("MLG_BOARD_IDLE_STEP", "1024"))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(os.environ.get("MLG_BOARD_PORT", "0"))))
    srv.listen(1)
    ctl = _Control()
    port_file = os.environ.get("MLG_BOARD_PORT_FILE")
    if port_file:
        Path(port_file).write_text(f"{srv.getsockname()[1]} {ctl.port}")
    srv.setblocking(False)
    accept_timeout = float(os.environ.get("MLG_BOARD_ACCEPT_TIMEOUT", "120"))
    started = time.monotonic()
    cycle = 0
    while True:
        conn = _accept(srv, ctl, started + accept_timeout)
        if conn is None:
            break
        cycle = await _serve(dut, conn, ctl, cycle, max_step)
    srv.close()


def _accept(srv: socket.socket, ctl: _Control, deadline: float) -> socket.socket | None:
    """The next connection; None once the board is to stop."""
    while True:
        ctl.poll()
        if ctl.stopped:
            return None
        if not ctl.connected and time.monotonic() > deadline:
            return None
        readable, _, _ = select.select([srv], [], [], 0.05)
        if readable:
            try:
                conn, _ = srv.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            return conn


async def _serve(dut, conn: socket.socket, ctl: _Control, cycle: int, max_step: int) -> int:
    """Move bytes between ``conn`` and the DUT until the host closes it; returns the cycle."""
    rx = bytearray()
    tx = bytearray()
    step = 1
    closed = False

    async def maybe_reset() -> bool:
        nonlocal cycle
        if not ctl.due():
            return False
        await _reset(dut)
        cycle += 5
        rx.clear()          # bytes on the line while the board is in reset are lost
        ctl.fired(cycle)
        return True

    while not closed or rx:
        ctl.poll()
        if not closed:
            try:
                data = conn.recv(65536)
                if data:
                    rx += data
                else:
                    closed = True
            except BlockingIOError:
                pass
        if rx or _high(dut.o_tx__valid):
            step = 1
            dut.o_tx__ready.value = 1
            # Cycle by cycle while there is traffic in either direction.
            while rx or _high(dut.o_tx__valid):
                await FallingEdge(dut.clk)
                cycle += 1
                ctl.ran(1)
                if _high(dut.o_tx__valid):
                    tx.append(int(dut.o_tx__payload.value))
                    ctl.sent()
                if rx and _high(dut.i_rx__ready):
                    dut.i_rx__valid.value = 1
                    dut.i_rx__payload.value = rx.pop(0)
                    ctl.took()
                else:
                    dut.i_rx__valid.value = 0
                if len(tx) >= 4096 or ctl.due():
                    break
            await FallingEdge(dut.clk)
            cycle += 1
            ctl.ran(1)
            # The byte offered now goes at the next edge only if the loop is entered
            # again at once (it is, while o_tx.valid holds); a reset due now comes first.
            if _high(dut.o_tx__valid) and not ctl.due():
                tx.append(int(dut.o_tx__payload.value))
                ctl.sent()
            dut.i_rx__valid.value = 0
            dut.o_tx__ready.value = 0
            if tx:
                _send(conn, bytes(tx))
                tx.clear()
            await maybe_reset()
            continue
        if closed:
            break
        if await maybe_reset():
            continue
        # Idle line: let the design run alone, then look at the socket again. A short
        # wait on the socket keeps a host that is about to send from racing the clock.
        limit = ctl.idle_cycles()
        run = step if limit is None else max(1, min(step, limit))
        await Timer(run * PERIOD_NS, unit="ns")
        cycle += run
        ctl.ran(run)
        step = min(step * 2, max_step)
        if step == max_step:
            select.select([conn], [], [], 0.0005)
    conn.close()
    return cycle


def _send(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = conn.send(view)
            view = view[n:]
        except BlockingIOError:
            select.select([], [conn], [], 1.0)
        except (BrokenPipeError, ConnectionResetError):
            return
