#!/usr/bin/env bash
# The project's test command: installs what is missing, lints, then runs the test suite under the
# TensorFlow backend and the toolkit suite again under JAX. Exit code 0 only if everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

export PYTHONDONTWRITEBYTECODE=1
echo "== ruff"
.venv/bin/ruff check .

echo "== dependency audit"
bash scripts/audit.sh

workers="${TEST_WORKERS:-2}"
echo "== pytest (KERAS_BACKEND=tensorflow)"
KERAS_BACKEND=tensorflow .venv/bin/pytest -q -n "$workers" --timeout 900 --durations 15 tests

# Under JAX: the tiny end-to-end CLI trainings of both pipelines (marked both_backends) and
# everything not marked slow; the other slow tests (interrupted, repeated and bad-data
# trainings, notebooks, the browser test) run under TensorFlow above.
echo "== pytest (KERAS_BACKEND=jax)"
KERAS_BACKEND=jax .venv/bin/pytest -q -n "$workers" --timeout 900 --durations 15 \
    -m "not slow or both_backends" tests
