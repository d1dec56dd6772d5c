"""Host side without a simulator: the device image :mod:`host.image` builds from a program."""

from __future__ import annotations

from gen.contract import layer_record_layout
from host.image import build_image, descriptor_fields
from host.protocol import const_bytes, record_bytes, unpack_struct
from tests.support import small_program


def test_device_image_layout_matches_the_program():
    result, program = small_program()
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
