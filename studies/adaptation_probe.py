"""Probe trained MACAW runs at test time: which adaptation data, and how many inner steps.

    python studies/adaptation_probe.py runs/cheetah-dir-seed1 runs/cheetah-dir-seed2

No training: each run's final meta-parameters are loaded and, for every test task, adapted on 256
transitions taken from different parts of that task's offline data, then rolled out in the task:
  - random rows (what evaluation does), or 256 contiguous rows from the first, middle or last 10% of
    the replay buffer (early exploration = poor data, the end = the collector's final behaviour);
  - with 1, 2 or 5 inner steps (each step is MACAW's value step then policy step, with the learned
    step sizes, applied to the previous step's adapted networks).
Writes results/studies/adaptation_probe_<env>.json (every rollout's return) and prints a table.
A return that is not finite (the policy's actions blew up) counts as "diverged".
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402

SOURCES = ("random rows", "first 10%", "middle 10%", "last 10%")


def adaptation_batch(data, source, n, gen):
    if source == "random rows":
        return data.random_batch(n, gen)
    lo = {"first 10%": 0.0, "middle 10%": 0.45, "last 10%": 0.9}[source]
    first, last = int(lo * data.size), int((lo + 0.1) * data.size) - n
    start = int(torch.randint(first, max(last, first) + 1, (), generator=gen))
    return {k: v[start:start + n] for k, v in data.tensors.items()}


def adapted_policy(model, batch, steps, cfg):
    vparams, pparams = model.params()
    for _ in range(steps):
        vparams, pparams, _, _ = macaw.adapt(model, vparams, pparams, batch, cfg)
        vparams = {k: v.detach().requires_grad_() for k, v in vparams.items()}
        pparams = {k: v.detach().requires_grad_() for k, v in pparams.items()}
    return pparams


def probe(run_dir, adaptations, step_counts, data_dir=None):
    cfg = macaw.Config(**json.loads((run_dir / "config.json").read_text()))
    cfg.data_dir = data_dir or cfg.data_dir
    bench = macaw.get_benchmark(cfg.env)
    data = macaw.load_benchmark_data(cfg, bench)
    env0 = bench.make_env()
    model = macaw.MACAW(env0.observation_space.shape[0], env0.action_space.shape[0], cfg)
    model.load_state_dict(macaw.load_checkpoint(run_dir, "cpu")["model"])
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k in bench.test_ids:
        env = macaw.make_task_env(bench, k)
        for source in SOURCES:
            for steps in step_counts:
                returns = []
                for r in range(adaptations):
                    batch = adaptation_batch(data[k], source, cfg.eval_batch, gen)
                    with np.errstate(all="ignore"):
                        ret = macaw.rollout(env, macaw.policy_actor(model.policy, adapted_policy(model, batch, steps, cfg),
                                                                    "cpu"), 50_000 + r)
                    returns.append(float(ret) if np.isfinite(ret) else None)
                out[f"{k}|{source}|{steps}"] = dict(task=k, source=source, steps=steps, returns=returns,
                                                    collector_return=data[k].collector_return,
                                                    random_return=data[k].random_return)
    return cfg, out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--adaptations", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--data-dir", help="where the runs' data are, if not where they were trained")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for run in args.runs:
        cfg, results[str(run)] = probe(run, args.adaptations, args.steps, args.data_dir)
        print(f"{run}: {cfg.env}, seed {cfg.seed}")
        for key, rec in results[str(run)].items():
            finite = [x for x in rec["returns"] if x is not None]
            diverged = len(rec["returns"]) - len(finite)
            norm = [(x - rec["random_return"]) / (rec["collector_return"] - rec["random_return"]) for x in finite]
            text = (f"mean {np.mean(finite):8.1f} (normalised {np.mean(norm):5.2f}, min {min(finite):8.1f}, "
                    f"max {max(finite):8.1f})" if finite else "")
            note = f"  diverged {diverged}/{len(rec['returns'])}" if diverged else ""
            print(f"  task {rec['task']:>3} {rec['source']:>11}, {rec['steps']} step(s): {text}{note}")
    out = ROOT / "results" / "studies" / f"adaptation_probe_{cfg.env}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    macaw.write_json(out, dict(runs=results, commit=macaw.git_commit(), adaptations=args.adaptations))
    print(f"wrote {out}")
