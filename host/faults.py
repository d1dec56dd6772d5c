"""Link faults on purpose: a transport that drops or corrupts chosen bytes.

:class:`FaultyTransport` wraps any :class:`~host.transport.Transport` and, when
armed with :meth:`FaultyTransport.arm`, damages one byte of the traffic: the
``at``-th byte written to the device from now on (``drop_tx``, ``flip_tx``) or
the ``at``-th byte read from it (``drop_rx``, ``flip_rx``). A flip inverts one
bit. Each armed fault fires once; :attr:`FaultyTransport.fired` lists what
happened, so a test can hold every fault against the error it must have caused.
It is used by the soak (:mod:`sim.soak`) and works as well on a board's port.
"""

from __future__ import annotations

from dataclasses import dataclass

from .transport import Transport

__all__ = ["FAULT_KINDS", "Fault", "FaultyTransport"]

FAULT_KINDS = ("drop_tx", "flip_tx", "drop_rx", "flip_rx")


@dataclass
class Fault:
    kind: str
    at: int        # byte index from the arming, in the fault's direction
    bit: int = 0   # the bit a flip inverts
    fired: bool = False
    value: int | None = None   # the byte as it was on the line


class FaultyTransport(Transport):
    """``inner`` with at most one armed fault per direction."""

    def __init__(self, inner: Transport):
        super().__init__()
        self.inner = inner
        self._tx: Fault | None = None
        self._rx: Fault | None = None
        self.fired: list[Fault] = []

    def arm(self, kind: str, at: int, bit: int = 0) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: accepted {', '.join(FAULT_KINDS)}")
        if at < 0 or not 0 <= bit < 8:
            raise ValueError(f"fault {kind} at byte {at}, bit {bit}: need at >= 0 and 0 <= bit < 8")
        fault = Fault(kind, at, bit)
        if kind.endswith("_tx"):
            self._tx = fault
        else:
            self._rx = fault
        return fault

    def disarm(self) -> None:
        self._tx = self._rx = None

    def _damage(self, fault: Fault | None, data: bytes) -> tuple[bytes, Fault | None]:
        if fault is None:
            return data, None
        if fault.at >= len(data):
            fault.at -= len(data)
            return data, fault
        i = fault.at
        fault.value = data[i]
        fault.fired = True
        self.fired.append(fault)
        if fault.kind.startswith("drop"):
            return data[:i] + data[i + 1:], None
        return data[:i] + bytes([data[i] ^ (1 << fault.bit)]) + data[i + 1:], None

    def _write(self, data: bytes) -> None:
        data, self._tx = self._damage(self._tx, data)
        self.inner.write(data)

    def _read(self, n: int, timeout: float) -> bytes:
        data = self.inner.read(n, timeout)
        data, self._rx = self._damage(self._rx, data)
        return data

    def close(self) -> None:
        self.inner.close()
