"""The host driver: identifies the accelerator, loads a program, runs images, reads counters.

A :class:`Driver` speaks :mod:`host.protocol` over any :class:`~host.transport.Transport`,
so the same code drives a board (UART) and the simulated board (TCP bridge).
Every request carries a new tag and waits for the one response with that tag;
an answer with another tag (a late answer to an earlier request) is dropped and
counted in :attr:`Driver.stale`. A missing response raises :class:`LinkTimeout`,
an error frame :class:`DeviceError` naming the device's error and the request, a
device built for another config :class:`IdentityMismatch`, a result asked of a
run that stopped in the error state :class:`RunError`.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import torch

from gen.config import AcceleratorConfig
from gen.contract import (ARG_BYTES, COUNTER_BYTES, ERR_NO_RESULT, REQUESTS, RUN_ERRORS, STATUS,
                          TAGS)
from gen.integer import int_range
from gen.program import Program, load_program

from .image import DeviceImage, build_image
from .protocol import (COUNTERS, LOG_COUNTERS, REGION_LOG, CRC_BYTES, ERRORS, HEADER_BYTES,
                       IDENTITY_BYTES, REGION_NAMES, OP_ABORT, OP_COUNTERS, OP_ERROR, OP_IDENTIFY,
                       OP_LOAD_ACT, OP_NAMES, OP_READ, OP_READ_ACT, OP_RUN, OP_STATUS, OP_WRITE,
                       PROTOCOL_VERSION, REGION_BASES, REGION_CONSTS, REGION_PROGRAM,
                       REGION_STREAM, RESPONSE,
                       STATE_DONE, STATE_ERROR, STATE_NAMES, STATE_RUNNING, FrameDecoder,
                       Identity, ProtocolError, encode_frame, parse_identity)
from .transport import Transport

__all__ = ["Driver", "DriverError", "LinkTimeout", "DeviceError", "IdentityMismatch",
           "RunError", "Status"]


class DriverError(Exception):
    """Base of the driver's errors."""


class LinkTimeout(DriverError):
    """The device did not answer in time."""


class DeviceError(DriverError):
    """The device refused a request with an error frame."""

    def __init__(self, code: int, op: int):
        self.code, self.op = code, op
        super().__init__(f"device refused {OP_NAMES.get(op, f'opcode 0x{op:02x}')}: "
                         f"{ERRORS.get(code, f'error {code}')}")


class IdentityMismatch(DriverError):
    """The device was built for another AcceleratorConfig than the program."""


class RunError(DriverError):
    """A run ended in the error state or did not finish in time."""


@dataclass(frozen=True)
class Status:
    state: int
    error: int
    layer: int

    @property
    def name(self) -> str:
        return STATE_NAMES.get(self.state, f"state {self.state}")


