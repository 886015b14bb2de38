"""Collector study: can the SAC collectors learn more in the same CPU time? Fewer updates per env step
(and more env steps), a higher learning rate, or narrower networks (and more env steps).

    python studies/collector_budget.py --name every2 --update-every 2 --steps 100000   # ant-dir, 8 tasks
    python studies/collector_budget.py --name lr1e-3 --lr 1e-3 --steps 55000
    python studies/collector_budget.py --name width32 --width 32 --steps 80000
    (add --data-dir DIR --data-lr 3e-4 to compare with data made at lr 3e-4 in DIR/<env>/)

Trains one SAC agent per task on the first --tasks training tasks of a benchmark (one lock-step group, this
process, 1 thread), with one update every --update-every env steps, and writes the final deterministic
returns, the buffers' learning curve (mean return of the episodes ending in each 5k-step window) and the
wall time to results/studies/collector_budget_<env>_<name>.json. The same tasks' data in --data-dir (made
with --data-lr, one update per env step, the benchmark's width), if there, go into the same file as
`default_data` (their collectors ran in a group of 25 tasks: other random draws, the same recipe). The
probes in the README compared with ant-dir's lr 3e-4 data (then the default; since in data-ant-lr3e-4/ here).
"""
import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
import macaw  # noqa: E402
from collector_curves import episode_returns  # noqa: E402


def buffer_curve(data, every=5000):
    """Mean return of the episodes that end in each `every`-step window of a buffer."""
    end, returns = episode_returns(data)
    window = (end - 1) // every
    return [float(returns[window == w].mean()) if np.any(window == w) else np.nan
            for w in range(-(-len(data["rewards"]) // every))]


def default_data(cfg, ids):
    """The collectors' returns and buffer curves of the default data of these tasks, if they are on disk."""
    paths = [macaw.task_data_path(cfg, k) for k in ids]
    if not all(p.exists() for p in paths):
        return None
    datas = [np.load(p) for p in paths]
    return dict(data_dir=cfg.data_dir, lr=cfg.collector_lr, steps=len(datas[0]["rewards"]),
                collector_return=[float(d["collector_return"]) for d in datas], curves=[buffer_curve(d) for d in datas])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="ant-dir")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--update-every", type=int, default=1)
    parser.add_argument("--width", type=int, default=-1)
    parser.add_argument("--shared", action="store_true", help="one task-conditioned agent for all the tasks")
    parser.add_argument("--lr", type=float, default=macaw.SAC_LR, help="the SAC agents' Adam learning rate")
    parser.add_argument("--data-dir", default="data", help="where the data to compare with are")
    parser.add_argument("--data-lr", type=float, default=-1, help="their collectors' learning rate (-1: the default)")
    parser.add_argument("--name", required=True, help="results/studies/collector_budget_<env>_<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = macaw.get_benchmark(args.env)
    cfg = macaw.parse_config(["--env", args.env, "--collector-width", str(args.width), "--data-dir", args.data_dir,
                              "--collector-lr", str(args.data_lr)]).resolve(bench)
    ids = list(bench.train_ids[:args.tasks])
    envs = [macaw.make_task_env(bench, k) for k in ids]
    start = time.perf_counter()
    datas = macaw.collect_sac(envs, args.steps, macaw.task_seed(cfg, ids[0]), width=cfg.collector_width,
                              update_every=args.update_every, lr=args.lr, shared=args.shared)
    wall = time.perf_counter() - start
    record = dict(name=args.name, env=args.env, task_ids=ids, steps=args.steps, update_every=args.update_every,
                  shared=args.shared,
                  lr=args.lr, width=cfg.collector_width, wall_min=round(wall / 60, 2),
                  collector_return=[float(d["collector_return"]) for d in datas],
                  curve_every=5000, curves=[buffer_curve(d) for d in datas], default_data=default_data(cfg, ids),
                  commit=macaw.git_commit(), date=datetime.date.today().isoformat(), cpu=macaw.versions()["machine"])
    print(f"{args.name}: width {cfg.collector_width}, lr {args.lr}, every {args.update_every}, {args.steps} steps, "
          f"{wall / 60:.1f} min: collectors " + " ".join(f"{r:.0f}" for r in record["collector_return"])
          + f"; mean {np.mean(record['collector_return']):.1f}")
    macaw.write_json(ROOT / "results" / "studies" / f"collector_budget_{args.env}_{args.name}.json", record)
