"""Board tops (hw.board): the accelerator behind the PLL and the UART, for each board."""

from __future__ import annotations

import gc
import warnings

import pytest
from amaranth.hdl import UnusedElaboratable

from gen.config import AcceleratorConfig
from hw.board import BOARDS, BoardTop, board_platform
from tests.support import SMOKE


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_board_top_elaborates_with_uart_and_clock_constraint(board):
    freq = 50e6 if BOARDS[board].family == "ecp5" else 24e6
    plan = board_platform(board).build(BoardTop(SMOKE, board, freq), name="t", do_build=False)
    pins = plan.files["t.lpf" if BOARDS[board].family == "ecp5" else "t.pcf"]
    text = pins if isinstance(pins, str) else pins.decode()
    assert "uart" in text and ("FREQUENCY" in text or "set_frequency" in text)


def test_board_top_refuses_an_unreachable_baud():
    with warnings.catch_warnings():
        # (the refused top is never elaborated; its warning comes when it is collected)
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match="cannot make baud"):
            BoardTop(AcceleratorConfig(baud=3_000_000), "icebreaker", 25e6)
        gc.collect()
