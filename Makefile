# hemaray: the two first commands are `make demo` and `make test`.
# Both create/update .venv idempotently; a second call is quick (stamp file).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hemaray-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
LS_SDK := .cache/label-studio-sdk
# label_studio_sdk.label_interface and what it imports (the rest of the SDK is not used).
LS_SDK_PINS := label-studio-sdk==2.1.2 xmljson==0.2.1 jsf==0.11.2 faker rstr lxml 'PyJWT>=2.13,<2.14' appdirs
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/ultralytics
export YOLO_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export MPLBACKEND := Agg
# Bytecode is written on first import (pip installs with --no-compile: byte-compiling all ~23k
# files took ~2 min, ~1 min even on every core, and most are never imported). Some machines set
# PYTHONDONTWRITEBYTECODE, which would make every process (each Ray worker, each test driver)
# compile torch again at import; an empty value turns it off.
export PYTHONDONTWRITEBYTECODE :=

DEMO_DIR ?= demo-out

.PHONY: install demo test test-fast test-extended lint pytest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile $(TORCH_PINS)
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	# The Label Studio SDK, to validate exported tasks in tests, in a folder of its own: its
	# requirements (opencv-python-headless < 4.13) would clash with the project's OpenCV.
	$(BIN)/pip install -q --no-compile --no-deps --target $(LS_SDK) $(LS_SDK_PINS)
	touch $(STAMP)

install: $(STAMP)

# ruff, mypy and the import-linter contracts (pyproject.toml: one-way layers, no cycles).
lint: install
	$(BIN)/ruff check batch jobs schemas tests
	$(BIN)/mypy batch
	$(BIN)/lint-imports

# Every tier but extended: unit, ray, cluster, slow (tests/conftest.py).
pytest: install
	$(BIN)/pytest tests -m "not extended" --durations=30 --junitxml=.cache/junit.xml
	$(BIN)/python tests/suite_times.py .cache/junit.xml

# The longest end-to-end loops (the annotation loop: run, export, annotate, import, retrain,
# rerun), kept out of the 20-minute `make test`; CI runs them after it (.ci/run).
test-extended: install
	$(BIN)/pytest tests -m extended --durations=10

test: lint pytest

# The edit loop: the unit tier only (no Ray, no training), under two minutes on 2 cores.
test-fast: install
	$(BIN)/pytest -m unit tests

# The main job on the embedded default: local Ray, local files, shipped models,
# two generated synthetic smears.
demo: install
	mkdir -p $(DEMO_DIR)
	$(BIN)/hemaray synth --out $(DEMO_DIR)/blood --kind blood --prefix blood --slides 1 --width 4096 --height 3072 --seed 7 --blank-fraction 0.2
	$(BIN)/hemaray synth --out $(DEMO_DIR)/leukemia --kind leukemia --blast-fraction 0.6 --prefix leukemia --slides 1 --width 4096 --height 3072 --seed 7 --blank-fraction 0.2
	$(BIN)/hemaray info $(DEMO_DIR)/blood/blood_0000.tif
	$(BIN)/hemaray thumbnail $(DEMO_DIR)/leukemia/leukemia_0000.tif $(DEMO_DIR)/leukemia_0000.png --size 1024
	@echo "thumbnail: $(DEMO_DIR)/leukemia_0000.png"
	$(BIN)/hemaray run $(DEMO_DIR)/blood $(DEMO_DIR)/leukemia --out $(DEMO_DIR)/out --overwrite
	$(BIN)/hemaray evaluate $(DEMO_DIR)/out --truth $(DEMO_DIR)/blood/ground_truth.parquet --truth $(DEMO_DIR)/leukemia/ground_truth.parquet
	@echo "cells (Parquet, hive-partitioned by slide_id): $(DEMO_DIR)/out/cells/"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .cache .mypy_cache .ruff_cache .pytest_cache
