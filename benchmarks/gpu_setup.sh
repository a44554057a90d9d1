#!/usr/bin/env bash
# The device recipe for benchmarks/bench_gpu_qlora.py, so no session has to rediscover it.
#
# The lent GPU image (python 3.12, torch 2.11.0+cu130) has transformers 5.17 and lacks a pinned peft,
# bitsandbytes and datasets, and it cannot reach any package index. So the wheels travel with the working tree in
# the git-ignored folder .whl/ (the device tool carries at most 64 MiB in all):
#
#   bash benchmarks/gpu_setup.sh local      # here (needs PyPI): download the wheels, unpack bitsandbytes without
#                                           # its CUDA 11/12, ROCm and XPU libraries (43 MB -> 8 MB), check sizes
#   bash benchmarks/gpu_setup.sh device     # there (carry [".whl"]): pip install --target /tmp/site, check imports
#   bash benchmarks/gpu_setup.sh bench      # there: device + the benchmark, results in $OUT (or /tmp/gpu-out)
#   bash benchmarks/gpu_setup.sh sweep [MIN] [WORKERS]   # there: device + the study's sweep on the machine's CPU
#                                           # cores (default 8 min, 14 workers, CUDA hidden so runs match the
#                                           # CPU path), the finished runs exported compact to $OUT/study; copy
#                                           # them into assets/study here and run tools/update_readme_study.py.
#                                           # Untested on a device so far (no machine was lent since it was written).
#
# Then on the device, anything else runs with PYTHONPATH=/tmp/site:$PWD.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="$ROOT/.whl"
SITE=/tmp/site
PINS=(transformers==5.23.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
BNB=bitsandbytes==0.50.2
LIMIT_MIB=60   # the tool's limit is 64 MiB for the whole carried tree; leave room
PY="${PYTHON:-python3}"

local_half() {
    git -C "$ROOT" check-ignore -q .whl/x.whl || { echo "error: .whl/ is not git-ignored" >&2; exit 1; }
    mkdir -p "$WHL"
    local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$WHL" "${PINS[@]}"
    # bitsandbytes: unpack, keep the CPU and CUDA 13.x libraries (torch 2.11+cu130 there), drop the rest
    local tmp; tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$BNB"
    rm -rf "$WHL/bnb"
    mkdir -p "$WHL/bnb"
    "$PY" -m zipfile -e "$tmp"/bitsandbytes-*.whl "$WHL/bnb"
    rm -rf "$tmp"
    find "$WHL/bnb/bitsandbytes" -name 'libbitsandbytes_*.so' \
        \( -name '*cuda11*' -o -name '*cuda12*' -o -name '*rocm*' -o -name '*xpu*' \) -delete
    ls "$WHL/bnb/bitsandbytes"/libbitsandbytes_cuda13*.so >/dev/null   # the library the device needs is there
    echo "carried wheels:"; ls -1 "$WHL"
    local whl_kib tree_kib
    whl_kib=$(du -sk "$WHL" | cut -f1)
    # what else travels: tracked files plus untracked files git does not ignore
    tree_kib=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -ck 2>/dev/null \
               | tail -1 | cut -f1)
    echo "size: .whl $((whl_kib / 1024)) MiB + working tree $((tree_kib / 1024)) MiB (limit ${LIMIT_MIB} MiB)"
    if (( (whl_kib + tree_kib) / 1024 > LIMIT_MIB )); then
        echo "error: the carried tree would exceed ${LIMIT_MIB} MiB" >&2; exit 1
    fi
}

device_half() {
    [[ -d "$WHL/bnb/bitsandbytes" ]] || { echo "error: $WHL/bnb missing: run 'local' here and carry .whl" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
    cp -r "$WHL/bnb/." "$SITE/"
    PYTHONPATH="$SITE:$ROOT" "$PY" - <<'EOF'
import torch, transformers, peft, bitsandbytes, datasets
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__, "| datasets", datasets.__version__)
assert transformers.__version__ == "5.23.0", transformers.__file__
EOF
}

case "${1:-}" in
    local) local_half ;;
    device) device_half ;;
    bench)
        device_half
        out="${OUT:-/tmp/gpu-out}"; mkdir -p "$out"
        # the previous run's settings (G = 4 x 512 new tokens, 448 px image -> 256 image tokens), 3 steps
        PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1 "$PY" "$ROOT/benchmarks/bench_gpu_qlora.py" --steps 3 \
            --json "$out/gpu_qlora.json" "${@:2}" 2>&1 | tee "$out/gpu_qlora.log"
        ;;
    sweep)
        device_half
        out="${OUT:-/tmp/gpu-out}"; mkdir -p "$out"
        minutes="${2:-8}"; workers="${3:-14}"
        rm -rf /tmp/study && cp -r "$ROOT/assets/study" /tmp/study   # shipped runs count as done
        export PYTHONPATH="$SITE:$ROOT" CUDA_VISIBLE_DEVICES="" CALIBRL_QUIET=1 PYTHONUNBUFFERED=1
        "$PY" -c "import calibrl.sweep, calibrl.trainer, calibrl.sweep_summary, tqdm, pandas" \
            || { echo "error: a module the sweep needs is missing on the device (see above)" >&2; exit 1; }
        # SIGINT at the deadline: runs in flight stop; only finished runs are exported
        timeout --signal=INT "$((minutes * 60))" "$PY" -m calibrl sweep "$ROOT/assets/study/spec.json" \
            --out /tmp/study --workers "$workers" 2>&1 | tr '\r' '\n' | tail -40 | tee "$out/sweep.log" || true
        "$PY" -m calibrl sweep "$ROOT/assets/study/spec.json" --out /tmp/study --summarize-only \
            --export "$out/study" 2>&1 | tail -3 | tee -a "$out/sweep.log"
        ;;
    *) echo "usage: $0 local|device|bench [bench_gpu_qlora.py options]|sweep [MIN] [WORKERS]" >&2; exit 2 ;;
esac
