"""Host side without a simulator: the driver's errors, on a scripted transport."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen.config import AcceleratorConfig
from host.driver import DeviceError, Driver, DriverError, IdentityMismatch, LinkTimeout, RunError
from gen.contract import ERR_ABORTED
from host.protocol import (ERR_CRC, ERR_NO_RESULT, OP_ERROR, OP_IDENTIFY,
                           OP_READ_ACT, OP_STATUS, RESPONSE, STATE_DONE, STATE_ERROR, STATUS,
                           TAGS, FrameDecoder, encode_frame, identity_bytes, parse_identity)
from host.transport import Transport
from tests.support import small_program


class ScriptedTransport(Transport):
    """Answers every write with the next scripted bytes (or nothing)."""

    def __init__(self, replies):
        super().__init__()
        self.replies = list(replies)
        self.pending = b""

    def _write(self, data):
        if self.replies:
            self.pending += self.replies.pop(0)

    def _read(self, n, timeout):
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def close(self):
        pass


class EchoTransport(ScriptedTransport):
    """Answers every request frame with ``reply(frame)`` (bytes), a function of the
    decoded request (its opcode, payload and tag)."""

    def __init__(self, reply):
        super().__init__([])
        self.reply = reply
        self.requests = []

    def _write(self, data):
        for frame in FrameDecoder().feed(data):
            self.requests.append(frame)
            self.pending += self.reply(frame)


def _status(state, error=0, layer=0):
    return STATUS.pack(state, error, layer)


def test_driver_tags_every_request_in_turn():
    """Each request carries the next tag, wrapping at TAGS."""
    drv = Driver(EchoTransport(lambda f: encode_frame(f.op | RESPONSE, _status(STATE_DONE), f.tag)))
    drv.tag = TAGS - 2
    for _ in range(3):
        assert drv.status().state == STATE_DONE
    assert [f.tag for f in drv.transport.requests] == [TAGS - 2, TAGS - 1, 0]
    assert drv.stale == 0


def test_driver_drops_a_late_answer_with_another_tag():
    """The first STATUS gets no answer in time; its answer arrives late, ahead of the
    second STATUS's own: the driver drops it (counted in ``stale``) and returns the
    second's. A late answer alone is never taken: the request times out."""
    late = {}

    def reply(f):
        if not late:
            late["frame"] = encode_frame(f.op | RESPONSE, _status(STATE_ERROR, ERR_ABORTED, 3), f.tag)
            return b""
        return late["frame"] + encode_frame(f.op | RESPONSE, _status(STATE_DONE, 0, 7), f.tag)

    drv = Driver(EchoTransport(reply), timeout=0.2)
    with pytest.raises(LinkTimeout, match="STATUS"):
        drv.status()
    st = drv.status()
    assert (st.state, st.error, st.layer) == (STATE_DONE, 0, 7)
    assert drv.stale == 1

    drv = Driver(EchoTransport(lambda f: encode_frame(f.op | RESPONSE, _status(STATE_DONE),
                                                      (f.tag + 1) % TAGS)), timeout=0.2)
    with pytest.raises(LinkTimeout, match="STATUS"):
        drv.status()
    assert drv.stale == 1


def test_driver_reports_no_result_of_a_stopped_run_as_a_run_error():
    """READ_ACT refused with ERR_NO_RESULT (the run was aborted): RunError naming why
    the run stopped, never activations."""
    def reply(f):
        if f.op == OP_READ_ACT:
            return encode_frame(OP_ERROR, bytes([ERR_NO_RESULT, OP_READ_ACT]), f.tag)
        return encode_frame(f.op | RESPONSE, _status(STATE_ERROR, ERR_ABORTED, 1), f.tag)

    drv = Driver(EchoTransport(reply), timeout=0.5)
    drv.identity = parse_identity(identity_bytes(AcceleratorConfig()))
    with pytest.raises(RunError, match=r"no result to read: run stopped at layer 1 .*aborted"):
        drv.read_activations(0, 2, 3)


def test_driver_times_out_with_a_clear_error():
    drv = Driver(ScriptedTransport([]), timeout=0.2)
    with pytest.raises(LinkTimeout, match="IDENTIFY"):
        drv.identify()


def test_driver_refuses_a_device_built_for_another_config():
    result, program = small_program()
    other = AcceleratorConfig(rows=5)
    drv = Driver(ScriptedTransport([encode_frame(OP_IDENTIFY | RESPONSE, identity_bytes(other))]))
    with pytest.raises(IdentityMismatch, match="device is built for config"):
        drv.attach(result.config, program)
    with pytest.raises(IdentityMismatch, match="program is built for config"):
        Driver(ScriptedTransport([])).attach(other, program)


