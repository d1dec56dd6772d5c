"""cocotb bench: the accelerator as a board on a TCP socket (127.0.0.1).

The bench listens on ``MLG_BOARD_PORT`` (0: any free port), writes the port it
got to ``MLG_BOARD_PORT_FILE``, accepts one connection and moves bytes between
it and the DUT's ``i_rx``/``o_tx`` streams until the host closes it. The host
side is the ordinary driver on ``socket://127.0.0.1:PORT``.

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


@cocotb.test()
async def board(dut):
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.rst.value = 1
    dut.i_rx__valid.value = 0
    dut.i_rx__payload.value = 0
    dut.o_tx__ready.value = 0
    await ClockCycles(dut.clk, 4)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    max_step = int(os.environ.get("MLG_BOARD_IDLE_STEP", "1024"))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(os.environ.get("MLG_BOARD_PORT", "0"))))
    srv.listen(1)
    port_file = os.environ.get("MLG_BOARD_PORT_FILE")
    if port_file:
        Path(port_file).write_text(str(srv.getsockname()[1]))
    srv.settimeout(float(os.environ.get("MLG_BOARD_ACCEPT_TIMEOUT", "120")))
    conn, _ = srv.accept()
    srv.close()
    conn.setblocking(False)

    rx = bytearray()
    tx = bytearray()
    step = 1
    closed = False
    while not closed or rx:
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
                if _high(dut.o_tx__valid):
                    tx.append(int(dut.o_tx__payload.value))
                if rx and _high(dut.i_rx__ready):
                    dut.i_rx__valid.value = 1
                    dut.i_rx__payload.value = rx.pop(0)
                else:
                    dut.i_rx__valid.value = 0
                if len(tx) >= 4096:
                    break
            await FallingEdge(dut.clk)
            if _high(dut.o_tx__valid):
                tx.append(int(dut.o_tx__payload.value))
            dut.i_rx__valid.value = 0
            dut.o_tx__ready.value = 0
            if tx:
                _send(conn, bytes(tx))
                tx.clear()
            continue
        if closed:
            break
        # Idle line: let the design run alone, then look at the socket again. A short
        # wait on the socket keeps a host that is about to send from racing the clock.
        await Timer(step * PERIOD_NS, unit="ns")
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
