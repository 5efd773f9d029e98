# The two commands of the README: `make demo` and `make test`. Both create .venv/ when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (served locally); CUDA users: make demo TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo simulate test lint protos clean-venv

# pip byte-compiles what it installs (26 of the 74 s here): keep it. Without it, a machine with
# PYTHONDONTWRITEBYTECODE=1 (this one) compiles torch from source in every process that imports it (tried: the suite
# went from 627 to 660-745 s of pytest).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/murmur demo --out demo-out

simulate: $(STAMP)
	$(VENV)/bin/murmur simulate --preset tiny --peers 8 --methods ddp,diloco,ppu,gossip-ppu \
		--json demo-out/simulate.json --plot demo-out/simulate.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A file's tests run in one worker, one after the other (module fixtures, the netns subnet); files run side by side,
# the longest first (tests/conftest.py), one worker per core. On 2 cores 3 workers were faster (224 s against
# 243 s), but the contention made timing-sensitive process tests fail in 3 of 6 fresh clones: one per core.
TEST_WORKERS ?= $(shell nproc)
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean-venv:
	rm -rf $(VENV)
