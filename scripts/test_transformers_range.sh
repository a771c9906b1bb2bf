#!/usr/bin/env bash
# The equivalence, generation, chat-session and OpenFlamingo-parity tests on the edges of the supported transformers range:
#   oldest: the lowest version pyproject.toml allows, with the exact packages of scripts/constraints-oldest.txt;
#   newest: the newest release pip offers at run time, with its own dependencies as pip resolves them today.
# Each is installed into a folder under .venv/ that goes first on PYTHONPATH, so it shares .venv's torch (a second
# full venv would cost 5.5 GB). Run after bash scripts/setup.sh --test; CI runs it after the full suite (.ci/run).
# Exits non-zero if any run fails, and says on which transformers version.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TESTS=(tests/test_lm_calls.py tests/test_generation.py tests/test_chat.py tests/test_media_state.py tests/test_auxiliary.py tests/test_equivalence.py tests/test_lm_side.py tests/test_openflamingo.py)
failed=()

install_oldest() {  # exact, small: only what differs from .venv (transformers and the hub/tokenizers it needs)
  local dir=.venv/transformers-oldest stamp
  stamp=$(sha256sum scripts/constraints-oldest.txt | cut -d' ' -f1)
  if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dir"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --no-deps --target "$dir" -r scripts/constraints-oldest.txt \
      >&2 || return 1
    echo "$stamp" > "$dir/.stamp"
  fi
  echo "$dir"
}

install_newest() {  # fresh every time: whatever pip resolves now
  local dir=.venv/transformers-newest
  rm -rf "$dir"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --target "$dir" transformers >&2 || return 1
  echo "$dir"
}

run_on() {  # label, folder
  local label=$1 dir=$2 versions
  versions=$(PYTHONPATH=$dir "$PY" -c \
    "import transformers, tokenizers, huggingface_hub, torch; print(f'transformers {transformers.__version__} (tokenizers {tokenizers.__version__}, huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__})')")
  echo "== $label: $versions"
  if PYTHONPATH=$dir "$PY" -m pytest "${TESTS[@]}" -p no:cacheprovider; then
    echo "== $label: passed on $versions"
  else
    echo "== $label: FAILED on $versions"
    failed+=("$label: ${versions%% (*}")
  fi
}

for label in oldest newest; do
  if dir=$(install_$label) && [ -d "$dir" ]; then
    run_on "$label supported" "$dir"
  else
    echo "== $label supported: could not install transformers (pip's messages are above)"
    failed+=("$label: install failed")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'transformers range: FAILED (%s)\n' "$(IFS=';'; echo "${failed[*]}")"
  exit 1
fi
echo "transformers range: passed"
