#!/usr/bin/env bash
# Installs everything (system packages and .venv), then runs the main job: train the speech
# recognizer on the built-in espeak-ng corpus (built on first use: about 15 hours of audio,
# synthesised in about 4 minutes on 2 cores).
# Extra arguments go to `python -m pipelines.asr train`, e.g. `optim.max_minutes=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pipelines.asr train "$@"
