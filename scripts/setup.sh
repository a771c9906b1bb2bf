#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the package, its test extras and the
# OpenFlamingo reference, at the exact versions of scripts/constraints.txt: the set CI last passed with, so the
# README's commands give a tested set on any later day. Safe to run again: it reinstalls only when the constraints
# or pyproject.toml changed.
#
# FLAMINGO_CONSTRAINTS=none installs the newest releases instead (scripts/update_constraints.sh uses it to make a
# new tested set).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${FLAMINGO_CONSTRAINTS:-scripts/constraints.txt}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ "$CONSTRAINTS" = none ]; then
  pin=()
  wanted="newest $(date +%F)"
else
  pin=(--constraint "$CONSTRAINTS")
  wanted=$(cat "$CONSTRAINTS" pyproject.toml | sha256sum | cut -d' ' -f1)
fi
stamp=.venv/.flamingo-setup
# Imported from / so that the source folder in the working directory does not count as installed.
versions() {
  (cd / && "$ROOT/.venv/bin/python" -c "
import flamingo, flamingo_train, flamingo_eval, open_flamingo, pytest
import accelerate, open_clip, torch, transformers
print(f'transformers {transformers.__version__}, torch {torch.__version__}, open_clip {open_clip.__version__}, '
      f'accelerate {accelerate.__version__}')") 2>/dev/null
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! installed=$(versions); then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${pin[@]}" -e ".[test]"
  # OpenFlamingo is only the reference for the parity tests. Its metadata pins torch==2.0.1, so it is installed
  # without dependencies; the one import it needs beyond ours (einops-exts) comes with the test extra.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${pin[@]}" --no-deps "open-flamingo==2.0.1"
  echo "$wanted" > "$stamp"
  installed=$(versions)
fi
echo "set up .venv: $installed ($([ "$CONSTRAINTS" = none ] && echo 'newest releases' || echo "tested set $CONSTRAINTS"))"
