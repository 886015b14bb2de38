"""Speed: MACAW meta-steps per second at the paper's network sizes, each form of the step side by side.

    python speed/meta_step.py                  # the full table; writes results/speed/meta_step_<cpu>.json
    python speed/meta_step.py --repeats 3 --seconds 3 --no-collector   # a quicker look

For 2 and 5 tasks and 1 and 2 threads it times full `meta_train_step` calls (inner + outer + Adam)
on synthetic cheetah-sized data (17-d observations, 6-d actions), for each path:
    plain  section 6 of macaw.py as written: a Python loop over tasks, the inner step as a stepped copy of
           every tensor (python macaw.py --plain)
    vmap   section 10's fast inner step (no stepped copy of T), vectorised over tasks with torch.func.vmap,
           each T's meta-gradient left to autograd (fast_meta_train_step with merge=False)
    merged the default: vmap, with each T's meta-gradient formed in one matrix product
           (merged_transform_losses)
    compiled  (--compile here and in macaw.py) the merged path as one pure function of the meta-parameters,
           torch.func.grad(meta-objective), compiled with torch.compile (its compile time is reported;
           autograd's double backward, which the other paths use, cannot be compiled)
    graphs the compiled path in torch.compile's "reduce-overhead" mode: CUDA graphs on a GPU (--paths ... graphs)
Each path warms up, then runs `--repeats` timing windows of `--seconds`; the table gives the median,
min and max meta-steps/s, the speedup over plain, the FLOPs of one meta-step
(torch.utils.flop_counter) and the utilisation: FLOPs x steps/s / the float32 matmul FLOP/s measured
in the same run. Then the data collector's env steps/s, and the peak memory of one training step.
Paths are interleaved within each repeat, so a noisy neighbour slows all of them alike.
"""
import argparse
import datetime
import multiprocessing
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402

PATHS = ("plain", "vmap", "merged")
# The same paths in the flags of commits before section 10 existed (compare_commits.py may time one).
OLD_FLAGS = {"plain": dict(plain_inner_step=True, vmap_tasks=False), "vmap": dict(merge_transform_gradients=False),
             "merged": {}, "compiled": {}}
OBS_DIM, ACT_DIM = 17, 6


