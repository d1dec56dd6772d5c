"""The device image of a program: what the driver writes into the accelerator's memories.

A program file (:mod:`gen.program`) keeps every tensor in one unaligned bit
stream; the accelerator wants, per layer, a record in its program memory
(:func:`gen.contract.layer_record_layout`, its descriptor from
:func:`gen.contract.descriptor_fields`), the layer's B, U and V sections in the
base store (each packed on its own from a byte boundary, as the generation unit
loads them) and one word of requant constants per output channel
(:func:`gen.contract.channel_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gen.compiler import place_codes
from gen.config import AcceleratorConfig
from gen.contract import channel_layout, descriptor_fields, layer_record_layout
from gen.packing import pack_codes
from gen.program import Program

from .protocol import const_bytes, pack_struct, record_bytes

__all__ = ["DeviceImage", "ImageError", "build_image", "descriptor_fields"]


class ImageError(ValueError):
    """A program does not fit the accelerator it is loaded into."""


@dataclass(frozen=True)
class DeviceImage:
    """Memory contents of one program; ``streamed`` holds ``(layer index, code bytes)``
    of every non-resident layer, in layer order, sent to ``REGION_STREAM`` during each run."""

    records: bytes
    bases: bytes
    consts: bytes
    n_layers: int
    streamed: tuple[tuple[int, bytes], ...] = ()

    @property
    def total_bytes(self) -> int:
        return len(self.records) + len(self.bases) + len(self.consts)

    @property
    def streamed_bytes(self) -> int:
        return sum(len(b) for _, b in self.streamed)


def _le(word: int, nbytes: int) -> bytes:
    return int(word).to_bytes(nbytes, "little")


def build_image(program: Program, config: AcceleratorConfig) -> DeviceImage:
    """Lay ``program`` out in the memories of an accelerator built for ``config``.

    Raises :class:`ImageError` naming the layer and the memory that overflows.
    """
    net = program.network()
    if len(net.layers) > config.max_layers:
        raise ImageError(f"program has {len(net.layers)} layers, the accelerator's program "
                         f"memory holds {config.max_layers} (config max_layers)")
    rec_layout, chan = layer_record_layout(config), channel_layout(config)
    rb, cb = record_bytes(config), const_bytes(config)
    records, bases, consts = bytearray(), bytearray(), bytearray()
    streamed = []
    n_consts = 0
    for index, (layer, resident) in enumerate(zip(net.layers,
                                                  place_codes(net, config.base_store_bytes))):
        codes = b"".join(pack_codes(np.asarray(t, dtype=np.int64), bits)
                         for _, t, bits in layer.code_tensors(net))
        code_addr = len(bases) if resident else 0
        if resident:
            bases += codes
        elif not config.stream:
            raise ImageError(
                f"layer {layer.name!r}: its {len(codes)} code bytes do not fit the base store "
                f"after the layers before it ({config.base_store_bytes} bytes, config "
                "base_store_bytes), and the accelerator config has no code streaming "
                "(stream = false); compile the config from this network")
        else:
            streamed.append((index, codes))
        if len(bases) > config.base_store_bytes:
            raise ImageError(f"layer {layer.name!r}: codes end at byte {len(bases)} of the base "
                             f"store, which holds {config.base_store_bytes} (config base_store_bytes)")
        const_addr = n_consts
        for mv, bv in zip(layer.mult.tolist(), layer.bias.tolist()):
            consts += _le(pack_struct(chan, {"mult": mv, "bias": bv}), cb)
        n_consts += layer.out_channels
        if n_consts > config.const_depth:
            raise ImageError(f"layer {layer.name!r}: constants end at word {n_consts}, the "
                             f"constants memory holds {config.const_depth} (config const_depth)")
        try:
            word = pack_struct(rec_layout, {
                "desc": pack_struct(rec_layout["desc"].shape, descriptor_fields(layer)),
                "code_addr": code_addr if code_addr < config.base_store_bytes else 0,
                "code_len": len(codes), "const_addr": const_addr,
                "streamed": int(not resident)})
        except ValueError as e:
            raise ImageError(f"layer {layer.name!r}: {e}") from None
        records += _le(word, rb)
    return DeviceImage(bytes(records), bytes(bases), bytes(consts), len(net.layers),
                       tuple(streamed))
