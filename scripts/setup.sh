#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the package at the exact versions of
# scripts/constraints.txt: the set CI last passed with, so the README's commands give a tested set on any later day.
# Safe to run again: it reinstalls only when the constraints or pyproject.toml changed, or a flag asks for more.
#
#   bash scripts/setup.sh               the package with its eval and plot extras: flamingo-demo, -train, -eval
#   bash scripts/setup.sh --test        also the test extras, the OpenFlamingo reference and headless Chromium for the web
#                                       demo's browser test (scripts/install_browser.sh; the README's test command)
#   bash scripts/setup.sh --notebooks   also JupyterLab, to open the notebooks: .venv/bin/jupyter lab notebooks/
#
# What was installed once stays installed: a later run without a flag keeps the extras of earlier runs, and keeps
# them at the tested versions when it reinstalls.
#
# FLAMINGO_CONSTRAINTS=none installs the newest releases instead (scripts/update_constraints.sh uses it to make a
# new tested set).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${FLAMINGO_CONSTRAINTS:-scripts/constraints.txt}
extras=(eval plot)
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --notebooks) extras+=(notebooks) ;;
    *) echo "scripts/setup.sh: unknown argument '$arg'; expected --test and/or --notebooks" >&2; exit 2 ;;
  esac
done
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
# The stamp: the constraints' hash on its first line, then the extras installed, one a line.
stamp=.venv/.flamingo-setup
had=$(tail -n +2 "$stamp" 2>/dev/null || true)
missing=$(for e in "${extras[@]}"; do grep -qx "$e" <<<"$had" || echo "$e"; done)
extras=($(printf '%s\n' "${extras[@]}" $had | sort -u))
# Imported from / so that the source folder in the working directory does not count as installed.
versions() {
  local more=""
  [[ " ${extras[*]} " == *" test "* ]] && more+=", open_flamingo, pytest, nbclient"
  [[ " ${extras[*]} " == *" notebooks "* ]] && more+=", jupyterlab"
  (cd / && "$ROOT/.venv/bin/python" -c "
import flamingo, flamingo_train, flamingo_eval, matplotlib$more
import accelerate, open_clip, torch, transformers
print(f'transformers {transformers.__version__}, torch {torch.__version__}, open_clip {open_clip.__version__}, '
      f'accelerate {accelerate.__version__}')") 2>/dev/null
}
if [ "$(head -n 1 "$stamp" 2>/dev/null)" != "$wanted" ] || [ -n "$missing" ] || ! installed=$(versions); then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${pin[@]}" -e ".[$(IFS=,; echo "${extras[*]}")]"
  if [[ " ${extras[*]} " == *" test "* ]]; then
    # OpenFlamingo is only the reference for the parity tests. Its metadata pins torch==2.0.1, so it is installed
    # without dependencies; the one import it needs beyond ours (einops-exts) comes with the test extra.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "${pin[@]}" --no-deps "open-flamingo==2.0.1"
  fi
  printf '%s\n' "$wanted" "${extras[@]}" > "$stamp"
  installed=$(versions)
fi
echo "set up .venv with extras ${extras[*]}: $installed ($([ "$CONSTRAINTS" = none ] && echo 'newest releases' || echo "tested set $CONSTRAINTS"))"
if [[ " ${extras[*]} " == *" test "* ]]; then
  # The browser test needs Chromium and its driver from the system's packages (installing them needs root; without
  # root the script says what to run, and the browser test fails with the same advice).
  bash scripts/install_browser.sh || echo "scripts/setup.sh: no headless Chromium: tests/test_web_demo.py will fail until it is installed" >&2
fi
