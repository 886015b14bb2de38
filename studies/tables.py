"""Every table of numbers in README.md and docs/, printed from the JSON files under results/ (none typed by hand).

    python studies/tables.py            # rewrite each table in README.md and docs/*.md in place
    python studies/tables.py --check    # exit 1 if any table there differs from what results/ gives (a test runs this)
    python studies/tables.py --show NAME   # print one table (names: --show list)

A document marks each table with `<!-- table NAME -->` on the line before it and `<!-- end table -->` on the line
after; everything between the two is replaced. The JSON files carry the provenance (commit, machine, command, wall
time), so the tables and the prose around them need none.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENVS = ("cheetah-dir", "cheetah-vel", "ant-dir", "walker-params")
import macaw  # noqa: E402
from comparison import PUBLISHED, stat  # noqa: E402  (PUBLISHED: MACAW as re-run by UNICORN, a published reference)


def load(path):
    return json.loads(Path(path).read_text())


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def seed_summaries(env, prefix="seed"):
    paths = sorted(p for p in (RESULTS / env).glob(f"{prefix}*.json") if p.stem[len(prefix):].isdigit())
    return [load(p) for p in paths]


def task_mean(summary, key):
    return float(np.mean([t[key] for t in summary["tasks"].values()]))


# ---- results: the README's table, and each benchmark's per-seed and per-task tables (docs/results.md)
def summary_table():
    rows = []
    # ml45 joins once it has 3 seeds; it has no published figure (its success rates: docs/results.md)
    for env in (*ENVS, *(["ml45"] if len(seed_summaries("ml45")) >= 3 else [])):
        runs, untrained = seed_summaries(env), seed_summaries(env, "untrained-seed")
        post = [s["mean_post_return"] for s in runs]
        rows.append([f"`{env}`", f"{task_mean(runs[0], 'collector_return'):.0f}",
                     f"{stat([task_mean(s, 'pre_return') for s in runs])}",
                     f"**{stat(post)}** ({' / '.join(f'{p:.0f}' for p in post)})",
                     stat([s["mean_normalized"] for s in runs], "{:.2f}"),
                     f"{np.mean([s['share_half'] for s in runs]):.0%}",
                     f"{np.mean([s['mean_post_return'] for s in untrained]):.0f}" if untrained else "",
                     "{} ± {}".format(*PUBLISHED[env]) if env in PUBLISHED else "none"])
    return table(["benchmark", "collectors (test tasks)", "pre-adaptation", "adapted, 3 seeds (per seed)",
                  "normalised", "adaptations ≥ half the collector", "no meta-training, adapted",
                  "published MACAW"], rows)


# ---- ML45 (docs/results.md): the held-out classes' success rate and return, per method
ML45_METHODS = (("MACAW", "seed"), ("MT-AWR + fine-tuning", "mt-awr-seed"), ("Meta-BC", "meta-bc-seed"))


def ml45_table():
    rows = []
    for method, prefix in ML45_METHODS:
        runs = seed_summaries("ml45", prefix)
        if runs:
            rate = lambda key: f"{stat([100 * s[key] for s in runs])}% ({' / '.join(f'{100 * s[key]:.0f}' for s in runs)})"
            rows.append([method, len(runs), rate("pre_success"), f"**{rate('post_success')}**",
                         stat([task_mean(s, "pre_return") for s in runs]), stat([s["mean_post_return"] for s in runs]),
                         stat([s["mean_normalized"] for s in runs], "{:.2f}"),
                         f"{np.mean([s['wall_time_s'] for s in runs]) / 60:.0f}"])
    return table(["method", "seeds", "success before adaptation (per seed)", "success adapted (per seed)",
                  "return before", "return adapted", "normalised", "minutes per run"], rows)


def ml45_class_table():
    runs = seed_summaries("ml45")
    scripted = load(RESULTS / "ml45" / "scripted.json")["classes"]  # studies/ml45_scripted.py
    rows = []
    for k, t in runs[0]["tasks"].items():
        per_seed = lambda key, fmt: " / ".join(fmt(s["tasks"][k][key]) for s in runs)
        success = "succeeds" if scripted[k]["scripted_success"] else "fails"
        rows.append([t["name"], f"{t['collector_return']:.0f}, {success}", f"{t['random_return']:.0f}",
                     per_seed("pre_success", lambda x: f"{100 * x:.0f}%"),
                     per_seed("post_success", lambda x: f"{100 * x:.0f}%"),
                     per_seed("pre_return", lambda x: f"{x:.0f}"), per_seed("post_return", lambda x: f"{x:.0f}")])
    return table(["held-out class", "scripted policy (return, success)", "random", "success before, per seed",
                  "success adapted, per seed", "return before, per seed", "return adapted, per seed"], rows)


def seed_table(env):
    runs = seed_summaries(env)
    rows, cols = [], []
    for s in runs:
        every = [r for t in s["tasks"].values() for r in t["post_returns"]]
        col = dict(collector=task_mean(s, "collector_return"), random=task_mean(s, "random_return"),
                   pre=task_mean(s, "pre_return"), post=s["mean_post_return"], norm=s["mean_normalized"],
                   half=s["share_half"])
        cols.append(col)
        rows.append([s["seed"], f"{col['collector']:.0f}", f"{col['random']:.0f}", f"{col['pre']:.0f}",
                     f"{col['post']:.0f} ({min(every):.0f} .. {max(every):.0f})", f"{col['norm']:.2f}",
                     f"{col['half']:.0%}", f"{s['wall_time_s'] / 60:.1f} min"])
    get = lambda k: [c[k] for c in cols]
    rows.append(["mean ± std", f"{np.mean(get('collector')):.0f}", f"{np.mean(get('random')):.0f}", stat(get("pre")),
                 f"**{stat(get('post'))}**", f"**{stat(get('norm'), '{:.2f}')}**", f"{np.mean(get('half')):.0%}", ""])
    return table(["seed", "collector", "random", "pre-adaptation", "adapted (min .. max over adaptations)",
                  "normalised", "adaptations ≥ 0.5", "training + evaluation"], rows)


def task_table(env):
    runs = seed_summaries(env)
    rows = []
    for k, t in runs[0]["tasks"].items():
        per_seed = lambda key, fmt: " / ".join(fmt.format(s["tasks"][k][key]) for s in runs)
        rows.append([f"{k} ({t['task']:g})", f"{t['collector_return']:.0f}", f"{t['random_return']:.0f}",
                     per_seed("pre_return", "{:.0f}"), per_seed("post_return", "{:.0f}"),
                     per_seed("normalized", "{:.2f}"), per_seed("share_half", "{:.0%}")])
    return table(["test task (parameter)", "collector", "random", "pre-adaptation, per seed", "adapted, per seed",
                  "normalised, per seed", "adaptations ≥ 0.5, per seed"], rows)


def untrained_table():
    rows = []
    for env in (*ENVS, "ml45"):
        runs, untrained = seed_summaries(env), seed_summaries(env, "untrained-seed")
        post = [s["mean_post_return"] for s in untrained]
        rows.append([f"`{env}`", stat([task_mean(s, "pre_return") for s in untrained]),
                     f"{stat(post)} ({' / '.join(f'{p:.0f}' for p in post)})",
                     stat([s["mean_normalized"] for s in untrained], "{:.2f}"),
                     stat([s["mean_post_return"] for s in runs])])
    return table(["benchmark", "untrained, before its step", "untrained, after its step (per seed)",
                  "untrained, normalised", "MACAW, adapted"], rows)


def first_run_table():
    """What the default command costs per benchmark: making the data once, then training + evaluation."""
    point = load(RESULTS / "point-robot" / "seed1.json")
    first = load(RESULTS / "cheetah-dir" / "first-run.json")
    shared = next(r for r in load(RESULTS / "speed" / "collector_designs_cheetah-vel.json") if r["design"] == "shared")
    walker = load(RESULTS / "walker-params" / "data-timing.json")
    ant = load(RESULTS / "ant-dir" / "data-timing.json")
    ml45 = max(seed_summaries("ml45"), key=lambda s: s["data_time_s"])  # the seed that made the data
    train = lambda env: min(s["wall_time_s"] for s in seed_summaries(env)) / 60  # the least disturbed seed
    rows = [("point-robot", point["data_time_s"] / 60, point["wall_time_s"] / 60),
            ("cheetah-dir", first["data_min"], first["training_min"]),
            ("cheetah-vel", shared["wall_min"], train("cheetah-vel")),
            ("walker-params", walker["data_time_s"] / 60, train("walker-params")),
            ("ant-dir", ant["data_time_s"] / 60, train("ant-dir")), ("ml45", ml45["data_time_s"] / 60, train("ml45"))]
    fmt = lambda m: f"{m * 60:.0f} s" if m < 1 else f"{m:.0f} min"
    return table(["command", "making the data (once)", "training + evaluation", "in all, the first time"],
                 [[f"`python macaw.py --env {env}`", fmt(d), fmt(t), fmt(d + t)] for env, d, t in rows])


# ---- comparisons (docs/comparisons.md)
def comparison_table(name):
    from_study = load(RESULTS / "studies" / f"{name}.json")
    rows = []
    for env in dict.fromkeys(r["env"] for r in from_study["runs"]):
        for variant in dict.fromkeys(r["variant"] for r in from_study["runs"] if r["env"] == env):
            runs = [r for r in from_study["runs"] if r["env"] == env and r["variant"] == variant]
            s = [r["summary"] for r in runs]
            rows.append([env, variant, runs[0]["net_width"], len(runs), stat([task_mean(x, "pre_return") for x in s]),
                         stat([x["mean_post_return"] for x in s]), stat([x["mean_normalized"] for x in s], "{:.2f}"),
                         f"{np.mean([x['share_half'] for x in s]):.0%}",
                         f"{np.mean([x['wall_time_s'] for x in s]) / 60:.1f}"])
    return table(["benchmark", "method", "width", "seeds", "pre-adaptation", "adapted", "normalised",
                  "adaptations ≥ 0.5", "minutes per run"], rows)


def full_budget_table():
    """Every full-budget run of each method on each benchmark (studies/comparison.py, which also draws them)."""
    import comparison
    return table(comparison.HEADER, comparison.rows())


def full_budget_ablation_table():
    """MACAW against its ablation variants, full-budget runs (studies/comparison.py)."""
    import comparison
    return table(comparison.ABLATION_HEADER, comparison.ablation_rows())


def probe_cell(rows, **where):
    from adaptation_probe import score_text
    row = next((r for r in rows if all(r[k] == v for k, v in where.items())), None)
    if row is None:
        return ""
    notes = [f"{row['diverged']:.0%} diverged"] * bool(row["diverged"])
    if 0 < row["scored_runs"] < row["runs"]:  # a seed whose every adaptation diverged has no score
        notes.append(f"{row['scored_runs']} of {row['runs']} seeds")
    return score_text(row) + (f" ({'; '.join(notes)})" if notes else "")


TEST_TIME_ENVS = ("cheetah-vel", "walker-params")  # the benchmarks of the test-time studies (docs/comparisons.md sections 3-5)


def consistency_table(env):
    res = load(RESULTS / "studies" / f"consistency_{env}.json")
    rows, steps = res["table"], sorted({r["steps"] for r in res["table"]})
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for n in sorted({r["batch"] for r in rows if r["variant"] == variant}):
            out.append([variant, n, *(probe_cell(rows, variant=variant, batch=n, steps=s) for s in steps)])
    return table(["method", "rows", *(f"{s} step{'s' * (s > 1)}" for s in steps)], out)


def data_quality_table(env):
    res = load(RESULTS / "studies" / f"data_quality_{env}.json")
    rows = res["table"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for s in sorted({r["steps"] for r in rows if r["variant"] == variant}):
            out.append([variant, s, *(probe_cell(rows, variant=variant, steps=s, source=src) for src in sources)])
    return table(["method", "steps", *sources], out)


def online_table(env):
    from online_finetune import method_returns
    res = load(RESULTS / "studies" / f"online_finetune_{env}.json")
    episodes = [e for e in (0, 1, 2, 5, 10, 20) if e <= res["episodes"]]
    return table(["method", "seeds", *(f"after {e} episode{'s' * (e != 1)}" for e in episodes)],
                 [[m, len(r), *(stat(r[:, e]) for e in episodes)] for m, r in method_returns(res["runs"]).items()])


def td_lambda_table(kind):
    """The TD(lambda) study (studies/td_lambda.py, which also draws it): online fine-tuning or meta-training."""
    import td_lambda
    if kind == "online":
        return table(td_lambda.ONLINE_HEADER, td_lambda.online_rows())
    return table(td_lambda.META_TRAINING_HEADER, td_lambda.meta_training_rows())


def pearl_point_robot_table():
    rows = []
    for name in ("pearl-w300-2k-seed1", "pearl-w64-seed1", "pearl-w64-seed2", "pearl-w64-seed3", "pearl-w64-6k-seed1"):
        s = load(RESULTS / "point-robot" / f"{name}.json")
        words = s["command"].split()
        width = words[words.index("--pearl-width") + 1] if "--pearl-width" in words else "300"
        rows.append([s["seed"], width, f"{s['steps']:,}", f"{task_mean(s, 'pre_return'):.1f}",
                     f"**{s['mean_post_return']:.1f}**", f"{task_mean(s, 'random_return'):.1f}",
                     f"{task_mean(s, 'collector_return'):.1f}", f"{s['wall_time_s'] / 60:.0f} min"])
    return table(["seed", "width", "steps", "before adaptation (task_z = 0)", "adapted (posterior mean)", "random",
                  "collector", "wall time"], rows)


# ---- speed (docs/speed.md)
def speed_table(path, forms=("plain", "vmap", "merged", "compiled", "fast")):
    records = load(RESULTS / "speed" / path)
    rows = [[r["tasks"], r["threads"], r["path"], f"{r['steps_per_s']:.2f} ({r['min']:.1f}-{r['max']:.1f})",
             f"{r['speedup_vs_plain']:.2f}x" if r.get("speedup_vs_plain") else "", f"{r['utilisation']:.1%}"]
            for r in records if r["kind"] == "meta_step" and r["path"] in forms]
    device = records[0]["device"]
    return f"{device}, {records[0]['date']}:\n\n" + table(
        ["tasks", "threads", "form", "meta-steps/s, median (min-max)", "vs plain", "utilisation"], rows)


def memory_table(path):
    return table(["form", "peak memory of a step, 5 tasks"],
                 [[r["path"], f"{r['peak_mb']:.0f} MB"] for r in load(RESULTS / "speed" / path)
                  if r["kind"] == "memory"])


def authors_table():
    res = load(RESULTS / "speed" / "authors_vs_this_xeon.json")
    mean = lambda xs: float(np.mean(xs))
    return f"{res['device']}, {res['date']}:\n\n" + table(
        ["tasks", "the authors' step (meta-steps/s)", "plain (section 6)", "default (section 10)", "default / authors'",
         "plain / authors'"],
        [[r["tasks"], " / ".join(f"{x:.2f}" for x in r["authors"]), " / ".join(f"{x:.2f}" for x in r["plain"]),
          " / ".join(f"{x:.1f}" for x in r["default"]), f"{mean(r['default']) / mean(r['authors']):.1f}x",
          f"{mean(r['plain']) / mean(r['authors']):.1f}x"] for r in res["records"]])


def torchrun_table(path):
    records = load(RESULTS / "speed" / path)
    return f"{records[0]['device']}, {records[0]['date']}:\n\n" + table(
        ["tasks", "processes x threads", "meta-steps/s, median (min-max)", "vs 1 process x 2 threads"],
        [[r["tasks"], f"{r['processes']} x {r['threads']}", f"{r['steps_per_s']:.2f} ({r['min']:.1f}-{r['max']:.1f})",
          f"{r['speedup_vs_one_process']:.2f}x"] for r in records])


def td_refresh_table():
    rows = []
    for path in sorted((RESULTS / "speed").glob("td_refresh_*.json")):
        r = load(path)
        rows.append([r["env"], r["tasks"], f"{r['stored_steps']:,}", f"{r['refresh_s']:.2f} s",
                     f"{r['meta_step_s'] * 1000:.0f} ms", r["td_refresh"], f"{r['added_per_meta_step']:.0%}",
                     f"{r['device']}, {r['date']}"])
    return table(["benchmark", "training tasks", "stored steps", "a refresh", "a default meta-step",
                  "--td-refresh", "time added per meta-step", "measured on"], rows)


def collector_designs_table():
    rows = []
    for env in ("cheetah-vel", "ant-dir"):
        for r in load(RESULTS / "speed" / f"collector_designs_{env}.json"):
            rows.append([env, r["design"], r["width"], r["steps"], f"{r['cpu_min']:.1f}",
                         f"{r['collector_return_mean']:.0f} ({r['collector_return_min']:.0f} .. "
                         f"{r['collector_return_max']:.0f})", f"{r['random_return_mean']:.0f}"])
    return table(["benchmark", "collector", "width", "env steps per task", "CPU minutes, 40-50 tasks",
                  "collector return, mean (min .. max)", "random"], rows)


def cheetah_dir_collectors_table():
    """cheetah-dir's collector recipes: CPU time (one sitting, speed/collector_cost.py) and data quality."""
    cost = {(r["steps"], r["lr"], r["width"], r["shared"]): r for r in
            load(RESULTS / "speed" / "collector_cost_cheetah-dir.json")["recipes"]}
    old = load(RESULTS / "cheetah-dir" / "collector_curves.json")
    runs = [dict(steps=old["collector_steps"], lr=3e-4, width=old["collector_width"], shared=False,
                 collector_return=old["collector_return"], curves=old["per_task_episode_return"], curve_every=15000)]
    runs += [load(RESULTS / "studies" / f"collector_budget_cheetah-dir_{n}.json")
             for n in ("lr1e-3-90k", "lr1e-3-w64-150k", "lr1e-3-shared-200k")]
    default = macaw.BENCHMARKS["cheetah-dir"].defaults
    first_run = load(RESULTS / "cheetah-dir" / "first-run.json")  # (made the default data: its collectors' returns)
    rows = []
    for r in runs:
        # the default is the first `collector_steps` steps of the 200k shared run (the same seed and code path)
        stops = [r["steps"]] + ([default["collector_steps"]] if r.get("shared") and r["steps"] > default["collector_steps"] else [])
        for steps in sorted(stops):
            c = cost.get((steps, r["lr"], r["width"], r.get("shared", False)))
            end = lambda curve: curve[steps // r["curve_every"] - 1]
            rows.append(["one for both directions" if r.get("shared") else "one per direction",
                         f"{r['lr']:.0e}".replace("e-0", "e-"), r["width"],
                         f"{steps // 1000}k" + (" (**default**)" if (steps, r["lr"], r["width"]) == (
                             default["collector_steps"], default["collector_lr"], default["collector_width"]) else ""),
                         f"{c['cpu_min']:.0f}" if c else "", f"{c['of_first']:.2f}" if c else "",
                         " / ".join(f"{x:.0f}" for x in (r["collector_return"] if steps == r["steps"] else
                                                         first_run["collector_return"])),
                         " / ".join(f"{end(curve):.0f}" for curve in r["curves"])])
    return table(["SAC agents", "learning rate", "width", "env steps per direction", "CPU minutes, both directions",
                  "of 300k at 3e-4", "collector return (forward / backward)",
                  "buffer's last episodes (forward / backward)"], rows)


TABLES = {"summary": summary_table, "first-run": first_run_table, "untrained": untrained_table,
          **{f"seeds {e}": (lambda e=e: seed_table(e)) for e in ENVS},
          **{f"tasks {e}": (lambda e=e: task_table(e)) for e in ENVS},
          "main": lambda: comparison_table("main"), "ablation": lambda: comparison_table("ablation"),
          "ablation_wide": lambda: comparison_table("ablation_wide"), "full-budget": full_budget_table,
          "full-budget ablation": full_budget_ablation_table,
          "pearl point-robot": pearl_point_robot_table, "td-lambda online": lambda: td_lambda_table("online"),
          "td-lambda meta-training": lambda: td_lambda_table("meta-training"),
          **{f"consistency {e}": (lambda e=e: consistency_table(e)) for e in TEST_TIME_ENVS},
          **{f"data_quality {e}": (lambda e=e: data_quality_table(e)) for e in TEST_TIME_ENVS},
          **{f"online {e}": (lambda e=e: online_table(e)) for e in TEST_TIME_ENVS},
          "speed epyc": lambda: speed_table("meta_step_epyc.json"),
          "speed xeon": lambda: speed_table("meta_step_xeon.json", ("plain", "vmap", "merged", "compiled")),
          "speed h100": lambda: speed_table("meta_step_h100.json"),
          "speed h100-compiled": lambda: speed_table("meta_step_h100_compiled.json"),
          "memory": lambda: memory_table("meta_step_epyc.json"), "authors": authors_table,
          "torchrun epyc": lambda: torchrun_table("torchrun_epyc.json"), "td-refresh": td_refresh_table,
          "collector-designs": collector_designs_table, "ml45": ml45_table, "ml45 classes": ml45_class_table,
          "cheetah-dir collectors": cheetah_dir_collectors_table}
START, END = "<!-- table ", "<!-- end table -->"


def filled(text):
    """text with every marked table replaced by what results/ gives now."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        out.append(lines[i])
        if lines[i].startswith(START):
            name = lines[i][len(START):].rstrip().removesuffix("-->").strip()
            if name not in TABLES:
                raise SystemExit(f"unknown table {name!r} (python studies/tables.py --show list)")
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == END), None)
            if end is None:
                raise SystemExit(f"table {name!r} has no closing {END}")
            out += [TABLES[name](), END]
            i = end
        i += 1
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is out of date")
    parser.add_argument("--show", help="print one table ('list': their names)")
    args = parser.parse_args(argv)
    if args.show:
        print("\n".join(TABLES) if args.show == "list" else TABLES[args.show]())
        return 0
    import comparison
    import td_lambda
    stale = []
    for study in (comparison, td_lambda):  # the figures drawn from results/
        figure = study.figure_bytes()
        if not study.FIGURE.exists() or study.FIGURE.read_bytes() != figure:
            stale.append(study.FIGURE.relative_to(ROOT))
            if not args.check:
                study.FIGURE.write_bytes(figure)
    for doc in DOCS:
        text = doc.read_text()
        new = filled(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python studies/tables.py")
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale and not args.check else "every table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
