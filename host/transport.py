"""Byte transports between the driver and a device: a board, or the simulated board.

A :class:`Transport` moves bytes and counts them; it knows nothing of frames.
:class:`SerialTransport` opens any pyserial URL: ``/dev/ttyUSB0`` for a board,
``socket://127.0.0.1:PORT`` for the simulated board (:mod:`sim.board`),
``loop://`` for tests of the driver itself.
"""

from __future__ import annotations

__all__ = ["Transport", "SerialTransport", "TransportError", "url_problem", "UART_BITS_PER_BYTE"]

# What a URL of a device may look like (said by every error about one).
ACCEPTED_URLS = ("a serial device (/dev/ttyUSB0, COM3), or socket://HOST:PORT with PORT "
                 "1..65535 (the simulated board's URL, e.g. socket://127.0.0.1:5000)")


class TransportError(OSError):
    """The transport cannot be opened or has failed."""


def url_problem(url: str, device: bool = True) -> str | None:
    """What is wrong with the pyserial URL ``url`` (a message that says what is accepted),
    or None. Only its form is checked, nothing is opened. ``socket://`` and
    ``rfc2217://`` need ``HOST:PORT`` with a port number; with ``device``, ``loop://``
    (which echoes every byte back and has no device behind it) is refused."""
    if not isinstance(url, str) or not url.strip():
        return f"no URL given; accepted: {ACCEPTED_URLS}"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None                      # a device path, opened as it is
    scheme = scheme.lower()
    if scheme == "loop":
        if device:
            return ("loop:// echoes every request back and has no device behind it (it "
                    f"serves tests of the driver); accepted: {ACCEPTED_URLS}")
        return None
    if scheme in ("socket", "rfc2217"):
        address = rest.split("?", 1)[0].rstrip("/")
        host, colon, port = address.rpartition(":")
        example = f"{scheme}://127.0.0.1:5000"
        if not colon or not host:
            return (f"{scheme}:// needs HOST:PORT, got {address!r}; accepted: "
                    f"{scheme}://HOST:PORT with PORT 1..65535, e.g. {example}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            what = "is not a number" if not port.isdigit() else "is out of range"
            return (f"port {port!r} {what}; accepted: {scheme}://HOST:PORT with PORT "
                    f"1..65535, e.g. {example}")
    return None


# Bits on the line per byte of a UART: a start bit, eight data bits, a stop bit.
UART_BITS_PER_BYTE = 10


class Transport:
    """Abstract byte pipe. Subclasses implement :meth:`_write`, :meth:`_read`, :meth:`close`.

    :attr:`byte_seconds` is the time one byte takes on the link (0 if unknown): a
    serial port sets it from its baud; for the simulated board, whose speed is the
    simulator's, :meth:`sim.board.SimulatedBoard.measure_link` measures it. The
    driver's timeouts grow with it (:meth:`host.driver.Driver.wait_seconds`).
    """

    byte_seconds: float = 0.0

    def __init__(self):
        self.bytes_sent = 0
        self.bytes_received = 0

    def write(self, data: bytes) -> None:
        self._write(bytes(data))
        self.bytes_sent += len(data)

    def read(self, n: int, timeout: float) -> bytes:
        """Up to ``n`` bytes; waits at most ``timeout`` seconds for the first one."""
        data = self._read(n, timeout)
        self.bytes_received += len(data)
        return data

    def drain(self, quiet: float = 0.05) -> bytes:
        """Read and return whatever arrives until the line has been quiet for ``quiet`` s."""
        out = bytearray()
        while True:
            chunk = self.read(4096, quiet)
            if not chunk:
                return bytes(out)
            out += chunk

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _read(self, n: int, timeout: float) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialTransport(Transport):
    """A pyserial URL (``/dev/ttyUSB0``, ``socket://host:port``, ``loop://``)."""

    def __init__(self, url: str, baud: int = 3_000_000):
        super().__init__()
        import serial

        self.url = url
        if not isinstance(baud, int) or baud < 1:
            raise TransportError(f"cannot open {url!r}: baud {baud!r}, accepted an integer >= 1")
        self.byte_seconds = UART_BITS_PER_BYTE / baud
        problem = url_problem(url, device=False)
        if problem:
            raise TransportError(f"cannot open {url!r}: {problem}")
        try:
            self.port = serial.serial_for_url(url, baudrate=baud, timeout=0.1)
        except (serial.SerialException, ValueError) as e:
            hint = ""
            if "Connection refused" in str(e):
                hint = ("; nothing accepts connections at that address: is the simulated "
                        "board (sim.board.SimulatedBoard) running, on the port its url gives?")
            elif "protocol" in str(e) and "not known" in str(e):
                hint = f"; accepted: {ACCEPTED_URLS}"
            raise TransportError(f"cannot open {url!r}: {e}{hint}") from None

    def _write(self, data: bytes) -> None:
        import serial

        try:
            self.port.write(data)
            self.port.flush()
        except serial.SerialException as e:
            raise TransportError(f"{self.url}: write failed: {e}") from None

    def _read(self, n: int, timeout: float) -> bytes:
        import serial

        self.port.timeout = timeout
        try:
            first = self.port.read(1)
            if not first:
                return b""
            waiting = self.port.in_waiting
            rest = self.port.read(min(n - 1, waiting)) if waiting and n > 1 else b""
        except serial.SerialException as e:
            raise TransportError(f"{self.url}: read failed: {e}") from None
        return first + rest

    def close(self) -> None:
        self.port.close()
