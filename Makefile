# The two README commands: `make demo` and `make test`. Both install what is missing first.
PY := /usr/bin/python3
export LIBTBX_BUILD ?= /usr/lib/cctbx/python3.11

.PHONY: env demo test default-model fast-model benchmark clean

env:
	@bash tools/ensure_env.sh

demo: env
	@bash tools/demo.sh

test: env
	$(PY) -m pytest -p no:cacheprovider tests

# Reproduce the embedded models from scratch (simulated stills; 22-23 min each on the 4 Dec 2-core machine, README).
default-model: env
	$(PY) -m dials_cnn.default_model --model default

fast-model: env
	$(PY) -m dials_cnn.default_model --model fast

benchmark: env
	$(PY) benchmarks/throughput.py

clean:
	rm -rf .make demo_run work_data
