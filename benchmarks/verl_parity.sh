#!/usr/bin/env bash
# Build a separate venv with verl 0.9.1 (it pins an older transformers and pulls ray) and run our parity test
# against verl's policy loss, loss aggregation and GRPO advantage.
# Usage: bash benchmarks/verl_parity.sh [extra pytest args]      (from anywhere; idempotent)
#        VERL_TESTS="tests/test_integrations_verl.py" bash benchmarks/verl_parity.sh   (other test files; see verl_plugin.sh)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_VENV:-$REPO/.verl-venv}"
CONSTRAINTS="$REPO/.ci/constraints.txt"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import verl.trainer.ppo.core_algos, verl.workers.utils.losses" >/dev/null 2>&1; then
  echo "== installing torch (CPU, constrained), verl 0.9.1 without its deps, and the few deps core_algos needs"
  python -m pip install -q --upgrade pip
  python -m pip install -q -c "$CONSTRAINTS" torch==2.13.0
  python -m pip install -q --no-deps verl==0.9.1
  # verl/__init__ imports verl.protocol -> ray, tensordict, transformers (verl's own pins), omegaconf, codetiming, orjson
  python -m pip install -q -c "$CONSTRAINTS" ray "tensordict>=0.8.0,<=0.10.0,!=0.9.0" "transformers>=5.5.3,<5.11,!=5.6.0" \
    omegaconf codetiming orjson numpy pytest hypothesis datasets pillow  # the last two: verl.workers.utils.losses
fi
export VERL_USE_EXTERNAL_PLUGINS=none
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
echo "== versions"
python - <<'PY'
import importlib.metadata as md
for p in ("verl", "torch", "ray", "tensordict"):
    print(f"{p}=={md.version(p)}")
PY
TESTS="${VERL_TESTS:-tests/test_verl_parity.py}"
echo "== pytest $TESTS"
cd "$REPO"
# shellcheck disable=SC2086
python -m pytest $TESTS -v -p no:cacheprovider --rootdir "$REPO" -c /dev/null "$@"
