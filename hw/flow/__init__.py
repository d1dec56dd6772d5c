"""The tool flows around the blocks of :mod:`hw`: Verilog output (:mod:`.rtl`), synthesis
and place and route (:mod:`.synth`), out-of-context block runs (:mod:`.ooc`), static
timing of a routed design (:mod:`.sta`), formal checks (:mod:`.formal`) and the PLL
parameter search (:mod:`.pll`). None of them is logic of the accelerator itself."""
