#!/usr/bin/env bash
# Write the exact versions installed in .venv to scripts/constraints.txt (see scripts/update_constraints.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The tested set: exact versions of every package in .venv when CI last passed (Linux x86-64, Python 3.11)."
  echo "# scripts/setup.sh installs with these; scripts/update_constraints.sh makes a new set. Do not edit by hand."
  .venv/bin/python -m pip freeze --disable-pip-version-check --exclude-editable | grep -v '^flamingo[= @]'
} > scripts/constraints.txt
echo "wrote scripts/constraints.txt ($(grep -vc '^#' scripts/constraints.txt) packages)"
