# DetKD: each target bootstraps .venv (torch, detectron2, DetKD) on a fresh machine first;
# a second run reuses it (dev/bootstrap.sh keeps a stamp of what it installed).
VENV ?= .venv
PY := $(VENV)/bin/python
METHOD ?= pkd
ITERS ?=
SEEDS ?= 0 1 2
HELDOUT ?= 1024
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: venv demo test instant bench clean-demo

venv:
	@bash dev/bootstrap.sh

# Train teacher, student alone, student + $(METHOD) (space-separated list allowed) on the
# synthetic shapes data, evaluate all with COCOEvaluator, print the AP table.
demo: venv
	$(PY) -m detkd.demo --methods $(METHOD) $(if $(ITERS),--iters $(ITERS))

# The suite runs in TEST_WORKERS processes (pytest-xdist; default: one per core, at most 4);
# TEST_WORKERS=1 runs it in one process.
test: venv
	$(PY) -m pytest tests -q -p no:cacheprovider $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal)

# The GPU smoke tier: 40 iterations of each configs/quick_schedules/*_instant_test.py on
# coco_2017_val_100 (needs COCO under $$DETECTRON2_DATASETS and the model zoo; not run by CI).
instant: venv
	PYTHON=$(PY) bash dev/run_instant_tests.sh

# Cost of distillation per iteration (ratios) and effectiveness (AP table, trains the demo runs
# once per seed in SEEDS: mean, sd and deltas paired by seed; SEEDS=0 for one run of each;
# every run also evaluated on a held-out split of HELDOUT images, HELDOUT=0 skips it).
bench: venv
	$(PY) benchmarks/kd_overhead.py
	$(PY) benchmarks/effectiveness.py --seeds $(SEEDS) --heldout $(HELDOUT)

clean-demo:
	rm -rf output/demo
