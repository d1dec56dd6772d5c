"""The simulated board: the accelerator's RTL in a simulator, reachable on a TCP socket.

:class:`SimulatedBoard` elaborates :class:`hw.accelerator.Accelerator` for a
config, builds it once (Verilator or Icarus, cached by content), starts the
cocotb bench ``bench_board`` in a background thread and gives the URL the
driver opens (``socket://127.0.0.1:PORT``), exactly as it would open a board's
serial port. The board serves connections one after another (a second program
may open the URL once the first has closed it) and keeps its state between
them, as a board does. Leaving the ``with`` block ends the simulation.

The link of the simulated board is as fast as the simulator, not the config's
baud: :meth:`SimulatedBoard.measure_link` measures its time per byte once and
hands it to the transport, whose driver timeouts then grow with it.

:meth:`SimulatedBoard.reset_after` presses the board's reset button at a chosen
point of the traffic (after so many bytes in, cycles, bytes out), which is how
the soak (:mod:`sim.soak`) resets the device in the middle of a transfer.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from gen.config import AcceleratorConfig
from gen.contract import OP_READ, REQUESTS

__all__ = ["SimulatedBoard", "BoardError"]


class BoardError(RuntimeError):
    """The simulated board could not be built or started, or its simulation failed."""


class SimulatedBoard:
    """Context manager running the accelerator of ``config`` in ``simulator``.

    Parameters
    ----------
    config:
        The build's :class:`~gen.config.AcceleratorConfig`.
    simulator:
        ``"verilator"`` or ``"icarus"``.
    waves:
        Write a waveform file (FST for Verilator, VCD/FST for Icarus) in the build dir.
    start_timeout:
        Seconds to wait for the simulator to build and listen.
    fast_build:
        Compile Verilator's C++ without optimization: builds faster, simulates slower.
    """

    def __init__(self, config: AcceleratorConfig, simulator: str = "verilator", *,
                 waves: bool = False, start_timeout: float = 900.0, fast_build: bool = False):
        self.config = config
        self.simulator = simulator
        self.waves = waves
        self.start_timeout = start_timeout
        self.fast_build = fast_build
        self.url: str | None = None
        self.build_dir: Path | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mlg-board-")
        self._ctl_port: int | None = None
        self._ctl: socket.socket | None = None
        self._ctl_buf = b""
        self.resets_fired = 0

    def __enter__(self) -> "SimulatedBoard":
        from hw.accelerator import Accelerator
        from sim.runner import run_bench, simulator_available

        if not simulator_available(self.simulator):
            raise BoardError(f"simulator {self.simulator!r} is not installed")
        port_file = Path(self._tmp.name) / "port"
        env = {"MLG_BOARD_PORT": 0, "MLG_BOARD_PORT_FILE": port_file}

        def target():
            try:
                self.build_dir = run_bench(Accelerator(self.config), "mlg_accelerator", "bench_board",
                                           self.simulator, extra_env=env, waves=self.waves,
                                           fast_build=self.fast_build).parent
            except BaseException as e:  # reported to the caller's thread
                self._error = e

        self._thread = threading.Thread(target=target, name="mlg-board", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists() or not port_file.read_text():
            if not self._thread.is_alive():
                raise BoardError(f"the simulated board stopped before listening: {self._error}")
            if time.monotonic() > deadline:
                raise BoardError(f"the simulated board did not start within {self.start_timeout:.0f} s")
            time.sleep(0.05)
        port, ctl_port = (int(w) for w in port_file.read_text().split())
        self.url = f"socket://127.0.0.1:{port}"
        self._ctl_port = ctl_port
        # The control connection stays open while the board runs: the bench ends
        # when it closes, so a board whose host is gone does not run on.
        self._connect_control()
        return self

    def measure_link(self, transport, *, timeout: float, n_bytes: int = 2048) -> float:
        """Measure the seconds one byte takes on the simulated link and set
        ``transport.byte_seconds`` to it; returns it.

        One IDENTIFY (waited for ``timeout`` seconds) gives a first bound per byte,
        then a READ of ``n_bytes`` of the base store (at most its size) is timed: its
        request and answer bytes over its time, fixed costs included, so the figure
        errs on the slow side.
        """
        from host.driver import Driver
        from host.protocol import CRC_BYTES, HEADER_BYTES, REGION_BASES

        if not timeout > 0:
            raise ValueError(f"measure_link: timeout {timeout!r}, accepted seconds > 0")
        drv = Driver(transport, timeout=timeout)
        t0 = time.monotonic()
        ident = drv.identify()
        first = (time.monotonic() - t0) / (2 * HEADER_BYTES + 2 * CRC_BYTES + 2)
        n = max(1, min(n_bytes, self.config.base_store_bytes, ident.max_payload))
        moved = 2 * (HEADER_BYTES + CRC_BYTES) + 7 + n
        t0 = time.monotonic()
        drv.request(OP_READ, REQUESTS[OP_READ].pack_args(REGION_BASES, 0, n),
                    timeout=timeout + 4 * first * moved)
        transport.byte_seconds = (time.monotonic() - t0) / moved
        return transport.byte_seconds

    def reset_after(self, rx: int = 0, cycles: int = 0, tx: int = 0) -> None:
        """Arm one reset of the board: it fires once the device has taken ``rx`` more
        bytes from the line, then ``cycles`` cycles have passed and it has sent ``tx``
        more bytes. Bytes on the line at that moment are lost."""
        for name, v in (("rx", rx), ("cycles", cycles), ("tx", tx)):
            if v < 0:
                raise ValueError(f"reset_after: {name}={v} must be >= 0")
        self._control(f"reset {rx} {cycles} {tx}")

    def disarm(self) -> None:
        """Forget a reset armed by :meth:`reset_after` that has not fired."""
        self._control("disarm")

    def _connect_control(self) -> None:
        if self._ctl is None:
            if self._ctl_port is None:
                raise BoardError("the simulated board is not running")
            self._ctl = socket.create_connection(("127.0.0.1", self._ctl_port),
                                                 timeout=self.start_timeout)

    def _control(self, command: str) -> None:
        self._connect_control()
        self._ctl.sendall(f"{command}\n".encode())
        while True:
            line = self._control_line()
            if line == "ok":
                return
            if not line.startswith("reset "):
                raise BoardError(f"board control refused {command!r}: {line}")

    def resets(self) -> int:
        """Resets fired so far (notices read from the control port without waiting)."""
        if self._ctl is not None:
            self._ctl.setblocking(False)
            try:
                while True:
                    data = self._ctl.recv(4096)
                    if not data:
                        break
                    self._ctl_buf += data
            except BlockingIOError:
                pass
            finally:
                self._ctl.setblocking(True)
            *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
            self.resets_fired += sum(1 for ln in lines if ln.startswith(b"reset "))
        return self.resets_fired

    def _control_line(self) -> str:
        while b"\n" not in self._ctl_buf:
            data = self._ctl.recv(4096)
            if not data:
                raise BoardError("the simulated board closed its control port")
            self._ctl_buf += data
        line, _, self._ctl_buf = self._ctl_buf.partition(b"\n")
        text = line.decode(errors="replace")
        if text.startswith("reset "):
            self.resets_fired += 1
        return text

    def close(self, timeout: float = 60.0) -> None:
        """Stop the simulation (once the driver's connection is closed) and wait
        ``timeout`` seconds for it to end."""
        if self._ctl is not None:
            try:
                self._ctl.sendall(b"stop\n")
            except OSError:
                pass            # the bench has ended already
            self._ctl.close()
            self._ctl = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._tmp.cleanup()
        if self._error is not None:
            err, self._error = self._error, None
            raise BoardError(f"simulation of the board failed: {err}")

    def __exit__(self, *exc):
        self.close()
