#!/usr/bin/env bash
# The GPU check, in one script (this project is only now and then lent a GPU for a few minutes):
#
#     bash speed/device_check.sh OUTDIR        # OUTDIR gets the logs, the summaries and bench_cuda*.json
#     ONLY="tests run bench bench_compiled" bash speed/device_check.sh OUTDIR; ONLY=default_training bash ...
#                                              # the same in two calls of under 10 minutes each
#
# 1. the fidelity tests (the authors' recorded meta-step, every path), the fast-vs-plain
#    and merged-T-gradient tests, on the GPU (MACAW_TEST_DEVICE=cuda);
# 2. `python macaw.py --env cheetah-dir --device cuda` end to end (data, training, evaluation, summary,
#    plot) on tiny data (2,000 collector steps per task) with 300 meta-steps: it checks that the code is
#    device-clean, not that it learns;
# 3. speed/meta_step.py --device cuda (1 CPU thread; plain, vmap and merged paths, 2 and 5 tasks),
#    then plain beside compiled and "graphs" (compiled in torch.compile's reduce-overhead mode: CUDA graphs;
#    their compile times are reported);
# 4. the default cheetah-dir training on the GPU, timed: 15,000 meta-steps with --compile and the full
#    evaluation, on data from a short collector (20,000 steps per task: making the default data is CPU work,
#    about an hour, timed on CPUs in the README), so its wall time is the training part of a first run.
# Each step's output is kept even if a later one fails; the exit status says whether any failed.
set -uo pipefail
out=${1:-runs/device-check}
work=${WORK:-/tmp/macaw-device-check}
mkdir -p "$out" "$work"
status=0
only=${ONLY:-tests run bench bench_compiled default_training}  # e.g. ONLY=default_training: one step per call
step() {  # step NAME COMMAND...: run it, keep its output in OUTDIR/NAME.log
    local name=$1; shift
    [[ " $only " == *" $name "* ]] || return 0
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
[[ " $only " != *" run "* ]] || cp "$work/runs/cuda/summary.json" "$out/run_summary.json" 2>/dev/null || { echo "!!! no summary.json"; status=1; }
step bench timeout 240 python speed/meta_step.py --device cuda --threads 1 --repeats 3 --seconds 2 \
    --no-collector --out "$out/bench_cuda.json"
step bench_compiled timeout 300 python speed/meta_step.py --device cuda --threads 1 --repeats 3 --seconds 2 \
    --paths plain compiled graphs --no-collector --out "$out/bench_cuda_compiled.json"
step default_training timeout 540 python macaw.py --env cheetah-dir --device cuda --compile --collector-steps 20000 \
    --data-dir "$work/data20k" --out "$work/runs" --run-name cuda-default
[[ " $only " != *" default_training "* ]] || cp "$work/runs/cuda-default/summary.json" "$out/default_training_summary.json" 2>/dev/null || status=1
exit $status
