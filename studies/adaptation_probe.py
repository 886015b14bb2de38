"""Probe trained runs at test time: how much adaptation data, from where, and how many steps.

    python studies/adaptation_probe.py runs/cheetah-dir-seed1 runs/cheetah-dir-seed2      # data x 1, 2, 5 steps
    python studies/adaptation_probe.py RUNS --steps 1 5 20 --batch-sizes 64 256 1024 4096 \
        --sources "random rows" --rule adam --adaptations 3 --name consistency    # the paper's consistency study
    python studies/adaptation_probe.py RUNS --steps 1 20 --adaptations 3 --name data_quality    # data quality
(the last two as docs/comparisons.md ran them)

No training: each run's final meta-parameters are loaded and, for every test task, adapted on N
transitions (--batch-sizes, default 256) taken from different parts of that task's offline data, then
rolled out in the task:
  - random rows (what evaluation does), or N contiguous rows from the first, middle or last 10% of
    the replay buffer (early exploration = poor data, the end = the collector's final behaviour);
  - with each step count of --steps (default 1, 2 and 5). --rule repeat (default): each step is the
    run's own inner step, MACAW's value step then policy step or Meta-BC's cloning step, with the learned
    step sizes, applied to the previous step's adapted networks; --rule adam: the first step is that
    inner step, the rest Adam steps on the method's plain objective (adapt_steps). For an MT-AWR run a
    "step" is one fine-tuning Adam step.
Writes results/studies/<name>_<env>.json (every rollout's return, and the table; --name, default
adaptation_probe) and <name>_<env>.png, and prints a table per run, then the mean normalised score per
method and setting (mean over test tasks, then mean ± std over runs).
A return that is not finite (the policy's actions blew up) counts as "diverged".
The output file keeps the runs an earlier command of the same study wrote into it (same --adaptations,
--rule, --steps, --batch-sizes and --sources; another setting replaces the file): a study can run in
parts, e.g. one process per run on two cores, and a run probed again replaces its own entry.
"""
import argparse
import dataclasses
import json
import sys
import time
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
    first, last = int(lo * data.size), min(int((lo + 0.1) * data.size), data.size) - n
    start = int(torch.randint(first, max(last, first) + 1, (), generator=gen))
    start = min(start, data.size - n)  # a batch larger than the 10% reaches past it
    return {k: v[start:start + n] for k, v in data.tensors.items()}


RULES = ("repeat", "adam")


def adapt_steps(model, params, batch, steps, cfg, rule="repeat", from_meta=True):
    """`steps` test-time adaptation steps from params = (value, policy) dicts. Returns the adapted
    (value, policy), detached. MT-AWR: `steps` fine-tuning Adam steps (macaw.finetune). MACAW, Meta-BC:
      rule "repeat": every step is the run's own inner step with its learned step sizes (what the
          paper's code does at test time, meta-trained for one step), each from the previous step's
          adapted networks;
      rule "adam": the first step from the meta-parameters (from_meta) is that inner step, every later
          one an Adam step on the method's plain objective at the outer learning rates (MACAW: Monte-Carlo
          value regression + AWR, as MT-AWR fine-tunes; Meta-BC: behaviour cloning)."""
    if cfg.method == "mt-awr":
        return macaw.finetune(model, batch, dataclasses.replace(cfg, finetune_steps=steps), params)
    vparams, pparams = params
    inner_steps = steps if rule == "repeat" else min(steps, int(from_meta))
    for _ in range(inner_steps):
        vparams, pparams = ({k: v.detach().requires_grad_() for k, v in p.items()} for p in (vparams, pparams))
        vparams, pparams, _, _ = macaw.adapt(model, vparams, pparams, batch, cfg)
    if steps > inner_steps:
        return macaw.finetune(model, batch, dataclasses.replace(cfg, finetune_steps=steps - inner_steps),
                              (vparams, pparams))
    return {k: v.detach() for k, v in vparams.items()}, {k: v.detach() for k, v in pparams.items()}


def load_run(run_dir, data_dir=None):
    """A trained run's config, benchmark, data and final meta-parameters."""
    if not (run_dir / "summary.json").exists():
        raise SystemExit(f"{run_dir} holds no finished run (no summary.json); finish it first (macaw.py --resume)")
    cfg = macaw.saved_config(json.loads((run_dir / "config.json").read_text()))
    cfg.data_dir = data_dir or cfg.data_dir
    bench = macaw.get_benchmark(cfg.env)
    data = macaw.load_benchmark_data(cfg, bench)
    model = macaw.MACAW(data[0].tensors["obs"].shape[1], data[0].tensors["actions"].shape[1], cfg)
    model.load_state_dict(macaw.load_checkpoint(run_dir, "cpu")["model"])
    return cfg, bench, data, model


