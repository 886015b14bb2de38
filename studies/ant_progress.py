"""ant-dir: how much of a return is walking in the task's direction, and how much is staying upright.

    python studies/ant_progress.py runs/ant-dir-seed1 [more runs]

An ant-dir step pays v . (cos g, sin g) (progress in the task's direction) + 1 while upright - 0.5 ||a||^2
- a small contact cost, so over 200 steps an ant that stands still with small actions already collects
~+190, more than many collectors. The return alone cannot tell "adapted to the direction" from "stands
still". For each run and held-out task this script adapts as evaluation does (--adaptations times, 256
random offline rows) and rolls out before and after adaptation, summing each part of the reward; it does
the same for the last --data-episodes episodes of each held-out task's offline data (the collector's late
behaviour), from the rewards and actions stored there (progress = reward - 1 + 0.5 ||a||^2, contact cost
included, upright steps assumed). Writes results/studies/<--name>.json and prints a table.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
import macaw  # noqa: E402
from adaptation_probe import load_run  # noqa: E402


def rollout_parts(env, act, seed):
    obs, _ = env.reset(seed=seed)
    parts, done = dict(progress=0.0, upright=0.0, control=0.0, contact=0.0, steps=0), False
    while not done:
        obs, _, terminated, truncated, info = env.step(np.clip(act(obs), env.action_space.low, env.action_space.high))
        parts["progress"] += float(info["x_velocity"] * math.cos(env.task) + info["y_velocity"] * math.sin(env.task))
        parts["upright"] += float(info["reward_survive"])
        parts["control"] += float(info["reward_ctrl"])
        parts["contact"] += float(info["reward_contact"])
        parts["steps"] += 1
        done = terminated or truncated
    return parts


def data_progress(data, episodes):
    """Progress per episode over the last `episodes` episodes of a task's stored data."""
    ends = np.flatnonzero(np.logical_or(data["terminations"], data["truncations"]))
    start = ends[-episodes - 1] + 1 if len(ends) > episodes else 0
    rewards, actions = data["rewards"][start:], data["actions"][start:]
    progress = rewards - 1 + 0.5 * np.square(actions).sum(1)
    return float(progress.sum() / min(episodes, len(ends))), float(rewards.sum() / min(episodes, len(ends)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--adaptations", type=int, default=5)
    parser.add_argument("--data-episodes", type=int, default=20)
    parser.add_argument("--data-dir", help="where the runs' data are, if not where they were trained")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "studies")
    parser.add_argument("--name", default="ant_progress", help="results/studies/<name>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for run in args.runs:
        cfg, bench, data, model = load_run(run, args.data_dir)
        assert cfg.env == "ant-dir", f"{run} is a {cfg.env} run"
        gen = torch.Generator().manual_seed(0)
        out[str(run)] = {}
        print(f"{run}: per held-out task, mean over {args.adaptations} adaptations (progress = metres walked "
              f"in the task's direction x 20, i.e. the return's direction part)")
        for k in bench.test_ids:
            env = macaw.make_task_env(bench, k)
            pre, post = [], []
            for r in range(args.adaptations):
                adapted = macaw.adapt_policy(model, data[k].random_batch(cfg.eval_batch, gen), cfg)
                pre.append(rollout_parts(env, macaw.policy_actor(model.policy, model.params()[1], "cpu", data[k].code), r))
                post.append(rollout_parts(env, macaw.policy_actor(model.policy, adapted, "cpu", data[k].code), r))
            stored = np.load(macaw.task_data_path(cfg, k))
            collector_progress, collector_return = data_progress(stored, args.data_episodes)
            mean = lambda rows, key: float(np.mean([p[key] for p in rows]))
            out[str(run)][str(k)] = dict(pre=pre, post=post, data_progress=collector_progress,
                                         data_return=collector_return)
            print(f"  task {k:>2} ({bench.tasks[k]:.2f} rad): progress pre {mean(pre, 'progress'):6.1f} post "
                  f"{mean(post, 'progress'):6.1f} (data's last {args.data_episodes} episodes {collector_progress:6.1f}); "
                  f"upright pre {mean(pre, 'upright'):5.0f} post {mean(post, 'upright'):5.0f}; control pre "
                  f"{mean(pre, 'control'):6.1f} post {mean(post, 'control'):6.1f}")
    args.results.mkdir(parents=True, exist_ok=True)
    macaw.write_json(args.results / f"{args.name}.json", dict(runs=out, commit=macaw.git_commit()))
    print(f"wrote {args.results / args.name}.json")


if __name__ == "__main__":
    main()
