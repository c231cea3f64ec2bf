# Everything installs itself: a fresh machine needs only python3 and gcc.
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
STUB    := engine/_native.pyi
# every part of the C core (engine.c #includes the others) and the build scripts
SOURCES := pyproject.toml $(wildcard native/*.c native/*.h) native/build_native.py native/build_backend.py

.PHONY: all run test test-all bench bench-suite soak chaos lint typecheck sanitize same-code clean redis-server verify spin

all: $(STAMP) $(STUB)

$(PYTHON):
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the package with its C extension (editable: engine/_native*.so lands in the tree).
# compat mode: a plain path entry that type checkers follow (the default mode's
# import hook is invisible to mypy: a user's script got import-not-found for engine)
EDITABLE := --config-settings editable_mode=compat
$(STAMP): $(PYTHON) $(SOURCES)
	$(BIN)/pip install -q -e '.[dev,peer]' $(EDITABLE) || \
	  { echo "the extra 'peer' (iceoryx2) could not be installed: bench --journal skips it"; \
	    $(BIN)/pip install -q -e '.[dev]' $(EDITABLE); }
	touch $@

# the type stub of engine._native, generated from the cdef (not kept in git): with it mypy
# checks lib, and the Redis store, against the store interface (engine/store/__init__.py)
$(STUB): $(STAMP) native/gen_stub.py
	$(PYTHON) native/gen_stub.py $@

## run: the stress demo (spawn one worker per core, hammer, verify, print figures)
run: $(STAMP)
	$(PYTHON) -m engine stress --seconds 5

## redis-server: the tests' Redis (Debian's package, installed when missing; tests start
##   their own servers on free loopback ports, nothing depends on one running)
redis-server:
	@command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
	  { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is missing and could not be installed"; exit 1; }

## test: the test suite on both backends (short chaos and soak versions included)
test: $(STAMP) redis-server
	$(PYTHON) -m pytest -q

## test-all: also the long chaos and soak tests and the 3-node Redis Cluster (marked slow)
test-all: $(STAMP) redis-server
	$(PYTHON) -m pytest -q -m "slow or not slow"

## soak: 10-minute oversubscribed stress (8 workers on this host), zero violations expected;
##   MIX=orders: the order workload (10 workers, keys and fills by lookup), MIX=<preset,...>: any mix
MIX ?= default
SOAK_WORKERS = $(if $(filter orders%,$(MIX)),10,8)
soak: $(STAMP)
	$(PYTHON) -m engine stress --workers $(SOAK_WORKERS) --seconds 600 $(if $(filter-out default,$(MIX)),--mix $(MIX) )--json soak.json

## bench-suite: pytest-benchmark micro-benchmarks (ratios to the empty-call floor)
bench-suite: $(STAMP)
	$(PYTHON) -m pytest bench -q --benchmark-only --benchmark-columns=min,median,mean,ops

## bench: side-by-side against the peers (installs redis-server and the bench extra)
bench: $(STAMP)
	@$(MAKE) -s redis-server || echo "redis-server could not be installed: the bench will say so and skip Redis"
	$(BIN)/pip install -q -e '.[dev,bench]' $(EDITABLE)
	$(PYTHON) -m engine bench --journal --json bench.json --plots bench

## spin: the model checker (Debian's package, installed when missing)
spin:
	@command -v spin >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin >/dev/null; } || \
	  { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin >/dev/null; }
	@command -v spin >/dev/null 2>&1 || { echo "spin is missing and could not be installed"; exit 1; }

## verify: the journal's append protocols through Spin, exhaustively: each model must hold, and
##   each deliberate mutation of it (MUTANT=n, see the model) must be caught.  native/journal.pml
##   is the global latch native/journal.c runs, with its riders; native/journal_append.pml the
##   per-object append that is to replace it (not implemented yet).  pan stores states
##   compressed (-DCOLLAPSE, lossless): about 1.5 min and 1.3 GB in all
MODELS := journal.pml:1,2,3,4,5,6,7,8 journal_append.pml:1,2,3,4,5,6,7
verify: spin
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && cp native/journal.pml native/journal_append.pml "$$d"/ && cd "$$d" && \
	for spec in $(MODELS); do \
	 model=$${spec%%:*}; \
	 for m in 0 $$(echo $${spec#*:} | tr , ' '); do \
	  opt=-O1; [ $$m != 0 ] || opt=-O2; \
	  spin -DMUTANT=$$m -a $$model >/dev/null && cc $$opt -w -DSAFETY -DCOLLAPSE -o pan pan.c || exit 1; \
	  ./pan -m200000 > out.txt 2>&1; \
	  if grep -q "max search depth too small" out.txt; then cat out.txt; echo "verify: search depth too small"; exit 1; fi; \
	  errs=$$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' out.txt); \
	  states=$$(sed -n 's/^ *\([0-9]*\) states, stored.*/\1/p' out.txt); \
	  if [ -z "$$errs" ]; then cat out.txt; echo "verify: no result from pan"; exit 1; fi; \
	  if [ $$m = 0 ]; then \
	    [ "$$errs" = 0 ] || { cat out.txt; spin -t -p $$model | tail -40; echo "verify: $$model FAILS"; exit 1; }; \
	    echo "verify: $$model holds ($$states states, exhaustive, $$(sed -n 's/^pan: elapsed time //p' out.txt))"; \
	  else \
	    [ "$$errs" != 0 ] || { cat out.txt; echo "verify: $$model mutation $$m was NOT caught: the model cannot fail"; exit 1; }; \
	    echo "verify: $$model mutation $$m caught ($$(grep -m1 -E 'assertion violated|invalid end state' out.txt | sed 's/ *(at depth.*//'))"; \
	  fi; \
	 done; \
	done

lint: $(STAMP)
	$(BIN)/ruff check engine tests bench native

typecheck: $(STAMP) $(STUB)
	$(BIN)/mypy

## sanitize: rebuild the extension with ASan + UBSan and run the tests under it
sanitize: $(STAMP)
	rm -f engine/_native*.so
	ENGINE_SANITIZE=1 $(BIN)/pip install -q --no-build-isolation -e . $(EDITABLE) || \
	  (ENGINE_SANITIZE=1 $(BIN)/pip install -q -e . $(EDITABLE))
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PYTHON) -m pytest -q -p no:cacheprovider; status=$$?; \
	  rm -f engine/_native*.so; $(BIN)/pip install -q -e . $(EDITABLE); rm -f $(STAMP); exit $$status

## same-code: prove a move of C code changed no machine code: build the C core of BASE
##   (default: the commit before the split into parts) and of the working tree with the same
##   flags and compare the disassembly of the hot calls (FUNCTIONS); non-zero on a difference
SPLIT_COMMIT = $(shell git log --diff-filter=A --format=%H -1 -- native/internal.h 2>/dev/null)
BASE ?= $(if $(SPLIT_COMMIT),$(SPLIT_COMMIT)^,HEAD)
FUNCTIONS ?= eng_transition eng_update_price eng_read_price eng_open
same-code: $(STAMP)
	$(PYTHON) native/same_code.py $(BASE) $(FUNCTIONS)

clean:
	rm -rf $(VENV) build *.egg-info engine/_native*.so engine/_native.c $(STUB) .pytest_cache .benchmarks
