"""Host side without a simulator: the frame format, the device image, the driver's errors."""

from __future__ import annotations

import struct

import pytest
import torch
from amaranth.lib import crc
from hypothesis import given, settings
from hypothesis import strategies as st

from gen.config import AcceleratorConfig
from gen.contract import channel_layout, layer_record_layout
from host.driver import DeviceError, Driver, DriverError, IdentityMismatch, LinkTimeout
from host.image import build_image, descriptor_fields
from host.protocol import (ERR_CRC, OP_ERROR, OP_IDENTIFY, OP_STATUS, RESPONSE, SYNC,
                           FrameDecoder, ProtocolError, const_bytes, crc16, encode_frame,
                           identity_bytes, pack_struct, parse_identity, record_bytes,
                           unpack_struct)
from host.transport import Transport


def test_crc_matches_the_hardware_crc_definition():
    algo = crc.catalog.CRC16_CCITT_FALSE(data_width=8)
    for data in (b"", b"123456789", bytes(range(256))):
        assert crc16(data) == algo.compute(data)
    assert crc16(b"123456789") == 0x29B1


@given(st.integers(0, 255), st.binary(max_size=300))
def test_frame_round_trip(op, payload):
    dec = FrameDecoder()
    frames = dec.feed(b"\x00\x13" + encode_frame(op, payload))
    assert len(frames) == 1 and frames[0].op == op and frames[0].payload == payload
    assert dec.skipped == 2


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoder_on_arbitrary_bytes_only_raises_protocol_error(junk):
    dec = FrameDecoder(max_payload=64)
    data = junk
    while True:
        try:
            dec.feed(data)
            break
        except ProtocolError:
            data = b""   # the decoder skipped the bad SYNC; go on with what it holds
    assert all(isinstance(f.op, int) for f in dec.frames)


def test_decoder_rejects_bad_crc_and_oversized_length():
    frame = bytearray(encode_frame(OP_STATUS, b"abc"))
    frame[-1] ^= 0x01
    with pytest.raises(ProtocolError, match="CRC"):
        FrameDecoder().feed(bytes(frame))
    with pytest.raises(ProtocolError, match="announces 300"):
        FrameDecoder(max_payload=256).feed(bytes([SYNC, 1]) + struct.pack("<H", 300))


def test_identity_round_trip():
    cfg = AcceleratorConfig()
    ident = parse_identity(identity_bytes(cfg))
    assert ident.config_digest == cfg.digest and ident.record_bytes == record_bytes(cfg)
    with pytest.raises(ProtocolError, match="magic"):
        parse_identity(b"XXXX" + identity_bytes(cfg)[4:])


def test_struct_packing_round_trip_and_range_errors():
    cfg = AcceleratorConfig()
    chan = channel_layout(cfg)
    word = pack_struct(chan, {"mult": -5, "bias": 1 << 30})
    assert unpack_struct(chan, word) == {"mult": -5, "bias": 1 << 30}
    with pytest.raises(ValueError, match="field mult"):
        pack_struct(chan, {"mult": 1 << 15})


def _small_program():
    from gen.compiler import compile_network
    from gen.program import read_program
    from tests.test_accelerator import random_network

    net = random_network(seed=3)
    result = compile_network(net, rows=4, cols=4)
    return result, read_program(result.program, config=result.config)


def test_device_image_layout_matches_the_program():
    result, program = _small_program()
    cfg = result.config
    image = build_image(program, cfg)
    rb, cb = record_bytes(cfg), const_bytes(cfg)
    layout = layer_record_layout(cfg)
    net = program.network()
    assert len(image.records) == rb * len(net.layers)
    code_end, const_end = 0, 0
    for i, layer in enumerate(net.layers):
        rec = unpack_struct(layout, int.from_bytes(image.records[i * rb:(i + 1) * rb], "little"))
        desc = unpack_struct(layout["desc"].shape, rec["desc"])
        assert desc == descriptor_fields(layer)
        assert rec["code_len"] == layer.aligned_code_bytes(net)
        if rec["code_len"]:
            assert rec["code_addr"] == code_end
        code_end += rec["code_len"]
        assert rec["const_addr"] == const_end
        const_end += layer.out_channels
    assert len(image.bases) == code_end and len(image.consts) == cb * const_end


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


def test_driver_times_out_with_a_clear_error():
    drv = Driver(ScriptedTransport([]), timeout=0.2)
    with pytest.raises(LinkTimeout, match="IDENTIFY"):
        drv.identify()


def test_driver_refuses_a_device_built_for_another_config():
    result, program = _small_program()
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
    result, program = _small_program()
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