def probe(run_dir, adaptations, step_counts, batch_sizes=(256,), sources=SOURCES, data_dir=None, rule="repeat"):
    cfg, bench, data, model = load_run(run_dir, data_dir)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k in bench.test_ids:
        env = macaw.make_task_env(bench, k)
        for source in sources:
            for n in batch_sizes:
                for steps in step_counts:
                    returns = []
                    for r in range(adaptations):
                        batch = adaptation_batch(data[k], source, n, gen)
                        actor = macaw.policy_actor(model.policy, adapt_steps(model, model.params(), batch, steps, cfg, rule)[1], "cpu",
                                                   data[k].code)
                        with np.errstate(all="ignore"):
                            ret = macaw.rollout(env, actor, 50_000 + r)
                        returns.append(float(ret) if np.isfinite(ret) else None)
                    out[f"{k}|{source}|{n}|{steps}"] = dict(task=k, source=source, batch=n, steps=steps,
                                                            returns=returns,
                                                            collector_return=data[k].collector_return,
                                                            random_return=data[k].random_return)
    return cfg, out


def normalised(rec):
    return [(x - rec["random_return"]) / (rec["collector_return"] - rec["random_return"])
            for x in rec["returns"] if x is not None]


def variant(cfg):
    """A run's method as the comparison studies name it (studies/compare_methods.py)."""
    if not cfg.weight_transform:
        return f"no-weight-transform (width {cfg.net_width})"
    return "no-adv-head" if cfg.method == "macaw" and not cfg.adv_head else cfg.method


def summary_table(results, variants):
    """Per method and setting: each run's mean normalised score over test tasks, then their mean and
    standard deviation over runs (seeds) with at least one finite adaptation (scored_runs of them), and the
    share of adaptations that diverged."""
    rows = []
    for name in dict.fromkeys(variants.values()):
        runs = [results[run] for run, v in variants.items() if v == name]
        for source, n, steps in sorted({(r["source"], r["batch"], r["steps"]) for r in runs[0].values()},
                                       key=lambda x: (SOURCES.index(x[0]), x[1], x[2])):
            cells = [[r for r in recs.values() if (r["source"], r["batch"], r["steps"]) == (source, n, steps)]
                     for recs in runs]
            scores = [np.mean([np.mean(normalised(r)) for r in cell if normalised(r)]) for cell in cells
                      if any(normalised(r) for r in cell)]  # runs with at least one finite adaptation
            returns = [x for cell in cells for r in cell for x in r["returns"]]
            rows.append(dict(variant=name, source=source, batch=n, steps=steps, runs=len(runs), scored_runs=len(scores),
                             normalised_mean=float(np.mean(scores)) if scores else None,
                             normalised_std=float(np.std(scores)) if scores else None,
                             diverged=sum(x is None for x in returns) / len(returns)))
    return rows


def score_text(row):
    """A table row's score as the tables print it: mean ± std over runs, or a dash where all diverged."""
    return "—" if row["normalised_mean"] is None else f"{row['normalised_mean']:.2f} ± {row['normalised_std']:.2f}"


