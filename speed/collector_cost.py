"""Speed: the CPU time of two SAC collector recipes for one benchmark, measured in one sitting.

    python speed/collector_cost.py --recipes 300000:3e-4:128 90000:1e-3:128 200000:1e-3:128:shared

A recipe is steps:learning-rate:width, and `:shared` for one task-conditioned agent over all the benchmark's tasks
(otherwise one agent per task, each in its own worker, as the default 2-task data on 2 cores). A collector's
cost per step is its env steps plus one SAC update on a batch drawn from its buffer so far, so it could grow with
the buffer. For each recipe this times the real loop (collect_sac, 1 thread) over --window steps at several
buffer fills across its run, each started from a checkpoint holding a buffer of that size; the recipes and fills
take turns, --repeats rounds. A recipe's CPU time is the median cost per step at each fill times the steps nearest
that fill, summed, times the number of agents. The first recipe is the one the others are divided by.
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


def seconds_per_step(bench, recipe, fill, window, folder):
    """Seconds per lock-step of collect_sac over `window` steps, from buffers of `fill` rows."""
    envs = [macaw.make_task_env(bench, k) for k in (range(len(bench.tasks)) if recipe["shared"] else [0])]
    n, obs = len(envs), np.stack([env.reset(seed=0)[0] for env in envs])
    obs_dim, act_dim = obs.shape[1], envs[0].action_space.shape[0]
    agent = (macaw.SAC(1, obs_dim + n, act_dim, recipe["width"], recipe["lr"]) if recipe["shared"]
             else macaw.SAC(1, obs_dim, act_dim, recipe["width"], recipe["lr"]))
    rng = np.random.default_rng(0)
    dims = dict(observations=obs_dim, actions=act_dim, next_observations=obs_dim)
    buffers = {k: rng.standard_normal((n, fill, dims[k]) if k in dims else (n, fill)).astype(np.float32)
               for k in macaw.BUFFER_KEYS}  # (the values do not change the cost)
    checkpoint = Path(folder) / "collector.pt"
    torch.save(dict(agent=agent.state_dict(), optimizers=[o.state_dict() for o in agent.optimizers()], t=fill,
                    buffers=buffers, rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                    envs=[macaw.env_state(env) for env in envs], obs=obs, episode_return=np.zeros(n),
                    last_returns=np.zeros(n)), checkpoint)
    stamps = []

    def stop():  # called after every step: a timestamp each, and the stop once the window is done
        stamps.append(time.perf_counter())
        return len(stamps) > window
    try:
        macaw.collect_sac(envs, fill + window + 10, seed=0, checkpoint=checkpoint, should_stop=stop,
                          width=recipe["width"], lr=recipe["lr"], shared=recipe["shared"], position=0)
    except macaw.Interrupted:
        pass
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="cheetah-dir")
    parser.add_argument("--recipes", nargs="+", default=["300000:3e-4:128", "90000:1e-3:128"],
                        help="steps:learning-rate:width[:shared]")
    parser.add_argument("--fills", type=int, default=5, help="buffer fills timed per recipe, evenly over its run")
    parser.add_argument("--window", type=int, default=1500, help="env steps timed at each fill")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = macaw.get_benchmark(args.env)
    recipes = [dict(steps=int(r.split(":")[0]), lr=float(r.split(":")[1]), width=int(r.split(":")[2]),
                    shared=r.endswith(":shared")) for r in args.recipes]
    # fill i sits in the middle of the i-th of `fills` equal parts of the run
    fills = [[int(r["steps"] * (i + 0.5) / args.fills) for i in range(args.fills)] for r in recipes]
    times = [[[] for _ in f] for f in fills]
    with tempfile.TemporaryDirectory() as folder, macaw.mujoco_warnings():
        for _ in range(args.repeats):
            for r, recipe in enumerate(recipes):
                for i, fill in enumerate(fills[r]):
                    times[r][i].append(seconds_per_step(bench, recipe, fill, args.window, folder))
    records = []
    for recipe, fill, each in zip(recipes, fills, times):
        per_step = [statistics.median(t) for t in each]
        agents = 1 if recipe["shared"] else len(bench.tasks)
        cpu_min = sum(per_step) * recipe["steps"] / args.fills / 60 * agents
        records.append(dict(recipe, agents=agents, fills=fill, s_per_step=[round(s, 6) for s in per_step],
                            s_per_step_each=[[round(s, 6) for s in t] for t in each], cpu_min=round(cpu_min, 1)))
        print(f"{recipe['steps']:,} steps, lr {recipe['lr']:g}, width {recipe['width']}"
              f"{', shared' if recipe['shared'] else ''}: " + ", ".join(f"{1 / s:.0f}" for s in per_step)
              + f" steps/s at fills {fill}; {agents} agent(s), {cpu_min:.1f} CPU min")
    for r in records:
        r["of_first"] = round(r["cpu_min"] / records[0]["cpu_min"], 3)
    print("CPU time against the first recipe: " + ", ".join(f"{r['of_first']:.2f}" for r in records))
    macaw.write_json(ROOT / "results" / "speed" / f"collector_cost_{args.env}.json", dict(
        kind="collector_cost", env=args.env, recipes=records, window=args.window,
        repeats=args.repeats, device=f"{cpu_name()}, 1 thread", commit=macaw.git_commit(),
        date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
