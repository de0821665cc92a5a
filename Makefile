# privsynth: two commands for a newcomer: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: venv demo demo-privimage test test-slow clean-demo

$(BIN)/privsynth: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

venv: $(BIN)/privsynth

## demo: fit -> sample -> evaluate on the embedded demo data (offline, CPU)
demo: venv
	rm -rf $(DEMO_OUT)
	PATH=$(abspath $(BIN)):$$PATH bash assets/demo.sh $(DEMO_OUT)

## demo-privimage: the same with privimage (semantic query, diffusion UNet, DP-SGD), offline, CPU
demo-privimage: venv
	rm -rf $(DEMO_OUT)-privimage
	PATH=$(abspath $(BIN)):$$PATH METHOD=privimage bash assets/demo.sh $(DEMO_OUT)-privimage

## test: the default test suite, under 5 minutes on 2 cores (CI's first step)
test: venv
	$(BIN)/python -m pytest -q

## test-slow: the tests marked `slow` (real kill -9 and SIGTERM of a fit, torchrun, end-to-end
## runs that repeat a path the default run covers); CI's second step
test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean-demo:
	rm -rf $(DEMO_OUT) $(DEMO_OUT)-privimage
