"""Packed code stream -> codes of a run-time width, and the code decode to values.

The program file packs the codes of a tensor as one LSB-first bit stream: code
``i`` of width ``q`` occupies bits ``[i*q, (i+1)*q)``, bit ``n`` sits in byte
``n // 8`` at position ``n % 8``. :class:`CodeUnpacker` turns a stream of such
words back into codes; the width may change between codes (the B, U and V
sections of a layer have different widths), and a code may straddle two words.

:func:`decode_code` (elaboration-time width) and :class:`CodeDecoder` (run-time
width) turn a raw code into its integer value exactly as
``gen.integer.decode_codes`` does.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import DECODE_FORMS, code_value_bits

__all__ = ["CodeUnpacker", "CodeDecoder", "decode_code", "MAX_CODE_BITS"]

MAX_CODE_BITS = 8


def _check_form(form: str) -> None:
    if form not in DECODE_FORMS:
        raise ValueError(f"decode form {form!r} is not one of {', '.join(DECODE_FORMS)}")


def decode_code(code: Value, bits: int, form: str) -> Value:
    """Integer value of a raw ``bits``-wide code, as ``gen.integer.decode_codes``.

    Returns a signed value of ``code_value_bits(bits, form)`` bits. ``signed``
    reinterprets the code as two's complement; ``odd`` is ``2c - (2**bits - 1)``,
    which is the code shifted left with a 1 appended and its top bit inverted
    (no adder).
    """
    _check_form(form)
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"code width {bits} out of range; accepted 1..{MAX_CODE_BITS}")
    code = Value.cast(code)[:bits]
    if form == "signed":
        return code.as_signed()
    return Cat(Const(1, 1), code[:-1], ~code[-1]).as_signed()


class CodeDecoder(wiring.Component):
    """Combinational decode of a code whose width is chosen at run time.

    Parameters
    ----------
    form:
        ``"signed"`` or ``"odd"`` (see :func:`decode_code`).
    max_bits:
        Widest code, 1..8.

    Members
    -------
    code: In(unsigned(max_bits))
        Raw code; bits at and above ``width`` are ignored.
    width: In(range(max_bits + 1))
        Code width, 1..max_bits.
    value: Out(signed(code_value_bits(max_bits, form)))
    """

    def __init__(self, form: str, max_bits: int = MAX_CODE_BITS):
        _check_form(form)
        if not 1 <= max_bits <= MAX_CODE_BITS:
            raise ValueError(f"max_bits {max_bits} out of range; accepted 1..{MAX_CODE_BITS}")
        self.form = form
        self.max_bits = max_bits
        super().__init__({
            "code": In(unsigned(max_bits)),
            "width": In(range(max_bits + 1)),
            "value": Out(signed(code_value_bits(max_bits, form))),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.max_bits
        full = Const(1, n + 2) << self.width
        mask = (full - 1)[:n]
        code = Signal(n + 2)
        m.d.comb += code.eq(self.code & mask)
        if self.form == "signed":
            sign = code.bit_select((self.width - 1)[:len(self.width)], 1)
            m.d.comb += self.value.eq(Mux(sign, code.as_signed() - full.as_signed(), code))
        else:
            m.d.comb += self.value.eq((code << 1).as_signed() + 1 - full.as_signed())
        return m


class CodeUnpacker(wiring.Component):
    """Unpack an LSB-first packed word stream into codes of a run-time width.

    Words enter on ``i_stream`` and fill a bit buffer of ``word_bits +
    2 * max_code_bits`` bits; a code of ``width`` bits leaves on ``o_stream`` as
    soon as that many bits are buffered, so codes straddling word boundaries
    need no special case. With a steady input the unpacker sustains one code
    per cycle at every width.

    ``width`` may change between codes but must be stable while ``o_stream``
    is valid. Asserting ``align`` for one cycle (while ``o_stream`` is not
    being read) drops the bits left in the current byte, so the next code
    starts on a byte boundary of the stream, as a section or a layer packed
    into whole bytes requires.

    Parameters
    ----------
    word_bits:
        Width of an input word, a multiple of 8.
    max_code_bits:
        Widest code, 1..8.
    byte_window:
        (8-bit words only) Keep whole bytes in a window of three and the bits used
        of the first in an offset: a code is read through one narrow shifter by the
        offset, and bytes enter and leave the window whole. Fewer logic cells than
        the bit buffer, whose every bit can shift by any amount, and a longer path
        through the handshakes: for slower clocks.

    Members
    -------
    i_stream: In(stream.Signature(unsigned(word_bits)))
    o_stream: Out(stream.Signature(unsigned(max_code_bits)))
        Raw code in the low ``width`` bits, zeros above.
    width: In(range(max_code_bits + 1))
    align: In(1)
    """

    def __init__(self, word_bits: int = 8, max_code_bits: int = MAX_CODE_BITS, *,
                 byte_window: bool = False):
        if word_bits < 8 or word_bits % 8:
            raise ValueError(f"word_bits {word_bits} must be a positive multiple of 8")
        if not 1 <= max_code_bits <= MAX_CODE_BITS:
            raise ValueError(f"max_code_bits {max_code_bits} out of range; accepted 1..{MAX_CODE_BITS}")
        self.word_bits = word_bits
        self.max_code_bits = max_code_bits
        if byte_window and word_bits != 8:
            raise ValueError(f"byte_window needs word_bits 8, not {word_bits}")
        self.byte_window = bool(byte_window)
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(word_bits))),
            "o_stream": Out(stream.Signature(unsigned(max_code_bits))),
            "width": In(range(max_code_bits + 1)),
            "align": In(1),
        })

    def elaborate(self, platform):
        if self.byte_window:
            return self._elaborate_window()
        m = Module()
        W, Q = self.word_bits, self.max_code_bits
        # A word is taken while at most 2*Q bits are buffered, so at least Q
        # bits remain after any code leaves: one code per cycle at every width.
        cap = W + 2 * Q
        buf = Signal(cap)
        count = Signal(range(cap + 1))

        # The count compares are registers, kept with the count: ``ge[w]`` is
        # count >= w, ``room`` is count <= cap - W (a word fits). The handshakes then
        # start from flip-flops and a small select, not from a carry chain.
        ge = Signal(Q + 1, init=1)
        room = Signal(init=1)
        # The payload mask is a table of the width (no shift and subtract).
        mask = self._width_mask(m)
        m.d.comb += [
            # (a width of 0 selects a constant 0: no code leaves)
            self.o_stream.valid.eq(Cat(Const(0, 1), ge[1:]).bit_select(self.width, 1)
                                   & ~self.align),
            self.o_stream.payload.eq(buf[:Q] & mask),
            self.i_stream.ready.eq(room),
        ]

        # The new word is placed above the buffered bits (a shift by the registered
        # count). The next state is worked out for each way bits can leave (a code of
        # ``width`` bits, the rest of a byte on ``align``, none) in parallel, and the
        # code handshake, which arrives last, only selects among them.
        take = self.i_stream.valid & self.i_stream.ready
        merged = Signal(cap)
        total = Signal(range(cap + 1))
        with m.If(take):
            m.d.comb += [merged.eq(buf | (self.i_stream.payload << count)), total.eq(count + W)]
        with m.Else():
            m.d.comb += [merged.eq(buf), total.eq(count)]

        def leave(drop, name):
            nxt = Signal.like(count, name=f"nxt_{name}")
            m.d.comb += nxt.eq(total - drop)
            return [buf.eq(merged >> drop), count.eq(nxt), room.eq(nxt <= cap - W),
                    *[ge[w].eq(nxt >= w) for w in range(Q + 1)]]

        with m.If(self.o_stream.valid & self.o_stream.ready):
            m.d.sync += leave(self.width, "code")
        with m.Elif(self.align):
            m.d.sync += leave(count[:3], "align")
        with m.Else():
            m.d.sync += leave(0, "keep")
        return m

    def _width_mask(self, m):
        """``width`` ones, from a table of the width."""
        Q = self.max_code_bits
        mask = Signal(Q, name="mask")
        with m.Switch(self.width):
            for w in range(Q + 1):
                with m.Case(w):
                    m.d.comb += mask.eq((1 << w) - 1)
            with m.Default():
                m.d.comb += mask.eq((1 << Q) - 1)
        return mask

    def _elaborate_window(self):
        m = Module()
        Q = self.max_code_bits
        win = Signal(24)            # bytes 0..n_bytes-1 hold stream bytes, byte 0 first
        n_bytes = Signal(range(4))
        off = Signal(3)             # bits of byte 0 already used
        avail = Signal(range(25))   # n_bytes * 8 - off, kept with them
        # (The handshake compares the width with constants on the register.)
        fits = Signal(Q + 1)
        m.d.comb += [fits[w].eq(avail >= w) for w in range(1, Q + 1)]
        mask = self._width_mask(m)
        m.d.comb += [
            # (a width of 0 selects fits[0], a constant 0: no code leaves)
            self.o_stream.valid.eq(fits.bit_select(self.width, 1) & ~self.align),
            self.o_stream.payload.eq((win[:Q + 7] >> off)[:Q] & mask),
            self.i_stream.ready.eq(n_bytes != 3),
        ]
        # Bits leaving: a code, or on align the rest of byte 0; at most one whole byte.
        drop = Signal(4)
        with m.If(self.o_stream.valid & self.o_stream.ready):
            m.d.comb += drop.eq(self.width)
        with m.Elif(self.align & (off != 0)):
            m.d.comb += drop.eq(8 - off)
        used = Signal(4)
        m.d.comb += used.eq(off + drop)
        kept = Signal(24)
        left = Signal(range(4))
        m.d.comb += [kept.eq(Mux(used[3], win >> 8, win)), left.eq(n_bytes - used[3])]
        take = self.i_stream.valid & self.i_stream.ready
        n_next = Signal(range(4))
        m.d.comb += n_next.eq(left + take)
        m.d.sync += [off.eq(used[:3]), win.eq(kept), n_bytes.eq(n_next),
                     avail.eq((n_next << 3) - used[:3])]
        with m.If(take):
            m.d.sync += win.word_select(left[:2], 8).eq(self.i_stream.payload)
        return m
