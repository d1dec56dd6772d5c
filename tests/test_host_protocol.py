"""Host side without a simulator: the frame format, the identity and the struct packing
of :mod:`host.protocol`."""

from __future__ import annotations

import struct

import pytest
from amaranth.lib import crc
from hypothesis import given, settings
from hypothesis import strategies as st

from gen.config import AcceleratorConfig
from gen.contract import channel_layout
from host.protocol import (CRC_BYTES, HEADER_BYTES, OP_STATUS, SYNC, TAGS, FrameDecoder,
                           ProtocolError, crc16, encode_frame, identity_bytes, pack_struct,
                           parse_identity, record_bytes, unpack_struct)


def test_crc_matches_the_hardware_crc_definition():
    algo = crc.catalog.CRC16_CCITT_FALSE(data_width=8)
    for data in (b"", b"123456789", bytes(range(256))):
        assert crc16(data) == algo.compute(data)
    assert crc16(b"123456789") == 0x29B1


@given(st.integers(0, 255), st.binary(max_size=300), st.integers(0, TAGS - 1))
def test_frame_round_trip(op, payload, tag):
    dec = FrameDecoder()
    frame = encode_frame(op, payload, tag)
    assert len(frame) == HEADER_BYTES + len(payload) + CRC_BYTES
    # The header: SYNC, OP, LEN (little endian), TAG; the CRC covers all after SYNC.
    assert frame[:HEADER_BYTES] == bytes([SYNC, op]) + struct.pack("<H", len(payload)) + bytes([tag])
    assert crc16(frame[1:]) == 0
    frames = dec.feed(b"\x00\x13" + frame)
    assert [(f.op, f.payload, f.tag) for f in frames] == [(op, payload, tag)]
    assert dec.skipped == 2


def test_encode_frame_refuses_a_tag_out_of_range():
    with pytest.raises(ValueError, match=f"tag {TAGS} out of range"):
        encode_frame(OP_STATUS, b"", TAGS)


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
        FrameDecoder(max_payload=256).feed(bytes([SYNC, 1]) + struct.pack("<HB", 300, 0))


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
