"""How the offline data were made: each collector's learning curve, read back from its replay buffer.

    python studies/collector_curves.py --env cheetah-vel      # after the data exist (python macaw.py --env ...)
    python studies/collector_curves.py --env ant-dir --data-dir data-ant-lr3e-4 --collector-lr 3e-4 --out /tmp/c

Any other macaw.py flag that describes the data (--collector-lr, --collector-steps, --collector-width,
--collector-design) is passed on, for data made at other than the benchmark's defaults.

A task's data is the whole replay buffer of the SAC agent trained on it, so the buffer's episode returns
(stochastic exploring policy, in collection order) are the collector's learning curve. This script reads
every task's file and writes results/<env>/collector_curves.json and .png: the mean over tasks of the
episode return against the collector's env steps (each episode placed at its last step), the per-task
final deterministic returns (`collector_return`) and the random policy's. Use it to judge how many
collector steps a benchmark needs: where the curve flattens, more steps buy little.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402


def episode_returns(data):
    """(end step, return) of every finished episode in one task's buffer."""
    ends = np.flatnonzero(np.logical_or(data["terminations"], data["truncations"]))
    starts = np.concatenate([[0], ends[:-1] + 1])
    sums = np.add.reduceat(data["rewards"].astype(np.float64), starts)
    return ends + 1, sums


def curves(cfg, bench, bins=20):
    """Mean over tasks of the episode returns in each of `bins` equal windows of collector steps."""
    edges = np.linspace(0, cfg.collector_steps, bins + 1)
    per_task, finals, randoms, lengths = [], [], [], []
    for k in range(len(bench.tasks)):
        data = macaw.load_task_data(macaw.task_data_path(cfg, k), bench, k, cfg)
        end, ret = episode_returns(data)
        which = np.digitize(end - 1, edges) - 1
        per_task.append([ret[which == b].mean() if np.any(which == b) else np.nan for b in range(bins)])
        lengths.append(float(np.mean(np.diff(np.concatenate([[0], end])))))
        finals.append(float(data["collector_return"]))
        randoms.append(float(data["random_return"]))
    return edges[1:], np.array(per_task), finals, randoms, lengths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="cheetah-vel")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="", help="folder of the JSON and PNG (default results/<env>)")
    args, data_flags = parser.parse_known_args()
    bench = macaw.get_benchmark(args.env)
    cfg = macaw.parse_config(["--env", args.env, "--data-dir", args.data_dir, *data_flags]).resolve(bench)
    try:
        steps, per_task, finals, randoms, lengths = curves(cfg, bench)
    except macaw.UserError as e:
        sys.exit(f"error: {e}")
    mean = np.nanmean(per_task, axis=0)
    print(f"{args.env}: {len(finals)} tasks, {cfg.collector_steps} steps each (width {cfg.collector_width}, "
          f"lr {cfg.collector_lr:g})")
    for s, m, lo, hi in zip(steps, mean, np.nanmin(per_task, 0), np.nanmax(per_task, 0)):
        print(f"  up to step {s:8.0f}: mean episode return {m:8.1f}  (tasks {lo:8.1f} .. {hi:8.1f})")
    print(f"final deterministic collectors: mean {np.mean(finals):.1f} (min {min(finals):.1f}, max {max(finals):.1f}); "
          f"random policy: mean {np.mean(randoms):.1f}; mean episode length {np.mean(lengths):.0f}")
    out = Path(args.out) if args.out else ROOT / "results" / args.env
    out.mkdir(parents=True, exist_ok=True)
    record = dict(env=args.env, collector_steps=cfg.collector_steps, collector_width=cfg.collector_width,
                  collector_lr=cfg.collector_lr, collector_design=cfg.collector_design,
                  window_end_steps=steps.tolist(), mean_episode_return=mean.tolist(),
                  per_task_episode_return=per_task.tolist(), collector_return=finals, random_return=randoms,
                  mean_episode_length=lengths, commit=macaw.git_commit())
    macaw.write_json(out / "collector_curves.json", record)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(steps, np.nanmin(per_task, 0), np.nanmax(per_task, 0), alpha=0.2, lw=0, label="min-max over tasks")
    ax.plot(steps, mean, label="mean over tasks (exploring policy)")
    ax.axhline(np.mean(finals), color="k", ls=":", label="final deterministic collector (mean)")
    ax.axhline(np.mean(randoms), color="grey", ls="--", label="random policy (mean)")
    ax.set(xlabel="collector env steps per task", ylabel="episode return",
           title=f"{args.env}: SAC collectors (width {cfg.collector_width}, lr {cfg.collector_lr:g}), "
                 f"from their buffers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    macaw.atomic_write(out / "collector_curves.png", lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {out}/collector_curves.json and .png")
