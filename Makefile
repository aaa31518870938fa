# ctlesion: `make demo` runs the main job on built-in synthetic data; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to the releases this project is developed and tested with;
# the package itself accepts torch>=2.11 / torchvision>=0.26.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo compare test install clean

$(BIN)/ctlesion: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/ctlesion

demo: install
	$(BIN)/ctlesion demo --out demo-output

# Every classifier family (SSM, Affinity, Attention, LSTM-2, ResNet18) on the same
# phantoms with the same time budget: demo-output/comparison.json (~15 min on 2 cores).
compare: install
	$(BIN)/ctlesion compare --out demo-output

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-output .pytest_cache build *.egg-info src/*.egg-info