def test_driver_reports_device_errors_and_corrupt_responses():
    drv = Driver(ScriptedTransport([encode_frame(OP_ERROR, bytes([ERR_CRC, OP_STATUS]))]))
    with pytest.raises(DeviceError, match="STATUS: bad CRC"):
        drv.status()
    bad = bytearray(encode_frame(OP_STATUS | RESPONSE, bytes(4)))
    bad[-2] ^= 0xFF
    with pytest.raises(DriverError, match="corrupt response to STATUS"):
        Driver(ScriptedTransport([bytes(bad)])).status()


def test_driver_refuses_out_of_range_activations():
    result, program = small_program()
    cfg = result.config
    drv = Driver(ScriptedTransport([encode_frame(OP_IDENTIFY | RESPONSE, identity_bytes(cfg))]))
    drv.attach(cfg, program)
    with pytest.raises(DriverError, match="do not fit 8 bits"):
        drv.load_activations(0, torch.full((1, 2, 2), 300))


_REQUESTS = {
    "identify": lambda d: d.identify(),
    "status": lambda d: d.status(),
    "counters": lambda d: d.counters(),
    "read": lambda d: d.read(1, 0, 7),
    "read_activations": lambda d: d.read_activations(0, 2, 3),
}
_REPLY_OPS = {"identify": OP_IDENTIFY, "status": OP_STATUS, "counters": 0x06, "read": 0x03,
              "read_activations": 0x08}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(_REQUESTS)), st.sampled_from(["raw", "framed", "other_op", "error"]),
       st.binary(max_size=120))
def test_driver_on_arbitrary_answers_raises_only_driver_errors(request, form, blob):
    """Whatever comes back (bytes, a frame with any payload, another frame, any error
    frame), a request returns or raises a DriverError naming it; nothing else escapes."""
    cfg = AcceleratorConfig()
    op = _REPLY_OPS[request]
    reply = {"raw": blob,
             "framed": encode_frame(op | RESPONSE, blob),
             "other_op": encode_frame((op + 1) | RESPONSE, blob),
             "error": encode_frame(OP_ERROR, blob)}[form]
    drv = Driver(ScriptedTransport([reply]), timeout=0.05)
    drv.identity = parse_identity(identity_bytes(cfg))
    try:
        _REQUESTS[request](drv)
    except DriverError as e:
        assert str(e)


def test_wait_scales_with_the_bytes_a_request_moves():
    """The wait for an answer is the timeout plus margin x the time the request's and
    the answer's bytes take on the link: a READ of many bytes waits longer than a
    STATUS, and a slower link longer than a faster one."""
    cfg = AcceleratorConfig()
    tr = ScriptedTransport([])
    tr.byte_seconds = 1e-4
    drv = Driver(tr, timeout=0.05, margin=2.0)
    drv.identity = parse_identity(identity_bytes(cfg))
    assert drv.wait_seconds(0) == 0.05
    assert drv.wait_seconds(1000) == pytest.approx(0.05 + 2.0 * 1000 * 1e-4)
    t0 = time.monotonic()
    with pytest.raises(LinkTimeout) as small:
        drv.status()
    t_small = time.monotonic() - t0
    t0 = time.monotonic()
    with pytest.raises(LinkTimeout) as big:
        drv.read(1, 0, 2000)
    t_big = time.monotonic() - t0
    w_small, w_big = (float(str(e.value).split("within ")[1].split(" s")[0]) for e in (small, big))
    # READ of 2000 bytes: at least 2 x 2000 x 1e-4 = 0.4 s more than the bare timeout.
    assert w_small <= 0.1 and w_big >= 0.4
    assert t_small >= 0.05 and t_big >= 0.4
    tr.byte_seconds = 2e-4                       # a slower link waits longer
    assert drv.wait_seconds(1000) == pytest.approx(0.05 + 2.0 * 1000 * 2e-4)


def test_driver_refuses_bad_timeouts():
    with pytest.raises(ValueError, match="timeout 0: accepted seconds > 0"):
        Driver(ScriptedTransport([]), timeout=0)
    with pytest.raises(ValueError, match="margin 0.5: accepted a factor >= 1"):
        Driver(ScriptedTransport([]), margin=0.5)
