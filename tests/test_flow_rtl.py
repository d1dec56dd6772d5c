"""``python -m hw.flow.rtl``: Verilog of every block for a build's config."""

from gen.config import AcceleratorConfig
from hw.flow.rtl import BLOCKS, main


def test_writes_every_block(tmp_path, capsys):
    cfg = AcceleratorConfig(rows=4, cols=4, max_ci=16, max_co=16, max_h=8, max_w=8,
                            max_bo=8, act_depth=1024, base_store_bytes=4096)
    cfg.save(tmp_path / "config.json")
    assert main([str(tmp_path)]) == 0
    for name, _, _ in BLOCKS:
        text = (tmp_path / "rtl" / f"{name}.v").read_text()
        assert f"module {name}(" in text or f"module {name} (" in text
    assert AcceleratorConfig.load(tmp_path / "rtl" / "config.json") == cfg


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "config.json: cannot read" in capsys.readouterr().err
