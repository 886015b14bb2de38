"""The paper's named limitation, tested: TD(lambda) value targets against Monte-Carlo, from results/.

    python studies/td_lambda.py            # writes results/td_lambda.png, prints the two tables

Two experiments, each kept as JSON in results/ by the commands that ran them:
- online fine-tuning after adaptation, each full-budget MACAW run once per value target (Monte-Carlo, and
  TD(lambda) at lambda = 0.9 and 0.95), on the same online budget:
  results/studies/td_lambda_online_<env>.json, made by
      python studies/online_finetune.py runs/full/<env>-macaw-seed* --targets mc 0.9 0.95 --episodes 150 \
          --repeats 1 --name td_lambda_online
  where runs/full/<env>-macaw-seed<k>/ are the default runs made by
      python studies/compare_methods.py main --envs <env> --variants macaw --steps 15000 --eval-every 1000 \
          --out runs/full
- meta-training from scratch with TD(lambda) targets in the outer value loss (--value-target td-lambda) against
  the default Monte-Carlo runs: results/<env>/td-lambda-seed<k>.json against results/<env>/seed<k>.json, kept
  with studies/keep_run.py from
      python studies/compare_methods.py main --envs <env> --variants td-lambda --steps 15000 --eval-every 1000

The figure has one panel per benchmark's online study (return against online environment steps, each run's
running mean over 10 rounds, then the mean over runs with the min-max band over runs) and one for meta-training on
walker-params (held-out adapted return against the training step, from the evaluations during training: 3
adaptations per task where the table's final evaluation has 10, so its last point and the table can differ).
`python studies/tables.py` puts both tables into docs/comparisons.md and, with --check, also checks that the
figure is what these files give, byte for byte.
"""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "studies"))
import comparison  # noqa: E402
from online_finetune import method_returns, series  # noqa: E402

RESULTS = ROOT / "results"
FIGURE = RESULTS / "td_lambda.png"
ENVS = ("cheetah-vel", "walker-params")  # the online study's
META_TRAINING_ENVS = ("walker-params",)  # meta-training from scratch costs 3 full runs per benchmark
TARGETS = {"macaw": "Monte-Carlo (the paper's)", "td-lambda": "TD(λ = 0.95)"}  # meta-training: kept run prefixes


def online(env):
    """The online study's runs on one benchmark ({} if it has not run)."""
    path = RESULTS / "studies" / f"td_lambda_online_{env}.json"
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def online_steps(runs, name):
    """The mean number of online environment steps per test task after each round, over the runs of a series."""
    return np.mean([steps for res in runs.values() if series(res) == name for task in res["curves"].values()
                    for steps, _returns in task], axis=0)


def run_returns(res):
    """One run's return after each round: the mean over its test tasks (and their online repeats)."""
    return np.mean([returns for task in res["curves"].values() for _steps, returns in task], axis=0)


WINDOW = 10  # rounds: single rounds are noisy (a run's return moves by ~50 from one round to the next on walker-params)


def windows(rounds):
    """The three spans of WINDOW rounds the table averages (as slices of a curve whose entry 0 is before fine-tuning):
    the first, the middle (71-80 of 150) and the last."""
    middle = rounds // 2 - WINDOW // 2 + 1
    return [slice(1, WINDOW + 1), slice(middle, middle + WINDOW), slice(rounds - WINDOW + 1, rounds + 1)]


def online_rows():
    out = []
    for env in ENVS:
        stored = online(env)
        runs = list(stored.values())
        rounds = len(run_returns(runs[0])) - 1 if runs else 0
        last = {(series(res), res["seed"]): run_returns(res)[windows(rounds)[-1]].mean() for res in runs}
        for name in dict.fromkeys(series(res) for res in runs):
            method, _, target = name.partition(", ")  # "macaw" or "macaw, TD(λ = 0.9)"
            mine = sorted((res for res in runs if series(res) == name), key=lambda res: res["seed"])
            r = np.array([run_returns(res) for res in mine])
            out.append([env, method, target or "Monte-Carlo", len(mine), comparison.stat(r[:, 0]),
                        *(f"{comparison.stat(r[:, w].mean(1))} ({w.start}-{w.stop - 1})" for w in windows(rounds)),
                        minus(mine, name, method, last) if target else "",
                        f"{online_steps(stored, name)[-1]:,.0f}",
                        f"{np.mean([res['wall_time_s'] for res in mine]) / 60:.0f}"])
    return out


def minus(mine, name, method, last):
    """Each run's last rounds minus the same run's with Monte-Carlo targets: mean ± std, then seed by seed."""
    diffs = [last[name, res["seed"]] - last[method, res["seed"]] for res in mine]
    return f"{comparison.stat(diffs)} ({' / '.join(f'{d:+.0f}' for d in diffs)})"


ONLINE_HEADER = ["benchmark", "method", "value target", "runs", "before fine-tuning", "first 10 rounds",
                 "middle 10 rounds", "last 10 rounds", "last 10 minus Monte-Carlo's, run by run",
                 "online env steps per task", "minutes per run"]


def meta_training_rows():
    out = []
    for env in META_TRAINING_ENVS:
        if not comparison.runs(env, "td-lambda"):
            continue
        for prefix, name in TARGETS.items():
            out.append([env, name, *comparison.seeds_row(comparison.runs(env, prefix))])
    return out


META_TRAINING_HEADER = ["benchmark", "outer value target", *comparison.SEEDS_COLUMNS]


def band(ax, x, values, color, label):
    ax.plot(x, values.mean(0), color=color, label=label)
    ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.2, linewidth=0)


def running_mean(returns):
    """Each round's mean over itself and the WINDOW - 1 rounds before it (fewer at the start), to make a trend readable."""
    return np.array([returns[max(0, i - WINDOW + 1):i + 1].mean() for i in range(len(returns))])


def figure_bytes():
    """The figure as PNG bytes (no date or version in its metadata, so the same files give the same bytes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = len(ENVS) + len(META_TRAINING_ENVS)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6))
    for ax, env in zip(axes[:len(ENVS)], ENVS):
        runs = online(env)
        for n, (name, returns) in enumerate(method_returns(runs).items() if runs else []):
            label = name if ", " in name else f"{name}, Monte-Carlo"
            band(ax, online_steps(runs, name), np.array([running_mean(r) for r in returns]), f"C{n}",
                 f"{label} ({len(returns)} runs)")
        ax.set(title=f"{env}: online fine-tuning", xlabel="online environment steps per task",
               ylabel=f"episode return (mean of the last {WINDOW} rounds)")
    for ax, env in zip(axes[len(ENVS):], META_TRAINING_ENVS):
        for (prefix, name), color in zip(TARGETS.items(), ("C0", "C3")):
            curves = [comparison.curve(s) for s in comparison.runs(env, prefix) if s.get("curve")]
            if comparison.runs(env, "td-lambda") and curves:
                band(ax, curves[0][0], np.array([c[1] for c in curves]), color, f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.set(title=f"{env}: meta-training", xlabel="training step",
               ylabel="held-out adapted return (3 per task)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not run yet", transform=ax.transAxes, ha="center", color="gray")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return comparison.png_bytes(fig)


def main():
    FIGURE.write_bytes(figure_bytes())
    print(f"wrote {FIGURE}")
    for header, rows in ((ONLINE_HEADER, online_rows()), (META_TRAINING_HEADER, meta_training_rows())):
        print()
        comparison.print_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