def synthetic_batches(cfg, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        return dict(obs=torch.randn(n, OBS_DIM, generator=g), actions=torch.rand(n, ACT_DIM, generator=g) * 2 - 1,
                    mc_return=torch.randn(n, generator=g) * 100, terminal_obs=torch.randn(n, OBS_DIM, generator=g),
                    terminal_discount=torch.rand(n, generator=g))
    return [(batch(cfg.inner_batch), batch(cfg.outer_batch)) for _ in range(tasks)]


def setup(path, tasks, device, macaw=macaw):
    """(cfg, model, optimizers, batches, step) for one path; `macaw`: the module to time (speed/compare_commits.py
    passes another commit's)."""
    sectioned = hasattr(macaw, "meta_step_function")  # False: a commit before section 10 existed
    cfg = macaw.Config(device=device, **(dict(plain=path == "plain") if sectioned else OLD_FLAGS[path]))
    torch.manual_seed(0)
    model = macaw.MACAW(OBS_DIM, ACT_DIM, cfg).to(device)
    batches = [tuple({k: v.to(device) for k, v in b.items()} for b in pair) for pair in synthetic_batches(cfg, tasks)]
    if not sectioned:
        optimizers = macaw.make_optimizers(model, cfg)
        gradient = macaw.compiled_meta_gradient(model, tasks, cfg) if path == "compiled" else None
        return cfg, model, optimizers, batches, lambda b: macaw.meta_train_step(model, optimizers, b, len(b), cfg, gradient)
    optimizers, default_step = macaw.meta_step_function(model, tasks, cfg)  # what train() runs (plain: --plain)
    if path in ("compiled", "graphs"):  # macaw.py's --compile; "graphs": the same with CUDA graphs
        gradient = macaw.compiled_meta_gradient(model, tasks, cfg, mode="reduce-overhead" if path == "graphs" else None)
        grads, _ = gradient({k: v.detach() for k, v in model.named_parameters()}, batches)  # compiles
        macaw.fast_meta_objective(model, batches, tasks, cfg)[0].backward()  # check it against eager autograd
        error = max(((grads[k] - p.grad).norm() / p.grad.norm()).item()
                    for k, p in model.named_parameters() if p.grad.norm() > 0)
        model.zero_grad(set_to_none=True)
        print(f"{'':>14} (compiled meta-gradient vs eager: largest relative difference per tensor {error:.1e})")
        assert error < 1e-4, error
        step = lambda b: macaw.fast_meta_train_step(model, optimizers, b, len(b), cfg, True, gradient)
    elif path == "vmap":
        step = lambda b: macaw.fast_meta_train_step(model, optimizers, b, len(b), cfg, merge=False)
    else:
        step = default_step
    return cfg, model, optimizers, batches, step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steps_per_second(state, seconds, device):
    batches, step = state[3], state[4]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        step(batches)
        n += 1
    sync(device)
    return n / (time.perf_counter() - start)


class GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break torch.func.grad;
    only the total is needed here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flops_per_step(state):
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()
    with counter:
        state[4](state[3])
    return counter.get_total_flops()


def matmul_flops_per_second(device, n=2048, repeats=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {here!r})
import meta_step as b
torch.set_num_threads(1)
state = b.setup({path!r}, {tasks}, {device!r})
def status(key):  # kB from /proc/self/status
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
if {device!r} == "cpu":
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident set
else:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 1024
for _ in range(3):
    state[4](state[3])
peak = status("VmHWM:") if {device!r} == "cpu" else torch.cuda.max_memory_allocated() / 1024
print((peak - base) / 1024)
"""


def peak_memory_mb(path, tasks, device):
    """Peak extra memory of three training steps over the set-up (weights, batches), in a fresh
    process (CPU: resident set, Linux; CUDA: the allocator's peak)."""
    code = MEMORY_PROBE.format(here=str(ROOT / "speed"), path=path, tasks=tasks, device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def collector_worker(task_ids, steps, random_steps, width=128, shared=False):
    """One collector process: cheetah-dir-style tasks (task k runs direction k % 2) in lock-step, seeded
    as ensure_data seeds a group (its first task id). Returns (CPU seconds, each collector's return)."""
    torch.set_num_threads(1)
    bench = macaw.BENCHMARKS["cheetah-dir"]
    envs = [macaw.make_task_env(bench, k % 2) for k in task_ids]
    start = time.process_time()
    datas = macaw.collect_sac(envs, steps, task_ids[0], random_steps=random_steps, width=width, shared=shared)
    return time.process_time() - start, [float(d["collector_return"]) for d in datas]


def run_collectors(groups, steps, random_steps, width=128, shared=False):
    """One worker process per group of task ids, as ensure_data runs them: (wall seconds, results)."""
    with multiprocessing.get_context("spawn").Pool(len(groups)) as pool:
        start = time.perf_counter()
        results = pool.starmap(collector_worker, [(g, steps, random_steps, width, shared) for g in groups])
        return time.perf_counter() - start, results


def collector_env_steps_per_second(tasks, steps, random_steps=200, width=128, shared=False):
    """Env steps per second of the whole collector (one process per core, as ensure_data runs it),
    including the random-action warm-up and the final evaluation episodes."""
    groups = [g.tolist() for g in np.array_split(range(tasks), min(multiprocessing.cpu_count(), tasks))]
    wall, _ = run_collectors(groups, steps, random_steps, width, shared)
    return tasks * steps / wall


def collector_settings():
    """The collector settings timed, (tasks, design, width), read from the benchmarks' defaults: 2 tasks as
    cheetah-dir makes its data; 40 tasks with each design and width the many-task benchmarks use (today
    per-task 64: ant-dir, walker-params; shared 256: cheetah-vel), and per-task 128 beside them, the width
    the first 40-task measurement used."""
    def setting(bench):
        return bench.defaults["collector_design"], bench.defaults["collector_width"]
    many = {setting(b) for b in macaw.BENCHMARKS.values() if b.collector == "sac" and len(b.tasks) > 2}
    return [(2, *setting(macaw.BENCHMARKS["cheetah-dir"]))] + [(40, *s) for s in sorted(many | {("per-task", 128)})]


def record(kind, **fields):
    return dict(kind=kind, **fields, device=DEVICE_NAME, commit=macaw.git_commit(), date=datetime.date.today().isoformat())


def cpu_vendor():
    """A short name for the CPU, for the output file: epyc, xeon, or the model name made file-safe."""
    name = cpu_name().lower()
    return next((v for v in ("epyc", "xeon") if v in name), "".join(c if c.isalnum() else "_" for c in name)[:24])


def cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    global DEVICE_NAME
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4, help="length of one timing window")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per path and setting")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=[*PATHS, "compiled", "graphs"])
    parser.add_argument("--compile", action="store_true", help="also time the compiled path (minutes of compiling)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-collector", action="store_true", help="skip the data-collector benchmark")
    parser.add_argument("--collector-steps", type=int, default=1200, help="env steps per task in the collector benchmark")
    parser.add_argument("--out", default=str(ROOT / "results" / "speed" / f"meta_step_{cpu_vendor()}.json"))
    args = parser.parse_args()
    DEVICE_NAME = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else f"{cpu_name()}, {torch.get_num_threads()} cores visible to torch")
    records = []
    paths = args.paths + (["compiled"] if args.compile and "compiled" not in args.paths else [])
    print(f"torch {torch.__version__}, device: {DEVICE_NAME}; {args.repeats} x {args.seconds:g} s per cell")
    print(f"{'tasks':>5} {'threads':>7} {'path':>6} {'steps/s median':>15} {'(min-max)':>13} {'vs plain':>9} "
          f"{'GFLOP/step':>11} {'matmul GFLOP/s':>15} {'utilisation':>12}")
    for tasks in args.tasks:
        for threads in args.threads:
            torch.set_num_threads(threads)
            matmul = matmul_flops_per_second(args.device)
            states, compile_s = {}, {}
            for p in paths:
                start = time.perf_counter()
                states[p] = setup(p, tasks, args.device)
                steps_per_second(states[p], 0.5, args.device)  # warm-up (and, for "compiled", compiling)
                if p in ("compiled", "graphs"):
                    compile_s[p] = time.perf_counter() - start
            rates = {p: [] for p in paths}
            for _ in range(args.repeats):
                for p in paths:  # interleaved
                    rates[p].append(steps_per_second(states[p], args.seconds, args.device))
            median = {p: statistics.median(r) for p, r in rates.items()}
            for p in paths:
                eager = setup("merged", tasks, args.device) if p in ("compiled", "graphs") else states[p]
                flops = flops_per_step(eager)  # (compiled: its arithmetic, counted on the eager merged step)
                speedup = median[p] / median["plain"] if "plain" in median else None
                util = flops * median[p] / matmul
                print(f"{tasks:>5} {threads:>7} {p:>6} {median[p]:15.2f} {f'({min(rates[p]):.1f}-{max(rates[p]):.1f})':>13} "
                      f"{f'{speedup:.2f}x' if speedup else '':>9} {flops / 1e9:11.2f} {matmul / 1e9:15.1f} {util:11.1%}",
                      flush=True)
                records.append(record("meta_step", tasks=tasks, threads=threads, path=p,
                                      steps_per_s=round(median[p], 3), min=round(min(rates[p]), 3),
                                      max=round(max(rates[p]), 3),
                                      speedup_vs_plain=round(speedup, 3) if speedup else None,
                                      flops_per_step=flops, matmul_flops_per_s=round(matmul),
                                      utilisation=round(util, 4),
                                      **({"compile_s": round(compile_s[p], 1)} if p in compile_s else {})))
            for p, seconds in compile_s.items():
                print(f"{'':>14} ({p}: {seconds:.0f} s of compiling before the first step)")
    print("\npeak memory of a training step (5 tasks, over the set-up):")
    for p in [p for p in args.paths if p not in ("compiled", "graphs")]:  # (the compiled path would measure the compiler)
        mb = peak_memory_mb(p, 5, args.device)
        print(f"  {p:>6}: {mb:.0f} MB")
        records.append(record("memory", tasks=5, path=p, peak_mb=round(mb, 1)))
    if not args.no_collector:
        print(f"\ndata collector (SAC, {args.collector_steps} steps per task, 200 of them random, one worker per core):")
        for tasks, design, width in collector_settings():
            rate = collector_env_steps_per_second(tasks, args.collector_steps, width=width, shared=design == "shared")
            print(f"  {tasks:>3} tasks, {design:>8} width {width:>3}: {rate:.0f} env steps/s in total", flush=True)
            records.append(record("collector", tasks=tasks, design=design, width=width, env_steps_per_s=round(rate, 1)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    macaw.write_json(args.out, records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
