"""Link faults on purpose: a transport that damages, adds, removes, repeats or reorders traffic.

:class:`FaultyTransport` wraps any :class:`~host.transport.Transport` and, when
armed with :meth:`FaultyTransport.arm`, damages the traffic in one direction:
bytes written to the device (kinds ending in ``_tx``) or read from it (``_rx``).
Byte faults start at the ``at``-th byte of that direction from the arming:

* ``drop``: one byte lost;
* ``flip``: one bit inverted (bit ``bit`` of the byte);
* ``burst``: a burst error, the bytes from ``at`` on XORed with ``mask`` (see
  :func:`burst_mask`: a run of 17 to 64 bits whose first and last bits are
  inverted, which a CRC-16 need not catch);
* ``insert``: the bytes ``data`` inserted before byte ``at``;
* ``delete``: ``length`` bytes lost from ``at`` on;
* ``stuck``: a stuck line, ``length`` bytes from ``at`` on replaced by
  ``value`` (0x00 or 0xFF).

Frame faults count whole frames, ``at`` being the index of the frame from the
arming (a write is one frame; responses are cut into frames by their length
field):

* ``dup``: the frame goes over the line twice;
* ``reorder``: the frame is held back and goes after the next one.

Each armed fault fires once; :attr:`FaultyTransport.fired` lists what
happened, so a test can hold every fault against the error it must have caused.
:meth:`FaultyTransport.disarm` ends the faults; a frame still held back by a
``reorder`` then goes out late (a late request reaches the device, a late
response is read next), as it would on a line that delays it. It is used by the
soak (:mod:`sim.soak`) and works as well on a board's port.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from .protocol import CRC_BYTES, HEADER_BYTES, SYNC
from .transport import Transport

__all__ = ["FAULT_KINDS", "BYTE_FAULTS", "FRAME_FAULTS", "Fault", "FaultyTransport",
           "burst_mask", "BURST_BITS"]

BYTE_FAULTS = ("drop", "flip", "burst", "insert", "delete", "stuck")
FRAME_FAULTS = ("dup", "reorder")
FAULT_KINDS = tuple(f"{k}_{d}" for k in BYTE_FAULTS + FRAME_FAULTS for d in ("tx", "rx"))
# Burst lengths in bits: from one beyond what CRC-16 always catches to eight bytes.
BURST_BITS = (17, 64)
# The payload length follows SYNC and OP in a frame's header (little endian).
_LEN_OFFSET = 2


def burst_mask(bits: int, first_bit: int, rng: random.Random) -> bytes:
    """XOR mask of a burst error of exactly ``bits`` bits starting at bit ``first_bit``
    (0..7, least significant first) of its first byte: the burst's first and last bits
    are inverted, those between at random."""
    if not BURST_BITS[0] <= bits <= BURST_BITS[1] or not 0 <= first_bit < 8:
        raise ValueError(f"burst of {bits} bits at bit {first_bit}: accepted "
                         f"{BURST_BITS[0]}..{BURST_BITS[1]} bits at bit 0..7")
    pattern = 1 | (1 << (bits - 1)) | (rng.getrandbits(bits) & ((1 << bits) - 1))
    value = pattern << first_bit
    return value.to_bytes((first_bit + bits + 7) // 8, "little")


@dataclass
class Fault:
    kind: str
    at: int        # byte (or frame) index from the arming, in the fault's direction
    bit: int = 0   # the bit a flip inverts
    mask: bytes = b""    # burst: XOR mask from byte ``at`` on
    data: bytes = b""    # insert: the bytes inserted
    length: int = 1      # delete, stuck: bytes affected
    value: int = 0       # stuck: the byte the line is stuck at
    fired: bool = False
    original: bytes = b""   # the bytes as they were on the line (byte faults)
    seen: int = field(default=0, repr=False)      # bytes (frames) of the direction gone by
    held: bytes | None = field(default=None, repr=False)   # reorder: the frame held back

    @property
    def base(self) -> str:
        return self.kind.rsplit("_", 1)[0]

    @property
    def span(self) -> int:
        """Bytes of the line a byte fault changes (0 for an insertion)."""
        return {"drop": 1, "flip": 1, "burst": len(self.mask), "insert": 0,
                "delete": self.length, "stuck": self.length}[self.base]


class FaultyTransport(Transport):
    """``inner`` with at most one armed fault per direction."""

    def __init__(self, inner: Transport):
        super().__init__()
        self.inner = inner
        self._tx: Fault | None = None
        self._rx: Fault | None = None
        self._rx_buf = bytearray()     # response bytes held while a frame fault waits for frames
        self._late_rx = bytearray()    # bytes released by disarm, read next
        self.fired: list[Fault] = []

    @property
    def byte_seconds(self) -> float:
        return self.inner.byte_seconds

    @byte_seconds.setter
    def byte_seconds(self, value: float) -> None:
        self.inner.byte_seconds = value

    def arm(self, kind: str, at: int, bit: int = 0, *, mask: bytes = b"", data: bytes = b"",
            length: int = 1, value: int = 0) -> Fault:
        """Arm a fault of ``kind`` (one of :data:`FAULT_KINDS`) at byte or frame ``at``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: accepted {', '.join(FAULT_KINDS)}")
        if at < 0 or not 0 <= bit < 8:
            raise ValueError(f"fault {kind} at byte {at}, bit {bit}: need at >= 0 and 0 <= bit < 8")
        fault = Fault(kind, at, bit, mask=bytes(mask), data=bytes(data), length=length, value=value)
        base = fault.base
        if base == "burst" and not any(mask):
            raise ValueError(f"fault {kind}: a burst needs a mask with a bit set (burst_mask)")
        if base == "insert" and not data:
            raise ValueError(f"fault {kind}: an insertion needs at least one byte of data")
        if base in ("delete", "stuck") and length < 1:
            raise ValueError(f"fault {kind}: length {length}, accepted >= 1")
        if base == "stuck" and value not in (0x00, 0xFF):
            raise ValueError(f"fault {kind}: a line is stuck at 0x00 or 0xFF, got {value:#x}")
        if kind.endswith("_tx"):
            self._tx = fault
        else:
            self._rx = fault
        return fault

    def disarm(self) -> None:
        """End the armed faults; a frame held back goes out now (late)."""
        if self._tx is not None and self._tx.held is not None:
            self.inner.write(self._tx.held)
        if self._rx is not None and self._rx.held is not None:
            self._late_rx += self._rx.held
        self._late_rx += self._rx_buf
        self._rx_buf.clear()
        self._tx = self._rx = None

    # ---- byte faults ---------------------------------------------------------------

    def _fire(self, fault: Fault) -> None:
        if not fault.fired:
            fault.fired = True
            self.fired.append(fault)

    def _bytes(self, fault: Fault, data: bytes) -> tuple[bytes, Fault | None]:
        """``data``, the next bytes of the fault's direction, as the fault leaves them;
        the fault if it is not over."""
        start, end = fault.seen, fault.seen + len(data)
        fault.seen = end
        lo, hi = fault.at, fault.at + fault.span
        if fault.base == "insert":
            if not start <= lo < end:
                return data, fault
            i = lo - start
            self._fire(fault)
            return data[:i] + fault.data + data[i:], None
        s, e = max(lo, start), min(hi, end)
        if s >= e:
            return data, (None if start >= hi else fault)
        i, j = s - start, e - start
        self._fire(fault)
        fault.original += data[i:j]
        base = fault.base
        if base in ("drop", "delete"):
            mid = b""
        elif base == "flip":
            mid = bytes([data[i] ^ (1 << fault.bit)])
        elif base == "burst":
            m = fault.mask[s - lo:e - lo]
            mid = bytes(a ^ b for a, b in zip(data[i:j], m))
        else:  # stuck
            mid = bytes([fault.value]) * (j - i)
        return data[:i] + mid + data[j:], (None if end >= hi else fault)

    # ---- frame faults --------------------------------------------------------------

    def _frames_tx(self, fault: Fault, data: bytes) -> tuple[bytes, Fault | None]:
        """A write is one frame."""
        if fault.held is not None:                    # reorder: this one first
            held, fault.held = fault.held, None
            return data + held, None
        if fault.seen < fault.at:
            fault.seen += 1
            return data, fault
        self._fire(fault)
        if fault.base == "dup":
            return data + data, None
        fault.held = data
        return b"", fault

    def _frames_rx(self, fault: Fault, data: bytes) -> tuple[bytes, Fault | None]:
        """Responses cut into frames: bytes before a SYNC pass, a frame passes once whole."""
        buf = self._rx_buf
        buf += data
        out = bytearray()
        while fault is not None:
            i = buf.find(bytes([SYNC]))
            if i < 0:
                out += buf
                buf.clear()
                break
            out += buf[:i]
            del buf[:i]
            if len(buf) < HEADER_BYTES:
                break
            (length,) = struct.unpack_from("<H", buf, _LEN_OFFSET)
            end = HEADER_BYTES + length + CRC_BYTES
            if len(buf) < end:
                break
            frame = bytes(buf[:end])
            del buf[:end]
            if fault.held is not None:                # reorder: the next frame first
                out += frame + fault.held
                fault.held = None
                fault = None
            elif fault.seen < fault.at:
                fault.seen += 1
                out += frame
            else:
                self._fire(fault)
                if fault.base == "dup":
                    out += frame + frame
                    fault = None
                else:
                    fault.held = frame
        if fault is None:
            out += buf
            buf.clear()
        return bytes(out), fault

    # ---- transport -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        fault = self._tx
        if fault is not None:
            if fault.base in FRAME_FAULTS:
                data, self._tx = self._frames_tx(fault, data)
            else:
                data, self._tx = self._bytes(fault, data)
        if data:
            self.inner.write(data)

    def _read(self, n: int, timeout: float) -> bytes:
        if self._late_rx:
            data = bytes(self._late_rx[:n])
            del self._late_rx[:n]
            return data
        data = self.inner.read(n, timeout)
        fault = self._rx
        if fault is not None and (data or self._rx_buf):
            if fault.base in FRAME_FAULTS:
                data, self._rx = self._frames_rx(fault, data)
            else:
                data, self._rx = self._bytes(fault, data)
        return data

    def close(self) -> None:
        self.inner.close()
