#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the package and its test extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import flamingo, open_flamingo, pytest" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # OpenFlamingo is only the reference for the parity tests. Its metadata pins torch==2.0.1, so it is installed
  # without dependencies; the one import it needs beyond ours (einops-exts) comes with the test extra.
  .venv/bin/python -m pip install --quiet --no-deps "open-flamingo==2.0.1"
fi
