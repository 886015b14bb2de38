#!/usr/bin/env bash
# The GPU check, in one script (this project is only now and then lent a GPU for a few minutes):
#
#     bash speed/device_check.sh OUTDIR        # OUTDIR gets the logs, the summaries and bench_cuda*.json
#
# 1. the fidelity tests (the authors' recorded meta-step, every path), the fast-vs-plain
#    and merged-T-gradient tests, on the GPU (MACAW_TEST_DEVICE=cuda);
# 2. `python macaw.py --env cheetah-dir --device cuda` end to end (data, training, evaluation, summary,
#    plot) on tiny data (2,000 collector steps per task) with 300 meta-steps: it checks that the code is
#    device-clean, not that it learns;
# 3. speed/meta_step.py --device cuda (1 CPU thread; plain, vmap and merged paths, 2 and 5 tasks),
#    then the compiled path beside plain (its compile time is reported).
# Each step's output is kept even if a later one fails; the exit status says whether any failed.
set -uo pipefail
out=${1:-runs/device-check}
work=${WORK:-/tmp/macaw-device-check}
mkdir -p "$out" "$work"
status=0
step() {  # step NAME COMMAND...: run it, keep its output in OUTDIR/NAME.log
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1 || { echo "!!! $name failed"; status=1; }
    tail -n 25 "$out/$name.log"
    echo "=== $name: $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, gymnasium, mujoco, numpy; print('torch', torch.__version__, '| numpy', numpy.__version__,
'| gymnasium', gymnasium.__version__, '| mujoco', mujoco.__version__, '| cuda available:', torch.cuda.is_available())"
export PYTHONUNBUFFERED=1

step tests env MACAW_TEST_DEVICE=cuda python -m pytest -q -p no:nbmake -o addopts="" test_macaw.py \
    -k "authors or paper_width or same_meta_gradient or merged"
step run python macaw.py --env cheetah-dir --device cuda --collector-steps 2000 --steps 300 --eval-every 100 \
    --eval-rollouts 2 --final-eval-rollouts 3 --data-dir "$work/data" --out "$work/runs" --run-name cuda
cp "$work/runs/cuda/summary.json" "$out/run_summary.json" 2>/dev/null || { echo "!!! no summary.json"; status=1; }
step bench timeout 240 python speed/meta_step.py --device cuda --threads 1 --repeats 3 --seconds 2 \
    --no-collector --out "$out/bench_cuda.json"
step bench_compiled timeout 240 python speed/meta_step.py --device cuda --threads 1 --repeats 3 --seconds 2 \
    --paths plain compiled --no-collector --out "$out/bench_cuda_compiled.json"
exit $status
