"""The simulated board: the accelerator's RTL in a simulator, reachable on a TCP socket.

:class:`SimulatedBoard` elaborates :class:`hw.accelerator.Accelerator` for a
config, builds it once (Verilator or Icarus, cached by content), starts the
cocotb bench ``bench_board`` in a background thread and gives the URL the
driver opens (``socket://127.0.0.1:PORT``), exactly as it would open a board's
serial port. Leaving the ``with`` block closes the connection and ends the
simulation.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from gen.config import AcceleratorConfig

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
        self.url = f"socket://127.0.0.1:{int(port_file.read_text())}"
        return self

    def close(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._tmp.cleanup()
        if self._error is not None:
            err, self._error = self._error, None
            raise BoardError(f"simulation of the board failed: {err}")

    def __exit__(self, *exc):
        self.close()
