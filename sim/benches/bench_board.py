"""cocotb bench: the accelerator as a board on a TCP socket (127.0.0.1).

The bench listens on ``MLG_BOARD_PORT`` (0: any free port), writes the port it
got to ``MLG_BOARD_PORT_FILE``, accepts one connection and moves bytes between
it and the DUT's ``i_rx``/``o_tx`` streams until the host closes it. The host
side is the ordinary driver on ``socket://127.0.0.1:PORT``.

A second socket, the control port (its number is the second word of the port
file), takes board-level commands, one line each, answered with ``ok``:

* ``reset RX CYCLES TX``: arm a reset of the board. It fires once the DUT has
  taken ``RX`` more bytes from the line, then ``CYCLES`` more cycles have passed
  and the DUT has sent ``TX`` more bytes. The reset holds ``rst`` for four cycles
  and loses the bytes on the line at that moment, as pressing a board's reset
  button would; the bench then writes ``reset CYCLE`` on the control socket.
* ``disarm``: forget the armed reset.

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

    def poll(self) -> None:
        if self.conn is None:
            try:
                self.conn, _ = self.srv.accept()
                self.conn.setblocking(False)
            except BlockingIOError:
                return
        try:
            data = self.conn.recv(4096)
        except BlockingIOError:
            return
        if not data:
            self.conn.close()
            self.conn = None
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
            else:
                _send(self.conn, b"error: expected 'reset RX CYCLES TX' or 'disarm'\n")

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
    srv.settimeout(float(os.environ.get("MLG_BOARD_ACCEPT_TIMEOUT", "120")))
    conn, _ = srv.accept()
    srv.close()
    conn.setblocking(False)

    rx = bytearray()
    tx = bytearray()
    step = 1
    cycle = 0
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