def plot(table, title, path):
    """Normalised score (mean over seeds, bars/bands: ± std): against the number of rows, one line per method
    and step count, where several batch sizes were probed; else grouped bars per adaptation-data source
    (hatched, with the share, where adaptations diverged: the bar is the score of the rest)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(dict.fromkeys(r["variant"] for r in table))
    sizes, sources = sorted({r["batch"] for r in table}), list(dict.fromkeys(r["source"] for r in table))
    steps = sorted({r["steps"] for r in table})
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, v in enumerate(variants):
        for j, s in enumerate(steps):
            rows = [r for r in table if r["variant"] == v and r["steps"] == s and r["normalised_mean"] is not None]
            label = f"{v}, {s} step{'s' * (s > 1)}"
            if len(sizes) > 1:
                rows = [r for r in rows if r["source"] == sources[0]]
                x, y = [r["batch"] for r in rows], np.array([r["normalised_mean"] for r in rows])
                sd = np.array([r["normalised_std"] for r in rows])
                ax.plot(x, y, color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], marker="o", ms=3, label=label)
                ax.fill_between(x, y - sd, y + sd, color=f"C{i}", alpha=0.05, lw=0)
            else:
                width = 0.8 / (len(variants) * len(steps))
                offset = (i * len(steps) + j) * width - 0.4 + width / 2
                for r in table:  # no bar where every adaptation diverged: said in its place
                    if r["variant"] == v and r["steps"] == s and r["normalised_mean"] is None:
                        ax.text(sources.index(r["source"]) + offset, 0.02, "all diverged", rotation=90, ha="center",
                                va="bottom", fontsize=6, color=f"C{i}")
                xs = [sources.index(r["source"]) + offset for r in rows]
                bars = ax.bar(xs, [r["normalised_mean"] for r in rows], width, yerr=[r["normalised_std"] for r in rows],
                              color=f"C{i}", alpha=1 - 0.35 * j, label=label)
                for bar, r in zip(bars, rows):  # a score of the few that did not diverge: marked, with the share
                    if r["diverged"]:
                        bar.set_hatch("///")
                        ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{r['diverged']:.0%} diverged",
                                rotation=90, ha="center", va="bottom", fontsize=6)
    if len(sizes) > 1:
        ax.set(xscale="log", xlabel=f"adaptation transitions ({sources[0]})")
        ax.set_xticks(sizes, [str(n) for n in sizes])
    else:
        ax.set_xticks(range(len(sources)), sources)
        ax.set(xlabel=f"where the {sizes[0]} adaptation transitions come from")
    ax.set(ylabel="normalised score (held-out tasks)", title=title)
    ax.legend(fontsize=7, ncol=len(variants), loc="upper center", bbox_to_anchor=(0.5, -0.15))  # (below: no bar hidden)
    fig.tight_layout()
    macaw.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--replot", type=Path,
                        help="only redo the table and figure of this results JSON from the returns it holds")
    parser.add_argument("--adaptations", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--rule", choices=RULES, default="repeat",
                        help="MACAW/Meta-BC steps after the first: their inner step again, or Adam (adapt_steps)")
    parser.add_argument("--name", default="adaptation_probe", help="results/studies/<name>_<env>.json")
    parser.add_argument("--data-dir", help="where the runs' data are, if not where they were trained")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "studies")
    args = parser.parse_args(argv)
    if args.replot:
        res = json.loads(args.replot.read_text())
        res["table"] = summary_table(res["runs"], res["variants"])
        macaw.write_json(args.replot, res)
        plot(res["table"], f"{args.replot.stem.rsplit('_', 1)[-1]}, rule {res['rule']}", args.replot.with_suffix(".png"))
        return
    if not args.runs:
        parser.error("give the run folders to probe (or --replot RESULTS_JSON)")
    torch.set_num_threads(1)
    results, variants, provenance = {}, {}, {}
    for run in args.runs:
        start = time.perf_counter()
        cfg, results[str(run)] = probe(run, args.adaptations, args.steps, args.batch_sizes, args.sources,
                                       args.data_dir, args.rule)
        variants[str(run)] = variant(cfg)
        provenance[str(run)] = dict(commit=macaw.git_commit(), wall_time_s=time.perf_counter() - start)
        print(f"{run}: {cfg.env}, {variants[str(run)]}, seed {cfg.seed}")
        for key, rec in results[str(run)].items():
            finite = [x for x in rec["returns"] if x is not None]
            diverged = len(rec["returns"]) - len(finite)
            text = (f"mean {np.mean(finite):8.1f} (normalised {np.mean(normalised(rec)):5.2f}, min {min(finite):8.1f}, "
                    f"max {max(finite):8.1f})" if finite else "")
            note = f"  diverged {diverged}/{len(rec['returns'])}" if diverged else ""
            print(f"  task {rec['task']:>3} {rec['source']:>11}, {rec['batch']:>5} rows, {rec['steps']:>2} step(s): "
                  f"{text}{note}")
    out = args.results / f"{args.name}_{cfg.env}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(adaptations=args.adaptations, rule=args.rule, steps=args.steps, batch_sizes=args.batch_sizes,
                    sources=args.sources)
    with macaw.folder_lock(args.results, wait=True, purpose=f"writing {out.name}"):  # (one writer at a time)
        earlier = earlier_results(out, settings)  # runs probed by an earlier command of the same study are kept
        variants = in_study_order({**earlier.get("variants", {}), **variants}, lambda run, v: v)
        all_runs = {**earlier.get("runs", {}), **results}
        all_provenance = {**earlier.get("provenance", {}), **provenance}
        results = {run: all_runs[run] for run in variants}
        provenance = {run: all_provenance.get(run) for run in variants}
        table = summary_table(results, variants)
        macaw.write_json(out, dict(runs=results, variants=variants, table=table, provenance=provenance,
                                   commit=macaw.git_commit(), **settings))
    print(f"\n{cfg.env}, rule {args.rule}: normalised score, mean over test tasks, then mean ± std over runs "
          f"(diverged adaptations left out of the score and counted apart)")
    print("| method | adaptation data | rows | steps | normalised | runs | diverged |\n|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['variant']} | {row['source']} | {row['batch']} | {row['steps']} | {score_text(row)} | {row['runs']} "
              f"| {row['diverged']:.0%} |")
    plot(table, f"{cfg.env}, rule {args.rule}", out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


METHOD_ORDER = ("macaw", "no-adv-head", "meta-bc", "mt-awr")


def in_study_order(entries, method_of):
    """`entries` (a dict) sorted by method, MACAW first (method_of(key, value) names it), then by key: the
    tables and figures come out in one order whichever order a study's parts ran in."""
    def rank(item):
        method = method_of(*item)
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, item[0])
    return dict(sorted(entries.items(), key=rank))


def earlier_results(path, settings):
    """What an earlier command of the same study wrote into `path`: its dict, or {} if there is none or it
    was made with other settings (it is then replaced). Lets a study run as several commands, one per run."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier.get(k) != v for k, v in settings.items()):
        print(f"{path} was made with other settings; it is replaced")
        return {}
    return earlier

if __name__ == "__main__":
    main()
