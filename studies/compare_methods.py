"""The paper's comparisons, re-run: MACAW against its baselines (study 1) and its ablations (study 2).

    python studies/compare_methods.py main          # macaw, meta-bc, mt-awr on cheetah-dir and cheetah-vel
    python studies/compare_methods.py main --variants macaw meta-bc mt-awr pearl --steps 15000   # with PEARL
    python studies/compare_methods.py ablation      # macaw, no advantage head, no weight transform
    python studies/compare_methods.py ablation --variants no-weight-transform-wide --envs cheetah-dir \
        --seeds 1 --steps 1500 --name ablation_wide  # plain layers with MACAW's parameter count (slow)
    python studies/compare_methods.py main --envs walker-params --variants macaw td-lambda --steps 15000
                                                    # MACAW's outer value loss on Monte-Carlo vs TD(lambda) targets

Each (benchmark, variant, seed) is one ordinary run of macaw.train() (pearl.train for PEARL) with fewer
meta-steps than the main results (--steps, default 3000, to fit the study in about an hour on 2 cores; say
so next to any number from it). Runs go to runs/studies/<env>-<variant>-seed<k>/ and are reused: a finished run is read
back, an interrupted one resumed (so the macaw runs of `main` also serve `ablation`). --jobs runs that many at once (1 torch thread each).

Writes results/studies/<study>.json (every run's evaluation curve and final summary, the wall time) and
results/studies/<study>.png (held-out post-adaptation return vs meta-step, mean over seeds with the
min-max band), and prints a table of the final returns.
"""
import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402


def wide_width(cfg):
    """The hidden width at which the plain-Linear networks have as many parameters as MACAW's (the
    authors used 725 at their sizes)."""
    def count(c):
        return sum(p.numel() for p in macaw.MACAW(17, 6, c).parameters())
    target = count(cfg)
    plain = dataclasses.replace(cfg, weight_transform=False)
    width = 1
    while count(dataclasses.replace(plain, net_width=2 * width)) < target:
        width *= 2
    lo, hi = width, 2 * width  # count(lo) < target <= count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(dataclasses.replace(plain, net_width=mid)) < target else (lo, mid)
    return hi


VARIANTS = {  # name -> the Config changes that make it
    "macaw": dict(),
    "meta-bc": dict(method="meta-bc"),
    "mt-awr": dict(method="mt-awr"),
    "pearl": dict(method="pearl"),  # offline PEARL, pearl.py
    "no-adv-head": dict(adv_head=False),
    "no-weight-transform": dict(weight_transform=False),
    "no-weight-transform-wide": dict(weight_transform=False, net_width="wide"),
    "td-lambda": dict(value_target="td-lambda"),  # MACAW with TD(0.95) targets in its outer value loss
}
STUDIES = {"main": ("macaw", "meta-bc", "mt-awr"),  # and offline PEARL with --variants ... pearl
           "ablation": ("macaw", "no-adv-head", "no-weight-transform")}
# no-weight-transform-wide (plain layers with MACAW's parameter count) is asked for by name: its meta-step
# was ~16x slower per step than MACAW's here on a CPU (full-rank 1094 x 1094 inner updates per task), so 3 seeds x 2
# benchmarks would not fit the hour; the README gives one seed on cheetah-dir.


def variant_config(base, variant):
    changes = dict(VARIANTS[variant])
    if changes.get("net_width") == "wide":
        changes["net_width"] = wide_width(base)
    return dataclasses.replace(base, **changes)


def run_one(cfg):
    """Train (or resume, or read back) one run; returns its summary and evaluation records."""
    run_dir = Path(cfg.out) / cfg.run_name
    config, train = macaw.Config, macaw.train
    if cfg.method == "pearl":  # its own file and config (macaw.Config's fields and PEARL's)
        import pearl
        config, train = pearl.PearlConfig, pearl.train
        cfg = config(**dataclasses.asdict(cfg))
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        if (run_dir / "checkpoint.pt").exists():
            cfg = dataclasses.replace(config(), resume=str(run_dir), steps=cfg.steps)
        try:
            summary = train(cfg)
        except macaw.Interrupted:  # stopped by run_all (SIGTERM) or Ctrl-C: the run saved its checkpoint
            os._exit(130)  # leave the worker pool at once rather than wait for more work
    records = [r for r in macaw.read_log(run_dir / "log.jsonl", summary["steps"]) if "eval" in r]
    return summary, records


