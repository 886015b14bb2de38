"""The README's results table of one benchmark, read from results/<env>/seed*.json (no number typed by hand).

    python studies/results_table.py cheetah-vel

Per seed: for each test task the mean adapted return over its adaptations, then the mean over test
tasks of the collector, random, pre- and post-adaptation returns, the normalised score, the share of
adaptations that reach half of the collector's normalised return, wall time and commit. Then the
3-seed mean and standard deviation, and each test task's adapted return with its spread over seeds.
"""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def mean_std(xs, fmt="{:.0f}"):
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs))}"


if __name__ == "__main__":
    env = sys.argv[1] if len(sys.argv) > 1 else "cheetah-vel"
    paths = sorted(p for p in (ROOT / "results" / env).glob("seed*.json") if p.stem[4:].isdigit())
    summaries = [json.loads(p.read_text()) for p in paths]
    print(f"| seed | collector | random | pre-adaptation | adapted (min .. max over adaptations) | normalised "
          f"| adaptations ≥ 0.5 | wall time (training + eval) | commit |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for s in summaries:
        tasks = list(s["tasks"].values())
        every = [r for t in tasks for r in t["post_returns"]]
        row = dict(collector=np.mean([t["collector_return"] for t in tasks]),
                   random=np.mean([t["random_return"] for t in tasks]),
                   pre=np.mean([t["pre_return"] for t in tasks]), post=np.mean([t["post_return"] for t in tasks]),
                   norm=s["mean_normalized"], half=s["share_half"])
        rows.append(row)
        print(f"| {s['seed']} | {row['collector']:.0f} | {row['random']:.0f} | {row['pre']:.0f} | {row['post']:.0f} "
              f"({min(every):.0f} .. {max(every):.0f}) | {row['norm']:.2f} | {row['half']:.0%} | "
              f"{s['wall_time_s'] / 60:.1f} min | `{s['commit']}` |")
    if len(rows) > 1:
        col = lambda k: [r[k] for r in rows]
        print(f"| mean ± std | {np.mean(col('collector')):.0f} | {np.mean(col('random')):.0f} | {mean_std(col('pre'))} "
              f"| **{mean_std(col('post'))}** | **{mean_std(col('norm'), '{:.2f}')}** | {np.mean(col('half')):.0%} | | |")
    print()
    print("| test task | collector | random | pre-adaptation, per seed | adapted, per seed | normalised, per seed "
          "| adaptations ≥ 0.5, per seed |")
    print("|---|---|---|---|---|---|---|")
    for k, t in summaries[0]["tasks"].items():
        per_seed = lambda key, fmt: " / ".join(fmt.format(s["tasks"][k][key]) for s in summaries)
        print(f"| {k} ({t['task']:g}) | {t['collector_return']:.0f} | {t['random_return']:.0f} | "
              f"{per_seed('pre_return', '{:.0f}')} | {per_seed('post_return', '{:.0f}')} | "
              f"{per_seed('normalized', '{:.2f}')} | {per_seed('share_half', '{:.0%}')} |")
