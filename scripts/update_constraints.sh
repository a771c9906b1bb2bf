#!/usr/bin/env bash
# Make a new tested set: rebuild .venv from the newest releases (with every extra, the notebooks' included, so that
# scripts/setup.sh --notebooks is pinned too), run the whole suite and the transformers-range tests, and only if
# everything passes, write the exact versions to scripts/constraints.txt (commit it with the change that needed it).
# Replaces .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv
FLAMINGO_CONSTRAINTS=none bash scripts/setup.sh --test --notebooks
.venv/bin/python -m pytest tests
bash scripts/test_transformers_range.sh
bash scripts/freeze_constraints.sh
