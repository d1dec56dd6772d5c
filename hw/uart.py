"""UART PHY of the host link: 8N1 frames, LSB first, one byte stream each way.

A frame is a start bit (0), eight data bits least significant first and one
stop bit (1); the line idles high. Both directions run at ``divisor`` clock
cycles per bit, a compile-time integer; :func:`uart_divisor` derives it from
the clock and the baud rate and refuses a pair the link would not tolerate.

:class:`UARTTx` serialises the bytes of a stream onto the line, back to back
when the stream keeps up. :class:`UARTRx` synchronises the asynchronous line,
samples every bit in its middle and delivers the bytes on a stream; a frame
with a low stop bit and a byte arriving while the previous one is still unread
are reported on pulse outputs instead of being delivered.
"""

from __future__ import annotations

import numbers

from amaranth.hdl import Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTTx", "UARTRx", "uart_divisor", "MIN_DIVISOR", "MAX_BAUD_ERROR"]

MIN_DIVISOR = 4
MAX_BAUD_ERROR = 0.02


def _check_divisor(divisor) -> int:
    # Below 4 cycles a bit, the synchroniser delay and the one-cycle
    # uncertainty of the start edge leave no margin around the mid-bit sample.
    if (isinstance(divisor, bool) or not isinstance(divisor, numbers.Integral)
            or divisor < MIN_DIVISOR):
        raise ValueError(f"UART divisor {divisor!r} out of range; accepted an integer >= {MIN_DIVISOR}")
    return int(divisor)


def uart_divisor(clk_hz: float, baud: float) -> int:
    """Clock cycles per bit for a UART at ``baud`` bit/s clocked at ``clk_hz``.

    Returns ``round(clk_hz / baud)``.

    Raises
    ------
    ValueError
        If ``clk_hz`` or ``baud`` is not positive, if the divisor is below
        :data:`MIN_DIVISOR`, or if the baud rate actually obtained,
        ``clk_hz / divisor``, is off ``baud`` by more than 2 %: the two ends of
        the link would drift apart by a large part of a bit over a frame.
    """
    if not clk_hz > 0 or not baud > 0:
        raise ValueError(f"clk {clk_hz} Hz and baud {baud} must both be positive")
    divisor = round(clk_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(
            f"clk {clk_hz} Hz is too slow for baud {baud}: divisor {divisor}, accepted >= {MIN_DIVISOR}")
    error = abs(clk_hz / divisor - baud) / baud
    if error > MAX_BAUD_ERROR:
        raise ValueError(
            f"clk {clk_hz} Hz cannot make baud {baud}: divisor {divisor} gives "
            f"{clk_hz / divisor:.0f} bit/s, error {error:.2%} > {MAX_BAUD_ERROR:.0%}")
    return divisor


class UARTTx(wiring.Component):
    """UART transmitter, 8N1, LSB first.

    A byte is taken from ``i_stream`` only when its frame can start at once,
    so ``i_stream.ready`` depends on the transmitter state alone. The next
    byte is taken in the last cycle of the current stop bit: a stream that
    keeps up gets frames back to back, exactly ``10 * divisor`` cycles each.

    Parameters
    ----------
    divisor:
        Clock cycles per bit, an integer >= 4.

    Members
    -------
    i_stream: In(stream.Signature(8))
        Bytes to send.
    o_tx: Out(1)
        Serial line, high when idle; driven from a register, glitch-free.

    Raises
    ------
    ValueError
        If ``divisor`` is not an integer >= 4.
    """

    def __init__(self, divisor: int):
        self.divisor = _check_divisor(divisor)
        super().__init__({
            "i_stream": In(stream.Signature(8)),
            "o_tx": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        D = self.divisor
        busy = Signal()
        timer = Signal(range(D))
        # Data bits then the stop bit, shifted out LSB first behind the start
        # bit that o_tx is loaded with directly.
        shreg = Signal(9)
        left = Signal(range(10))
        last = Signal()

        m.d.comb += [
            last.eq(busy & (timer == 0) & (left == 0)),
            self.i_stream.ready.eq(~busy | last),
        ]
        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += [
                busy.eq(1),
                timer.eq(D - 1),
                self.o_tx.eq(0),
                shreg.eq(Cat(self.i_stream.payload, Const(1, 1))),
                left.eq(9),
            ]
        with m.Elif(last):
            m.d.sync += busy.eq(0)
        with m.Elif(busy):
            with m.If(timer == 0):
                m.d.sync += [
                    timer.eq(D - 1),
                    self.o_tx.eq(shreg[0]),
                    shreg.eq(shreg >> 1),
                    left.eq(left - 1),
                ]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m


class UARTRx(wiring.Component):
    """UART receiver, 8N1, LSB first.

    ``i_rx`` passes through a two-flop synchroniser first. A low line starts a
    frame only if it is still low half a bit later, so a glitch shorter than
    half a bit is ignored; the data bits and the stop bit are then sampled a
    whole bit apart, near their middles. The receiver rearms at the middle of
    the stop bit, which lets it follow a transmitter a few percent faster
    than itself.

    A received byte waits in the ``o_stream`` register until read. A byte
    completed while the previous one is still unread (and not being read in
    that cycle) is dropped and ``o_overrun`` pulses; the unread byte stays.
    A low stop bit drops the byte and pulses ``o_error``; the receiver then
    waits for the line to go high before looking for a start bit, so a break
    (line held low) reports one error, not one per frame time.

    Parameters
    ----------
    divisor:
        Clock cycles per bit, an integer >= 4.

    Members
    -------
    i_rx: In(1)
        Serial line, asynchronous to the clock.
    o_stream: Out(stream.Signature(8))
        Received bytes.
    o_error: Out(1)
        One-cycle pulse per frame with a low stop bit.
    o_overrun: Out(1)
        One-cycle pulse per byte dropped because ``o_stream`` was full.

    Raises
    ------
    ValueError
        If ``divisor`` is not an integer >= 4.
    """

    def __init__(self, divisor: int):
        self.divisor = _check_divisor(divisor)
        super().__init__({
            "i_rx": In(1, init=1),
            "o_stream": Out(stream.Signature(8)),
            "o_error": Out(1),
            "o_overrun": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        D = self.divisor
        # The start edge is seen 0..1 cycle after it happened; sampling
        # D // 2 cycles later lands on the middle of the bit on average.
        half = D // 2

        rx = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.i_rx, rx, init=1)

        timer = Signal(range(D))
        shreg = Signal(8)
        count = Signal(range(8))
        done = Signal()

        m.d.sync += [self.o_error.eq(0), self.o_overrun.eq(0)]

        with m.FSM():
            with m.State("IDLE"):
                m.d.sync += timer.eq(half - 1)
                with m.If(~rx):
                    m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(D - 1), count.eq(0)]
                    with m.If(rx):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [
                        timer.eq(D - 1),
                        shreg.eq(Cat(shreg[1:], rx)),
                        count.eq(count + 1),
                    ]
                    with m.If(count == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(rx):
                        m.d.comb += done.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.o_error.eq(1)
                        m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(rx):
                    m.next = "IDLE"

        with m.If(self.o_stream.ready):
            m.d.sync += self.o_stream.valid.eq(0)
        with m.If(done):
            with m.If(self.o_stream.valid & ~self.o_stream.ready):
                m.d.sync += self.o_overrun.eq(1)
            with m.Else():
                m.d.sync += [
                    self.o_stream.payload.eq(shreg),
                    self.o_stream.valid.eq(1),
                ]
        return m
