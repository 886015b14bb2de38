"""Collector study: one SAC agent per task (the default) against one shared, task-conditioned agent.

    python speed/collector_designs.py                       # cheetah-vel, 40 tasks, 40k steps each
    python speed/collector_designs.py --width 256 --steps 40000 --env cheetah-vel

Makes a benchmark's data with the shared collector (`--collector-design shared`: one agent per worker process,
the observation plus a one-hot task code as its input, one update per lock-step on a batch of random
(task, transition) pairs, each task's transitions kept in that task's buffer) into data-designs/, exactly
as `python macaw.py` would make it, and reports its wall time, CPU-minutes, the final deterministic
collectors' returns and the buffers' learning curves beside those of the per-task data in data/<env>/
(or --per-task-data-dir; its CPU time is read from --per-task-cpu-min, measured when it was made).
Writes results/speed/collector_designs_<env>.json. The default collector is not changed by this script.
"""
import argparse
import datetime
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
import macaw  # noqa: E402
from collector_curves import curves  # noqa: E402


def summary(cfg, bench):
    steps, per_task, finals, randoms, _ = curves(cfg, bench)
    return dict(collector_return_mean=float(np.mean(finals)), collector_return_min=float(min(finals)),
                collector_return_max=float(max(finals)), random_return_mean=float(np.mean(randoms)),
                collector_return=finals, curve_steps=steps.tolist(),
                curve_mean_episode_return=np.nanmean(per_task, 0).tolist())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="cheetah-vel")
    parser.add_argument("--width", type=int, default=256, help="width of the shared agent")
    parser.add_argument("--steps", type=int, default=-1, help="env steps per task; -1 = the benchmark's default")
    parser.add_argument("--per-task-cpu-min", type=float, default=None,
                        help="CPU-minutes the per-task data in data/<env>/ took (from when it was made)")
    parser.add_argument("--per-task-data-dir", default="data", help="where the per-task data are")
    parser.add_argument("--per-task-width", type=int, default=-1, help="their collectors' width; -1 = the benchmark's default")
    args = parser.parse_args()
    bench = macaw.get_benchmark(args.env)
    cfg = macaw.parse_config(["--env", args.env, "--data-dir", "data-designs", "--collector-design", "shared",
                              "--collector-width", str(args.width), "--collector-steps", str(args.steps)]).resolve(bench)
    wall = time.perf_counter()
    macaw.ensure_data(cfg, bench)
    wall = time.perf_counter() - wall
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    shared = dict(design="shared", width=cfg.collector_width, steps=cfg.collector_steps, wall_min=round(wall / 60, 2),
                  cpu_min=round((cpu.ru_utime + cpu.ru_stime) / 60, 2), **summary(cfg, bench))
    records = [shared]
    default = macaw.parse_config(["--env", args.env, "--data-dir", args.per_task_data_dir, "--collector-design",
                                  "per-task", "--collector-width", str(args.per_task_width)]).resolve(bench)
    if not macaw.missing_tasks(default, bench):
        records.append(dict(design="per-task", width=default.collector_width, steps=default.collector_steps,
                            cpu_min=args.per_task_cpu_min, **summary(default, bench)))
    for r in records:
        cpu = f"{r['cpu_min']:.1f} CPU-min" if r["cpu_min"] else "CPU time not given"
        print(f"{r['design']:>8} width {r['width']}, {r['steps']} steps per task: {cpu}; final collectors mean "
              f"{r['collector_return_mean']:.1f} (min {r['collector_return_min']:.1f}, max {r['collector_return_max']:.1f}); "
              f"random {r['random_return_mean']:.1f}")
        print("          buffer's mean episode return by step: " + ", ".join(
            f"{s / 1000:.0f}k {m:.0f}" for s, m in list(zip(r["curve_steps"], r["curve_mean_episode_return"]))[1::2]))
    stamp = dict(env=args.env, commit=macaw.git_commit(), date=datetime.date.today().isoformat(),
                 cpu=macaw.versions()["machine"])
    macaw.write_json(ROOT / "results" / "speed" / f"collector_designs_{args.env}.json", [dict(r, **stamp) for r in records])
