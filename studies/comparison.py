"""The paper's comparison at the full budget, from results/: one figure and one table.

    python studies/comparison.py            # writes results/comparison.png, prints the table

For each benchmark and method, the runs kept in results/<env>/ (MACAW: seed<k>.json; the others
<method>-seed<k>.json, each with the evaluation curve studies/keep_run.py adds): the figure has one panel per
benchmark, the held-out adapted return (mean over the test tasks) against the training step, the mean over
seeds with the min-max band, the published MACAW value as a dashed line and, dotted, what MACAW's networks
score without meta-training (results/<env>/untrained-seed<k>.json: the adaptation step from networks that took
one meta-step, --steps 1; the mean over seeds), the floor meta-training has to beat; the table has the final adapted
return, the normalised score, the share of adaptations reaching half the collector's return and the minutes
per run. It also prints the full-budget ablation's table (MACAW without its advantage head, or with plain layers).
`python studies/tables.py` puts the same tables into docs/comparisons.md and, with --check, also
checks that the figure is what these files give, byte for byte.
"""
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FIGURE = RESULTS / "comparison.png"
ENVS = ("cheetah-dir", "cheetah-vel", "walker-params", "ant-dir")
METHODS = {"macaw": "MACAW", "pearl": "offline PEARL", "meta-bc": "Meta-BC", "mt-awr": "MT-AWR + fine-tuning"}
# MACAW as re-run by UNICORN (NeurIPS 2024, Table 2) on its own SAC data, 6 seeds: (mean, std) of the
# 200-step return. A published reference, not a result of this project.
PUBLISHED = {"cheetah-dir": (1155, 10), "cheetah-vel": (-56, 2), "ant-dir": (26, 3), "walker-params": (141, 9)}


def runs(env, method):
    """The kept full-budget summaries of one method on one benchmark, by seed."""
    prefix = "seed" if method == "macaw" else f"{method}-seed"
    paths = sorted(p for p in (RESULTS / env).glob(f"{prefix}*.json") if p.stem[len(prefix):].isdigit())
    return [json.loads(p.read_text()) for p in paths]


def curve(summary):
    """(steps, mean adapted return over the test tasks at each evaluation)."""
    points = summary.get("curve", [])
    return (np.array([p["step"] for p in points]),
            np.array([np.mean(list(p["post"].values())) for p in points]))


def stat(xs, fmt="{:.0f}"):
    if not len(xs):
        return ""
    mean = fmt.format(np.mean(xs))
    return f"{mean.lstrip('-') if float(mean) == 0 else mean} ± {fmt.format(np.std(xs))}"  # no "-0"


def rows():
    out = []
    for env in ENVS:
        for method, name in METHODS.items():
            found = runs(env, method)
            if not found:
                continue
            post = [s["mean_post_return"] for s in found]
            out.append([env, name, f"{found[0]['steps']:,}", len(found),
                        f"{stat(post)} ({' / '.join(f'{p:.0f}' for p in post)})",
                        stat([s["mean_normalized"] for s in found], "{:.2f}"),
                        f"{np.mean([s['share_half'] for s in found]):.0%}",
                        f"{np.mean([s['wall_time_s'] for s in found]) / 60:.0f}"])
    return out


HEADER = ["benchmark", "method", "steps", "seeds", "adapted return (per seed)", "normalised",
          "adaptations ≥ half the collector", "minutes per run"]

# The ablation at the full budget: MACAW without one of its two pieces (docs/comparisons.md, section 2).
ABLATION = {"macaw": "MACAW", "no-adv-head": "MAML + AWR (no advantage head)",
            "no-weight-transform": "plain layers, width 100 (no weight transform)"}


SEEDS_COLUMNS = ["seeds", "before adaptation", "adapted return (per seed)", "normalised",
                 "adaptations ≥ half the collector", "minutes per run"]  # seeds_row's


def seeds_row(found):
    """Seeds, return before adaptation, adapted return (with each seed's), normalised score, share of adaptations
    reaching half the collector, minutes per run: the columns a table of full-budget runs shows for one variant."""
    post = [s["mean_post_return"] for s in found]
    pre = [np.mean([t["pre_return"] for t in s["tasks"].values()]) for s in found]
    return [len(found), stat(pre), f"{stat(post)} ({' / '.join(f'{p:.0f}' for p in post)})",
            stat([s["mean_normalized"] for s in found], "{:.2f}"), f"{np.mean([s['share_half'] for s in found]):.0%}",
            f"{np.mean([s['wall_time_s'] for s in found]) / 60:.0f}"]


def ablation_rows():
    """MACAW and its ablation variants on each benchmark where a variant has run."""
    out = []
    for env in ENVS:
        found = {variant: runs(env, variant) for variant in ABLATION}
        if any(found[variant] for variant in ABLATION if variant != "macaw"):
            out += [[env, name, *seeds_row(found[variant])] for variant, name in ABLATION.items() if found[variant]]
    return out


ABLATION_HEADER = ["benchmark", "variant", *SEEDS_COLUMNS]


def figure_bytes():
    """The comparison figure as PNG bytes (no date or version in its metadata, so the same files give the
    same bytes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ENVS), figsize=(4.2 * len(ENVS), 3.6))
    seeds = {}  # method name -> the seed counts of its panels, for one legend entry per method
    for ax, env in zip(axes, ENVS):
        drawn = False
        for (method, name), color in zip(METHODS.items(), ("C0", "C3", "C2", "C1")):
            curves = [curve(s) for s in runs(env, method) if s.get("curve")]
            if not curves:
                continue
            drawn = True
            steps = curves[0][0]
            values = np.array([c[1] for c in curves if np.array_equal(c[0], steps)])
            ax.plot(steps, values.mean(0), color=color, label=name)
            seeds.setdefault(name, set()).add(len(values))
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, linewidth=0)
        ax.axhline(PUBLISHED[env][0], color="k", linestyle="--", linewidth=1, label="published MACAW")
        untrained = [s["mean_post_return"] for s in runs(env, "untrained")]
        if untrained:
            ax.axhline(np.mean(untrained), color="gray", linestyle=":", linewidth=1.5, label="MACAW untrained")
        ax.set_title(env)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
        if not drawn:
            ax.set_xticks([])
            ax.text(0.5, 0.75, "no run kept with its curve yet", transform=ax.transAxes, ha="center", color="gray")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out adapted return")
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    def with_seeds(label):  # "MACAW (3 seeds)"; a method with different counts over the panels: "(2-3 seeds)"
        if label not in seeds:
            return label
        low, high = min(seeds[label]), max(seeds[label])
        return f"{label} ({low if low == high else f'{low}-{high}'} seed{'s' * (high > 1)})"
    labels = [with_seeds(label) for label in handles]
    fig.legend(handles.values(), labels, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return png_bytes(fig)


def png_bytes(fig):
    """A figure as PNG bytes, closed; no date or version in its metadata, so the same data give the same bytes."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def print_table(header, table_rows):
    print("| " + " | ".join(header) + " |")
    for row in table_rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main():
    FIGURE.write_bytes(figure_bytes())
    print(f"wrote {FIGURE}")
    print_table(HEADER, rows())
    print()
    print_table(ABLATION_HEADER, ablation_rows())


if __name__ == "__main__":
    sys.exit(main())
