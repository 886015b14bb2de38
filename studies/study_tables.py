"""The README's comparison tables, read from results/studies/*.json (no number typed by hand).

    python studies/study_tables.py            # every study whose results exist in results/studies/

main / ablation (compare_methods.py): per benchmark and method, the held-out pre- and post-adaptation
returns and the normalised score, mean ± std over seeds, and the share of adaptations reaching 0.5.
consistency / data_quality (adaptation_probe.py): the normalised score per method and setting, mean ±
std over seeds (each seed: the mean over test tasks), with the share of adaptations that diverged.
online (online_finetune.py): the mean return over test tasks after 0, 1, 2, 5 and 10 online episodes.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "studies"))
from adaptation_probe import score_text  # noqa: E402
from online_finetune import method_returns  # noqa: E402


def pm(xs, fmt="{:.0f}"):
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs))}"


def comparison(path):
    res = json.loads(path.read_text())
    study = path.stem
    print(f"\n{study}: {res['steps']} meta-steps, seeds {res['seeds']}, {res['wall_time_min']} min on "
          f"{res['jobs']} cores, commit {res['commit']}")
    print("| benchmark | method | width | pre-adaptation | adapted | normalised | adaptations ≥ 0.5 | minutes per run |")
    print("|---|---|---|---|---|---|---|---|")
    for env in dict.fromkeys(r["env"] for r in res["runs"]):
        for variant in dict.fromkeys(r["variant"] for r in res["runs"] if r["env"] == env):
            runs = [r for r in res["runs"] if r["env"] == env and r["variant"] == variant]
            s = [r["summary"] for r in runs]
            pre = [np.mean([t["pre_return"] for t in x["tasks"].values()]) for x in s]
            print(f"| {env} | {variant} | {runs[0]['net_width']} | {pm(pre)} | {pm([x['mean_post_return'] for x in s])} "
                  f"| {pm([x['mean_normalized'] for x in s], '{:.2f}')} | {np.mean([x['share_half'] for x in s]):.0%} "
                  f"| {np.mean([x['wall_time_s'] for x in s]) / 60:.1f} |")


def cell(rows, **where):
    row = next((r for r in rows if all(r[k] == v for k, v in where.items())), None)
    if row is None:
        return ""
    return score_text(row) + (f" ({row['diverged']:.0%} diverged)" if row["diverged"] else "")


def consistency(path):
    res = json.loads(path.read_text())
    rows, steps = res["table"], sorted({r["steps"] for r in res["table"]})
    print(f"\n{path.stem} (rule {res['rule']}, {res['adaptations']} adaptations per task and seed, commit {res['commit']})")
    print("| method | rows | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for n in sorted({r["batch"] for r in rows if r["variant"] == variant}):
            print(f"| {variant} | {n} | " + " | ".join(cell(rows, variant=variant, batch=n, steps=s) for s in steps) + " |")


def data_quality(path):
    res = json.loads(path.read_text())
    rows = res["table"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    print(f"\n{path.stem} (rule {res['rule']}, {res['adaptations']} adaptations per task and seed, commit {res['commit']})")
    print("| method | steps | " + " | ".join(sources) + " |")
    print("|---|---|" + "---|" * len(sources))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for s in sorted({r["steps"] for r in rows if r["variant"] == variant}):
            print(f"| {variant} | {s} | " + " | ".join(cell(rows, variant=variant, steps=s, source=src)
                                                      for src in sources) + " |")


def online(path):
    res = json.loads(path.read_text())
    episodes = [e for e in (0, 1, 2, 5, 10, 20) if e <= res["episodes"]]
    print(f"\n{path.stem} (rule {res['rule']}, {res['repeats']} online runs per task and seed, commit {res['commit']})")
    print("| method | runs | " + " | ".join(f"after {e}" for e in episodes) + " |")
    print("|---|---|" + "---|" * len(episodes))
    for method, per_run in method_returns(res["runs"]).items():
        print(f"| {method} | {len(per_run)} | " + " | ".join(pm(per_run[:, e]) for e in episodes) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "studies")
    results = parser.parse_args(argv).results
    for path in [results / "main.json", results / "ablation.json", *sorted(results.glob("ablation_*.json"))]:
        if path.exists():
            comparison(path)
    for path in sorted(results.glob("consistency_*.json")):
        consistency(path)
    for path in sorted(results.glob("data_quality_*.json")):
        data_quality(path)
    for path in sorted(results.glob("online_finetune_*.json")):
        online(path)


if __name__ == "__main__":
    main()
