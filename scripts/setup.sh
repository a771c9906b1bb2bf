#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the package and its test extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Checked from / so that the source folder in the working directory does not count as installed.
if ! (cd / && "$ROOT/.venv/bin/python" -c "import flamingo, flamingo_train, flamingo_eval, open_flamingo, pytest, pycocoevalcap, lemminflect, nltk, inflection") 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # OpenFlamingo is only the reference for the parity tests. Its metadata pins torch==2.0.1, so it is installed
  # without dependencies; the one import it needs beyond ours (einops-exts) comes with the test extra.
  .venv/bin/python -m pip install --quiet --no-deps "open-flamingo==2.0.1"
fi