class Driver:
    """Driver of one accelerator over ``transport``.

    Parameters
    ----------
    transport:
        The byte pipe.
    timeout:
        Seconds to wait for a response, on top of the time its bytes take on the
        link (see :meth:`wait_seconds`).
    margin:
        Factor on the time the bytes of a request and its response take on the
        link (the transport's ``byte_seconds``), for a slow or loaded link.
    progress:
        Show progress bars on long transfers.
    """

    def __init__(self, transport: Transport, *, timeout: float = 5.0, margin: float = 2.0,
                 progress: bool = False):
        if not timeout > 0:
            raise ValueError(f"timeout {timeout!r}: accepted seconds > 0")
        if not margin >= 1:
            raise ValueError(f"margin {margin!r}: accepted a factor >= 1")
        self.transport = transport
        self.timeout = timeout
        self.margin = margin
        self.progress = progress
        self.decoder = FrameDecoder()
        self.tag = 0      # the tag of the next request
        self.stale = 0    # answers dropped because their tag was not the one awaited
        self.identity: Identity | None = None
        self.config: AcceleratorConfig | None = None
        self.program: Program | None = None
        self.image: DeviceImage | None = None

    # ---- frames -----------------------------------------------------------------------

    def request(self, op: int, payload: bytes = b"", timeout: float | None = None) -> bytes:
        """Send one request and return its response payload: the first frame that
        carries the request's tag (frames with another tag are dropped and counted
        in :attr:`stale`), waited for :meth:`wait_seconds` of the bytes both move
        (or ``timeout`` seconds)."""
        tag, self.tag = self.tag, (self.tag + 1) % TAGS
        sent = encode_frame(op, payload, tag)
        self.transport.write(sent)
        if timeout is None:
            timeout = self.wait_seconds(len(sent) + self._answer_bytes(op, payload))
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.pop()
            if frame is not None and frame.tag != tag:
                self.stale += 1
                continue
            if frame is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"no response to {OP_NAMES.get(op, op)} within "
                                  f"{timeout:.1f} s")
            chunk = self.transport.read(65536, min(left, 0.5))
            if chunk:
                try:
                    self.decoder.feed(chunk)
                except ProtocolError as e:
                    raise DriverError(f"corrupt response to {OP_NAMES.get(op, op)}: {e}") from None
        if frame.op == OP_ERROR:
            try:
                code, req = frame.error()
            except ProtocolError as e:
                raise DriverError(f"malformed answer to {OP_NAMES.get(op, op)}: {e}") from None
            raise DeviceError(code, req)
        if frame.op != op | RESPONSE:
            raise DriverError(f"response opcode 0x{frame.op:02x} to {OP_NAMES.get(op, op)}, "
                              f"expected 0x{op | RESPONSE:02x}")
        return frame.payload

    def wait_seconds(self, n_bytes: int) -> float:
        """Seconds to wait for a request whose frame and answer move ``n_bytes`` bytes:
        ``timeout + margin * n_bytes * byte_seconds`` (the transport's time per byte)."""
        return self.timeout + self.margin * n_bytes * self.transport.byte_seconds

    def _answer_bytes(self, op: int, payload: bytes) -> int:
        """Bytes of the answer to request ``op`` with ``payload`` (its frame overhead
        included), as far as the request says; a short answer otherwise."""
        n = 0
        if op == OP_READ and len(payload) >= ARG_BYTES[OP_READ]:
            (n,) = struct.unpack_from("<H", payload, ARG_BYTES[OP_READ] - 2)
        elif op == OP_READ_ACT and len(payload) >= ARG_BYTES[OP_READ_ACT]:
            _, channels, pixels = struct.unpack_from(REQUESTS[OP_READ_ACT].arg_format, payload)
            n = channels * pixels * (self.identity.act_bytes if self.identity else 4)
        elif op == OP_COUNTERS:
            n = COUNTER_BYTES * len(COUNTERS)
        elif op == OP_IDENTIFY:
            n = IDENTITY_BYTES
        elif op == OP_STATUS:
            n = STATUS.size
        return HEADER_BYTES + max(n, 2) + CRC_BYTES

    def resync(self) -> bytes:
        """Forget partial input: drain the line and clear the decoder; returns what was dropped."""
        self.decoder = FrameDecoder()
        return self.transport.drain()

    def recover(self, attempts: int = 3, quiet: float = 0.3) -> Identity:
        """Bring the link back to a known state after a failed request.

        Sends zero bytes enough to complete any frame the device may be part way
        through (it answers it with an error frame; between frames it skips zeros),
        drains the line until it has been quiet for ``quiet`` seconds (at least
        ``margin`` times the time those bytes take on the link), and checks
        that IDENTIFY is answered. A run still going on is aborted. What the failed
        request did is unknown: :meth:`verify_image` says whether the device's
        memories still hold the loaded program.
        """
        fill = (self.identity.max_payload if self.identity else 0xFFFF) + HEADER_BYTES + CRC_BYTES + 2
        quiet = max(quiet, self.margin * fill * self.transport.byte_seconds)
        last: Exception | None = None
        for _ in range(attempts):
            self.transport.write(bytes(fill))
            self.transport.drain(quiet)
            self.decoder = FrameDecoder()
            try:
                ident = self.identify()
                if self.status().state == STATE_RUNNING:
                    self.abort()
                return ident
            except DriverError as e:
                last = e
        raise LinkTimeout(f"the link did not recover after {attempts} attempts: {last}")

    def verify_image(self) -> list[str]:
        """Read the loaded program's records, bases and constants back from the device;
        returns the regions that differ from what :meth:`load_program` wrote."""
        image = self._image()
        bad = []
        for region, data in ((REGION_PROGRAM, image.records), (REGION_BASES, image.bases),
                             (REGION_CONSTS, image.consts)):
            if data and self.read(region, 0, len(data)) != data:
                bad.append(REGION_NAMES[region])
        return bad

    # ---- device ------------------------------------------------------------------------

    def identify(self) -> Identity:
        try:
            ident = parse_identity(self.request(OP_IDENTIFY))
        except ProtocolError as e:
            raise DriverError(f"malformed answer to IDENTIFY: {e}") from None
        if ident.protocol != PROTOCOL_VERSION:
            raise DriverError(f"device speaks protocol version {ident.protocol}; this driver "
                              f"speaks {PROTOCOL_VERSION}")
        self.identity = ident
        return ident

    def attach(self, config: AcceleratorConfig, program: Program) -> Identity:
        """Identify the device and check that it, ``config`` and ``program`` agree."""
        if program.config_digest != config.digest:
            raise IdentityMismatch(
                f"program is built for config {program.config_hash[:16]}, the config given is "
                f"{config.hash_hex[:16]}")
        ident = self.identify()
        if ident.config_digest != config.digest:
            raise IdentityMismatch(
                f"device is built for config {ident.config_hash[:16]}, the program for "
                f"{config.hash_hex[:16]}: rebuild the bitstream (or simulator) from this "
                "build's config.json")
        self.config, self.program = config, program
        return ident

    def write(self, region: int, addr: int, data: bytes, desc: str = "",
              timeout: float | None = None) -> None:
        """Write ``data`` at ``addr`` of ``region`` in frames of at most ``max_payload``
        bytes (``REGION_STREAM`` takes every frame at address 0)."""
        ident = self._ident()
        word = {REGION_PROGRAM: ident.record_bytes, REGION_CONSTS: ident.const_bytes}.get(region, 1)
        step = (ident.max_payload - ARG_BYTES[OP_WRITE]) // word * word
        bar = self._bar(len(data), desc or f"write region {region}")
        for off in range(0, len(data), step):
            chunk = data[off:off + step]
            where = 0 if region == REGION_STREAM else addr + off
            self.request(OP_WRITE, REQUESTS[OP_WRITE].pack_args(region, where) + chunk,
                         timeout=timeout)
            if bar:
                bar.update(len(chunk))
        if bar:
            bar.close()

    def read(self, region: int, addr: int, count: int) -> bytes:
        out = bytearray()
        for off in range(0, count, 0xFFFF):
            n = min(0xFFFF, count - off)
            out += self._sized(OP_READ, n, REQUESTS[OP_READ].pack_args(region, addr + off, n))
        return bytes(out)

    def load_program(self, config: AcceleratorConfig, program: Program | str) -> DeviceImage:
        """Check identity, then write the program's records, bases and constants."""
        if not isinstance(program, Program):
            program = load_program(program, config)
        self.attach(config, program)
        image = build_image(program, config)
        self.write(REGION_PROGRAM, 0, image.records, "layer records")
        self.write(REGION_BASES, 0, image.bases, "bases")
        self.write(REGION_CONSTS, 0, image.consts, "constants")
        self.image = image
        return image

    def status(self) -> Status:
        state, error, layer = STATUS.unpack(self._sized(OP_STATUS, STATUS.size))
        return Status(state, error, layer)

    def counters(self) -> dict[str, int]:
        raw = self._sized(OP_COUNTERS, COUNTER_BYTES * len(COUNTERS))
        values = struct.unpack(f"<{len(COUNTERS)}Q", raw)
        return dict(zip(COUNTERS, values))

    def layer_log(self, n_layers: int | None = None) -> list[dict[str, int]]:
        """Per-layer counters of the last run (``REGION_LOG``), for its first
        ``n_layers`` layers (default: the loaded program's).

        Each layer's entry holds what the counters of :data:`LOG_COUNTERS` gained
        from the end of the previous layer to the end of this one (``cycles`` is the
        layer's share of the run's cycles), plus ``end``, the cycle it ended at.
        """
        n = n_layers if n_layers is not None else self._image().n_layers
        words = len(LOG_COUNTERS)
        config = self.config
        if config is not None and not config.layer_log:
            raise DriverError(f"the device's config ({config.hash_hex[:16]}) has no layer log "
                              "(layer_log = false); compile without --no-layer-log to have one")
        limit = config.max_layers if config is not None else n
        if not 0 < n <= limit:
            raise DriverError(f"layer log has entries for 1..{limit} layers, asked for {n}")
        raw = self.read(REGION_LOG, 0, n * words * COUNTER_BYTES)
        values = struct.unpack(f"<{n * words}Q", raw)
        # Counters wrap at 2**counter_bits: a layer's share is a difference modulo that.
        wrap = (1 << config.counter_bits) - 1 if config is not None else (1 << 64) - 1
        out, prev = [], dict.fromkeys(LOG_COUNTERS, 0)
        for i in range(n):
            snap = dict(zip(LOG_COUNTERS, values[i * words:(i + 1) * words]))
            entry = {k: (snap[k] - prev[k]) & wrap for k in LOG_COUNTERS}
            entry["end"] = snap["cycles"]
            out.append(entry)
            prev = snap
        return out

    def abort(self) -> None:
        self.request(OP_ABORT)

    def run(self, n_layers: int | None = None, timeout: float = 60.0) -> Status:
        """Run the loaded program (or its first ``n_layers``) and wait until it ends."""
        image = self._image()
        n = n_layers if n_layers is not None else image.n_layers
        self.request(OP_RUN, REQUESTS[OP_RUN].pack_args(n))
        deadline = time.monotonic() + timeout
        # Codes of the layers that are not resident follow RUN; each WRITE is answered
        # once the device has room for it, so this paces itself to the generation unit.
        for index, blob in image.streamed:
            if index < n:
                self.write(REGION_STREAM, 0, blob, "streamed codes", timeout=timeout)
        poll = 0.001
        while True:
            st = self.status()
            if st.state == STATE_DONE:
                return st
            if st.state == STATE_ERROR:
                raise RunError(_stopped(st))
            if st.state != STATE_RUNNING or time.monotonic() > deadline:
                if st.state == STATE_RUNNING:
                    self.abort()
                    raise RunError(f"run did not finish within {timeout:.0f} s (at layer "
                                   f"{st.layer}); aborted")
                raise RunError(f"device in state {st.name} after RUN")
            time.sleep(poll)
            poll = min(poll * 2, 0.05)

    # ---- activations -------------------------------------------------------------------

    def load_activations(self, buf: int, x: torch.Tensor) -> None:
        """Write ``x`` ``[C, H, W]`` (integers of the activation width) into buffer ``buf``."""
        ident = self._ident()
        x = torch.as_tensor(x, dtype=torch.int64)
        c = x.shape[0]
        pixels = x[0].numel()
        bits = self._config().a_bits
        lo, hi = int_range(bits)
        if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
            raise DriverError(f"activation values {int(x.min())}..{int(x.max())} do not fit "
                              f"{bits} bits (accepted {lo}..{hi})")
        body = b"".join(int(v).to_bytes(ident.act_bytes, "little", signed=True)
                        for v in x.reshape(-1).tolist())
        if len(body) + ARG_BYTES[OP_LOAD_ACT] > ident.max_payload:
            raise DriverError(f"tensor of {len(body)} bytes exceeds the device's frame payload "
                              f"({ident.max_payload} bytes, config max_payload)")
        self.request(OP_LOAD_ACT, REQUESTS[OP_LOAD_ACT].pack_args(buf, c, pixels) + body)

    def read_activations(self, buf: int, channels: int, pixels: int) -> torch.Tensor:
        """The tensor ``[channels, pixels]`` in buffer ``buf``; :class:`RunError` when the
        device refuses it because the last run stopped in the error state."""
        ident = self._ident()
        try:
            raw = self.request(OP_READ_ACT, REQUESTS[OP_READ_ACT].pack_args(buf, channels, pixels))
        except DeviceError as e:
            if e.code != ERR_NO_RESULT:
                raise
            raise RunError(f"no result to read: {_stopped(self.status())}") from None
        ab = ident.act_bytes
        if len(raw) != channels * pixels * ab:
            raise DriverError(f"READ_ACT returned {len(raw)} bytes, expected {channels * pixels * ab}")
        vals = [int.from_bytes(raw[i:i + ab], "little", signed=True) for i in range(0, len(raw), ab)]
        return torch.tensor(vals, dtype=torch.int64).reshape(channels, pixels)

    def infer(self, x_int: torch.Tensor, timeout: float = 60.0) -> torch.Tensor:
        """One quantized image ``[C, H, W]`` through the whole program: integer logits."""
        net = self._program().network()
        self.load_activations(net.layers[0].src, x_int)
        self.run(timeout=timeout)
        last = net.layers[-1]
        return self.read_activations(last.dst, last.out_channels, last.ho * last.wo).reshape(-1)

    # ---- helpers -----------------------------------------------------------------------

    def _sized(self, op: int, size: int, payload: bytes = b"") -> bytes:
        """:meth:`request` whose answer must carry exactly ``size`` bytes."""
        answer = self.request(op, payload)
        if len(answer) != size:
            raise DriverError(f"{OP_NAMES.get(op, op)} answered {len(answer)} bytes, expected {size}")
        return answer

    def _ident(self) -> Identity:
        return self.identity if self.identity is not None else self.identify()

    def _config(self) -> AcceleratorConfig:
        if self.config is None:
            raise DriverError("no program loaded: call load_program first")
        return self.config

    def _program(self) -> Program:
        if self.program is None:
            raise DriverError("no program loaded: call load_program first")
        return self.program

    def _image(self) -> DeviceImage:
        if self.image is None:
            raise DriverError("no program loaded: call load_program first")
        return self.image

    def _bar(self, total: int, desc: str):
        if not self.progress or total < 4096:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def _stopped(st: Status) -> str:
    """What a STATUS in the error state says about the run."""
    why = ", ".join(name for bit, name in RUN_ERRORS.items() if st.error & bit)
    return (f"run stopped at layer {st.layer} with device error 0x{st.error:02x}"
            + (f" ({why})" if why else ""))
