# hemaray: the two first commands are `make demo` and `make test`.
# Both create/update .venv idempotently; a second call is quick (stamp file).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hemaray-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/ultralytics
export YOLO_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export MPLBACKEND := Agg

DEMO_DIR ?= demo-out

.PHONY: install demo test lint typecheck unit clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check batch jobs schemas tests
	$(BIN)/mypy batch

unit: install
	$(BIN)/pytest tests

test: lint unit

demo: install
	mkdir -p $(DEMO_DIR)
	$(BIN)/hemaray synth --out $(DEMO_DIR)/slides --slides 1 --width 8192 --height 6144 --seed 7
	$(BIN)/hemaray info $(DEMO_DIR)/slides/slide_0000.tif
	$(BIN)/hemaray thumbnail $(DEMO_DIR)/slides/slide_0000.tif $(DEMO_DIR)/slide_0000.png --size 1024
	@echo "thumbnail: $(DEMO_DIR)/slide_0000.png"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .cache .mypy_cache .ruff_cache .pytest_cache
