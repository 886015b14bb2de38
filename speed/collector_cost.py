"""Speed: the CPU time of two SAC collector recipes for one benchmark, measured in one sitting.

    python speed/collector_cost.py   # cheetah-dir: 300k steps at lr 3e-4 (the old default) against 90k at 1e-3

A collector's cost per env step is one env step plus one SAC update on a batch drawn from its buffer so far, so
it grows with the buffer (random rows from a larger array miss the caches more). For each recipe this times the
real loop (collect_sac, one task, 1 thread) over --window env steps at several buffer fills across its run, each
started from a checkpoint holding a buffer of that size; the recipes and fills take turns, --repeats rounds. One
recipe's CPU time per task is the median cost per step at each fill times the steps nearest that fill, summed.
Writes results/speed/collector_cost_<env>.json.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "speed"))
import macaw  # noqa: E402
from meta_step import cpu_name  # noqa: E402


def seconds_per_step(bench, width, lr, fill, window, folder):
    """Median seconds per env step of collect_sac on one task over `window` steps, from a buffer of `fill` rows."""
    env = macaw.make_task_env(bench, 0)
    obs = env.reset(seed=0)[0]
    agent = macaw.SAC(1, env.observation_space.shape[0], env.action_space.shape[0], width, lr)
    rng = np.random.default_rng(0)
    dims = dict(observations=obs.shape[0], actions=env.action_space.shape[0], next_observations=obs.shape[0])
    buffers = {k: rng.standard_normal((1, fill, dims[k]) if k in dims else (1, fill)).astype(np.float32)
               for k in macaw.BUFFER_KEYS}  # (the values do not change the cost; terminations all nonzero is fine)
    checkpoint = Path(folder) / "collector.pt"
    torch.save(dict(agent=agent.state_dict(), optimizers=[o.state_dict() for o in agent.optimizers()], t=fill,
                    buffers=buffers, rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                    envs=[macaw.env_state(env)], obs=obs[None].copy(), episode_return=np.zeros(1),
                    last_returns=np.zeros(1)), checkpoint)
    stamps = []

    def stop():  # called after every step: a timestamp each, and the stop once the window is done
        stamps.append(time.perf_counter())
        return len(stamps) > window
    try:
        macaw.collect_sac([env], fill + window + 10, seed=0, checkpoint=checkpoint, should_stop=stop, width=width,
                          lr=lr, position=0)
    except macaw.Interrupted:
        pass
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="cheetah-dir")
    parser.add_argument("--recipes", nargs="+", default=["300000:3e-4", "90000:1e-3"], help="steps:learning-rate")
    parser.add_argument("--fills", type=int, default=5, help="buffer fills timed per recipe, evenly over its run")
    parser.add_argument("--window", type=int, default=1500, help="env steps timed at each fill")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = macaw.get_benchmark(args.env)
    width = bench.defaults["collector_width"]
    recipes = [(int(r.split(":")[0]), float(r.split(":")[1])) for r in args.recipes]
    # fill i sits in the middle of the i-th of `fills` equal parts of the run
    fills = {r: [int(r[0] * (i + 0.5) / args.fills) for i in range(args.fills)] for r in recipes}
    times = {(r, f): [] for r in recipes for f in fills[r]}
    with tempfile.TemporaryDirectory() as folder, macaw.mujoco_warnings():
        for _ in range(args.repeats):
            for r in recipes:
                for f in fills[r]:
                    times[r, f].append(seconds_per_step(bench, width, r[1], f, args.window, folder))
    records = []
    for r in recipes:
        per_step = [statistics.median(times[r, f]) for f in fills[r]]
        cpu_min = sum(per_step) * r[0] / args.fills / 60
        records.append(dict(steps=r[0], lr=r[1], width=width, fills=fills[r], s_per_step=[round(s, 6) for s in per_step],
                            s_per_step_each=[[round(s, 6) for s in times[r, f]] for f in fills[r]],
                            cpu_min_per_task=round(cpu_min, 2), cpu_min_all_tasks=round(cpu_min * len(bench.tasks), 1)))
        print(f"{r[0]:,} steps at lr {r[1]:g}: " + ", ".join(f"{1 / s:.0f}" for s in per_step)
              + f" env steps/s at fills {fills[r]}; {cpu_min:.1f} CPU min per task, {len(bench.tasks)} tasks "
              f"{cpu_min * len(bench.tasks):.1f}")
    ratio = records[1]["cpu_min_per_task"] / records[0]["cpu_min_per_task"]
    print(f"the second recipe costs {ratio:.2f} of the first")
    macaw.write_json(ROOT / "results" / "speed" / f"collector_cost_{args.env}.json", dict(
        kind="collector_cost", env=args.env, recipes=records, ratio=round(ratio, 3), window=args.window,
        repeats=args.repeats, device=f"{cpu_name()}, 1 thread", commit=macaw.git_commit(),
        date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