def run_all(configs, jobs):
    """run_one for every config, `jobs` at a time in worker processes. Ctrl-C or SIGTERM to this process
    reaches every worker: each run saves its checkpoint and stops (the same command continues them),
    and no worker is left running."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        return list(pool.map(run_one, configs))
    except KeyboardInterrupt:
        workers = list(pool._processes.values())  # (no public handle on them)
        for w in workers:
            w.terminate()  # SIGTERM: macaw.train checkpoints after the current meta-step and stops
        for w in workers:
            w.join(timeout=120)
            if w.is_alive():
                w.kill()
        raise SystemExit("stopped: every unfinished run saved its checkpoint; the same command continues them")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)


def mean_post(record):
    return float(np.mean([t["post"] for t in record["eval"].values()]))


def plot(results, envs, variants, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for n, variant in enumerate(variants):
            runs = [r for r in results if r["env"] == env and r["variant"] == variant]
            if not runs:
                continue
            steps = [rec["step"] for rec in runs[0]["curve"]]
            curves = np.array([[mean_post(rec) for rec in r["curve"]] for r in runs])
            ax.plot(steps, curves.mean(0), color=f"C{n}", label=f"{variant} ({len(runs)} seeds)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{n}", alpha=0.15, lw=0)
        ax.set(title=f"{env}: held-out tasks, after adaptation", xlabel="meta-training step",
               ylabel="mean episode return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    macaw.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--envs", nargs="+", default=["cheetah-dir", "cheetah-vel"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="default: the study's")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3000, help="meta-steps of every run")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "studies"))
    parser.add_argument("--results", default=str(ROOT / "results" / "studies"))
    parser.add_argument("--name", help="results/studies/<name>.json and .png (default: the study's name)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other Config fields for every run, e.g. data_dir=data (tests use tiny sizes)")
    args = parser.parse_args(argv)
    variants = args.variants or STUDIES[args.study]
    fields = {f.name: f for f in dataclasses.fields(macaw.Config)}
    extra = {}
    for item in args.set:
        key, value = item.split("=", 1)
        extra[key] = fields[key].type(value) if fields[key].type is not bool else value == "True"
    configs, names = [], []
    for env in args.envs:
        for variant in variants:
            for seed in args.seeds:
                base = macaw.Config(env=env, seed=seed, steps=args.steps, eval_every=args.eval_every,
                                    out=args.out, run_name=f"{env}-{variant}-seed{seed}",
                                    **extra)
                configs.append(variant_config(base, variant))
                names.append((env, variant, seed))
    for env in args.envs:  # make any missing data first, once, before the runs start side by side
        macaw.ensure_data(macaw.Config(env=env, **extra).resolve(macaw.get_benchmark(env)), macaw.get_benchmark(env))
    t0, commit = time.time(), macaw.git_commit()  # the code the runs start with (each summary has its own)
    outputs = run_all(configs, args.jobs)
    results = []
    for (env, variant, seed), cfg, (summary, curve) in zip(names, configs, outputs):
        results.append(dict(env=env, variant=variant, seed=seed, net_width=cfg.net_width,
                            summary=summary, curve=curve))
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or args.study
    macaw.write_json(results_dir / f"{name}.json",
                     dict(study=args.study, variants=variants, steps=args.steps, seeds=args.seeds, jobs=args.jobs,
                          wall_time_min=round((time.time() - t0) / 60, 1), commit=commit, runs=results))
    plot(results, args.envs, variants, results_dir / f"{name}.png")
    print(f"\n{args.study}: {args.steps} meta-steps, seeds {args.seeds}, {(time.time() - t0) / 60:.1f} min")
    print(f"{'env':>12} {'variant':>25} {'width':>6} {'pre-adapt':>10} {'adapted':>16} {'normalised':>16}")
    for env in args.envs:
        for variant in variants:
            runs = [r for r in results if r["env"] == env and r["variant"] == variant]
            pre = [np.mean([t["pre_return"] for t in r["summary"]["tasks"].values()]) for r in runs]
            post = [r["summary"]["mean_post_return"] for r in runs]
            norm = [r["summary"]["mean_normalized"] for r in runs]
            print(f"{env:>12} {variant:>25} {runs[0]['net_width']:>6} {np.mean(pre):10.1f} "
                  f"{np.mean(post):8.1f} ± {np.std(post):5.1f} {np.mean(norm):8.2f} ± {np.std(norm):5.2f}")
    print(f"wrote {results_dir / name}.json and .png")


if __name__ == "__main__":
    main()
