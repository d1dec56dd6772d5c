"""Board tops: the accelerator behind a PLL and a UART on ULX3S (ECP5) and iCEBreaker (iCE40).

The board's oscillator feeds a PLL that makes the requested clock; the PLL's
lock holds the design in reset until the clock is stable. The host link runs
over the board's USB UART (FTDI) at ``config.baud``. LEDs: 0 a run is in
progress, 1 the last run ended in an error, 2 a UART framing error or overrun
has been seen (sticky until reset), 3 heartbeat (about 1.5 Hz): the clock runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.build import ResourceError
from amaranth.hdl import ClockDomain, ClockSignal, Module, Signal
from amaranth.lib import io, wiring
from amaranth.lib.cdc import ResetSynchronizer
from amaranth.lib.fifo import SyncFIFOBuffered

from gen.config import AcceleratorConfig

from .accelerator import Accelerator
from .flow.pll import ecp5_pll, ice40_pll
from .pll import ecp5_pll_instance, ice40_pll_instance
from .uart import UARTRx, UARTTx, uart_divisor

__all__ = ["BOARDS", "Board", "BoardTop", "board_platform"]


@dataclass(frozen=True)
class Board:
    name: str
    family: str            # "ecp5" or "ice40"
    platform: str          # amaranth_boards module:class
    device: str
    luts: int
    multipliers: int
    bram_bits: int


BOARDS = {
    "ulx3s-85f": Board("ulx3s-85f", "ecp5", "amaranth_boards.ulx3s:ULX3S_85F_Platform",
                       "LFE5U-85F", 83_640, 156, 208 * 18 * 1024),
    "icebreaker": Board("icebreaker", "ice40", "amaranth_boards.icebreaker:ICEBreakerPlatform",
                        "iCE40UP5K", 5_280, 8, 30 * 4096),
}


def board_platform(board: str):
    """The amaranth-boards platform instance of ``board``."""
    import importlib

    if board not in BOARDS:
        raise ValueError(f"board {board!r} unsupported; accepted: {', '.join(BOARDS)}")
    module, cls = BOARDS[board].platform.split(":")
    return getattr(importlib.import_module(module), cls)()


class BoardTop(wiring.Component):
    """The accelerator of ``config`` on ``board`` at ``freq_hz``.

    Raises
    ------
    ValueError
        If the board is unknown, no PLL setting reaches ``freq_hz`` within 1%, or
        the UART cannot make ``config.baud`` from it within 2%.
    """

    def __init__(self, config: AcceleratorConfig, board: str, freq_hz: float):
        if board not in BOARDS:
            raise ValueError(f"board {board!r} unsupported; accepted: {', '.join(BOARDS)}")
        self.config, self.board, self.freq_hz = config, BOARDS[board], freq_hz
        self.divisor = uart_divisor(freq_hz, config.baud)
        f_in = board_platform(board).default_clk_frequency
        self.pll = (ecp5_pll if self.board.family == "ecp5" else ice40_pll)(f_in, freq_hz)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        b = self.board
        lock = Signal()
        clk = Signal()
        m.domains.sync = ClockDomain("sync")
        pll = self.pll
        if b.family == "ecp5":
            osc = platform.request(platform.default_clk, dir="-")
            m.submodules.osc = osc_buf = io.Buffer("i", osc)
            m.submodules.pll = ecp5_pll_instance(pll, osc_buf.i, clk, lock)
        else:
            osc = platform.request(platform.default_clk, dir="-")
            m.submodules.pll = ice40_pll_instance(pll, osc.io, clk, lock)
        m.d.comb += ClockSignal("sync").eq(clk)
        platform.add_clock_constraint(clk, pll.f_out)
        m.submodules.reset_sync = ResetSynchronizer(~lock, domain="sync")

        m.submodules.core = core = Accelerator(self.config)
        m.submodules.uart_rx = rx = UARTRx(self.divisor)
        m.submodules.uart_tx = tx = UARTTx(self.divisor)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx_pin = rx_pin = io.Buffer("i", uart.rx)
        m.submodules.uart_tx_pin = tx_pin = io.Buffer("o", uart.tx)
        m.d.comb += [rx.i_rx.eq(rx_pin.i), tx_pin.o.eq(tx.o_tx)]
        # The UART sits by its pins, the link in the core: a two-byte FIFO each way keeps
        # either side's handshake logic out of the other's cycle (a byte takes hundreds
        # of cycles on the line, so the FIFOs never fill in normal use).
        m.submodules.rx_fifo = rx_fifo = SyncFIFOBuffered(width=8, depth=2)
        m.submodules.tx_fifo = tx_fifo = SyncFIFOBuffered(width=8, depth=2)
        m.d.comb += [
            rx_fifo.w_data.eq(rx.o_stream.payload), rx_fifo.w_en.eq(rx.o_stream.valid),
            rx.o_stream.ready.eq(rx_fifo.w_rdy),
            core.i_rx.payload.eq(rx_fifo.r_data), core.i_rx.valid.eq(rx_fifo.r_rdy),
            rx_fifo.r_en.eq(core.i_rx.ready),
            tx_fifo.w_data.eq(core.o_tx.payload), tx_fifo.w_en.eq(core.o_tx.valid),
            core.o_tx.ready.eq(tx_fifo.w_rdy),
            tx.i_stream.payload.eq(tx_fifo.r_data), tx.i_stream.valid.eq(tx_fifo.r_rdy),
            tx_fifo.r_en.eq(tx.i_stream.ready),
        ]

        line_fault = Signal()
        with m.If(rx.o_error | rx.o_overrun):
            m.d.sync += line_fault.eq(1)
        beat = Signal(range(int(self.freq_hz) // 2 + 1))
        blink = Signal()
        with m.If(beat == int(self.freq_hz) // 3):
            m.d.sync += [beat.eq(0), blink.eq(~blink)]
        with m.Else():
            m.d.sync += beat.eq(beat + 1)
        for i, sig in enumerate((core.running, core.error, line_fault, blink)):
            try:
                led = platform.request("led", i, dir="-")
            except ResourceError:  # a board with fewer LEDs
                break
            m.submodules[f"led_{i}"] = led_buf = io.Buffer("o", led)
            m.d.comb += led_buf.o.eq(sig)
        return m
