"""Online fine-tuning after offline adaptation (the paper's last study): keep acting in the test task.

    python studies/online_finetune.py runs/cheetah-vel-seed1 runs/cheetah-vel-mt-awr-seed1

For each trained run and each test task: adapt on 256 offline transitions as evaluation does, then
repeat --episodes times: act one episode in the task with exploration noise (mu(s) + N(0, sigma^2),
sigma the run's --action-sigma), add it to the adaptation data, and adapt again from where the last
adaptation ended on a random batch of 256 of all the adaptation data so far: --rule adam (default)
takes the run's --finetune-steps (20) Adam steps on the method's plain objective, the same for every
method (MT-AWR always does; MACAW: value regression + AWR; Meta-BC: cloning; adaptation_probe.adapt_steps);
--rule repeat takes MACAW's or Meta-BC's own inner step with the learned step sizes again, --inner-steps
times (meta-trained for one step only, it can blow up).
After each round, one deterministic episode measures the return. Returns vs environment steps, mean
over test tasks, --repeats times each, go to results/studies/<--name>_<env>.json (and .png).

--targets mc 0.9 0.95 runs each (run, value target) pair: mc is the Monte-Carlo target every method
fits (bootstrapped at a time limit), a number lambda fits the value function of the Adam steps to
TD(lambda) targets instead (macaw.lambda_returns over each online episode, recomputed from the current
value function before every round's Adam steps; --rule adam only, as the inner step keeps its
Monte-Carlo target):

    python studies/online_finetune.py runs/cheetah-vel-seed* --targets mc 0.9 0.95 --episodes 40 --name td_lambda_online

The output file keeps what earlier commands of the same study wrote into it (same --episodes, --rule, --inner-steps
and --repeats; another setting replaces the file): a study can run in parts, e.g. one process per run on two cores,
and a (run, target) pair run again replaces its own entry.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "studies"))
import macaw  # noqa: E402
from adaptation_probe import RULES, adapt_steps, earlier_results, in_study_order, load_run  # noqa: E402


def noisy_episode(env, actor, sigma, seed):
    """One episode with Gaussian exploration noise, as the arrays of a task's data file."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations")}
    done = False
    while not done:
        action = np.clip(actor(obs) + sigma * rng.standard_normal(env.action_space.shape),
                         env.action_space.low, env.action_space.high)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(rows, (obs, action, reward, next_obs, terminated, truncated)):
            rows[k].append(v)
        obs, done = next_obs, terminated or truncated
    return {k: np.array(v, np.float32 if k not in ("terminations", "truncations") else bool) for k, v in rows.items()}


def adaptation_data(model, vparams, offline, episodes, cfg, code):
    """The adaptation data so far as one batch: the offline rows, then every online episode's steps. With
    --value-target td-lambda each row also gets its value target from the value function vparams: an online
    episode's steps their lambda-returns over the whole episode, the offline rows (whose episodes are not part
    of the adaptation data) (5)'s bootstrapped Monte-Carlo target, i.e. lambda = 1."""
    if not episodes:
        rows = dict(offline)
    else:
        whole = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
        online = macaw.TaskData(dict(whole, collector_return=0.0, random_return=0.0), cfg, code)
        rows = {k: torch.cat([offline[k], online.tensors[k].to(offline[k].dtype)]) for k in offline}
    if cfg.value_target == "td-lambda":
        with torch.no_grad():
            targets = [macaw.bootstrapped_return(model.value, vparams, offline)]
            if episodes:
                ep = online.episodes
                next_values = torch.func.functional_call(model.value, vparams, (ep["next_obs"],)).double().numpy()
                targets.append(torch.as_tensor(macaw.lambda_returns(ep["rewards"], next_values, ep["ends"],
                                                                    ep["end_discounts"], cfg.discount, cfg.td_lambda),
                                               dtype=torch.float32))
        rows["lambda_return"] = torch.cat(targets)
    return rows


def online_curve(model, cfg, data, env, episodes, inner_steps, seed, rule="adam"):
    gen = torch.Generator().manual_seed(seed)
    offline = data.random_batch(cfg.eval_batch, gen)  # the offline start, as in evaluation
    mt_awr = cfg.method == "mt-awr"
    params = adapt_steps(model, model.params(), adaptation_data(model, model.params()[0], offline, [], cfg, data.code),
                         cfg.finetune_steps if mt_awr else 1, cfg, rule)
    per_round = cfg.finetune_steps if mt_awr or rule == "adam" else inner_steps
    actor = lambda p: macaw.policy_actor(model.policy, p, cfg.device, data.code)
    returns, env_steps, online = [macaw.rollout(env, actor(params[1]), seed)], [0], []
    for e in range(episodes):
        online.append(noisy_episode(env, actor(params[1]), cfg.action_sigma, 1000 * seed + e))
        adaptation = adaptation_data(model, params[0], offline, online, cfg, data.code)
        idx = torch.randperm(len(adaptation["obs"]), generator=gen)[:cfg.eval_batch]
        params = adapt_steps(model, params, {k: v[idx] for k, v in adaptation.items()}, per_round, cfg, rule,
                             from_meta=False)
        returns.append(macaw.rollout(env, actor(params[1]), seed))
        env_steps.append(env_steps[-1] + len(online[-1]["rewards"]))
    return env_steps, returns


def series(res):
    """The name of one result's line in the table and the figure: its method, and its value target if not mc."""
    target = res.get("target", "mc")
    return res["method"] if target == "mc" else f"{res['method']}, TD(λ = {target})"


def method_returns(results):
    """{series: array (runs x rounds)}: each run's return after each round, averaged over its test
    tasks and online runs (what the table, the figure and studies/tables.py show)."""
    names = dict.fromkeys(series(res) for res in results.values())
    return {m: np.array([np.mean([r for task in res["curves"].values() for _, r in task], axis=0)
                         for res in results.values() if series(res) == m]) for m in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=10, help="online episodes per test task")
    parser.add_argument("--rule", choices=RULES, default="adam", help="how MACAW/Meta-BC keep adapting (above)")
    parser.add_argument("--inner-steps", type=int, default=1, help="--rule repeat: inner steps per episode")
    parser.add_argument("--repeats", type=int, default=3, help="online runs per test task")
    parser.add_argument("--data-dir", help="where the runs' data are, if not where they were trained")
    parser.add_argument("--targets", nargs="+", default=["mc"],
                        help="value targets of the Adam steps: mc, or a lambda in [0, 1] for TD(lambda) (above)")
    parser.add_argument("--name", default="online_finetune", help="results go to <name>_<env>.json and .png")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "studies")
    args = parser.parse_args(argv)
    lambdas = [t for t in args.targets if t != "mc"]
    if not all(t.replace(".", "", 1).isdigit() and 0 <= float(t) <= 1 for t in lambdas):
        raise SystemExit(f"--targets takes mc or numbers in [0, 1], not {' '.join(args.targets)}")
    if lambdas and args.rule != "adam":
        raise SystemExit("TD(lambda) targets are for the Adam steps: use --rule adam (the inner step keeps Monte-Carlo)")
    torch.set_num_threads(1)
    results, commit = {}, macaw.git_commit()  # the code this command runs
    for run in args.runs:
        cfg, bench, data, model = load_run(run, args.data_dir)
        cfg.buffer_skip = 1  # the online episodes are kept whole
        if lambdas and cfg.method == "meta-bc":
            raise SystemExit(f"{run} is meta-bc, which fits no value function: give TD(lambda) targets RL runs only")
        for target in args.targets:
            cfg = dataclasses.replace(cfg, value_target="mc" if target == "mc" else "td-lambda",
                                      td_lambda=cfg.td_lambda if target == "mc" else float(target))
            curves, start = {}, time.perf_counter()
            for k in bench.test_ids:
                env = macaw.make_task_env(bench, k)
                curves[str(k)] = [online_curve(model, cfg, data[k], env, args.episodes, args.inner_steps, seed, args.rule)
                                  for seed in range(args.repeats)]
            key = str(run) if target == "mc" else f"{run} td{target}"
            results[key] = dict(env=cfg.env, method=cfg.method, seed=cfg.seed, target=target, curves=curves,
                                collector={str(k): data[k].collector_return for k in bench.test_ids},
                                wall_time_s=time.perf_counter() - start, commit=commit)
            mean = np.mean([r for c in curves.values() for _, r in c], axis=0)
            print(f"{run} ({series(results[key])}): mean return over test tasks after 0, 1, ... online episodes: "
                  + " ".join(f"{x:.0f}" for x in mean))
    out = args.results / f"{args.name}_{cfg.env}.json"
    settings = dict(episodes=args.episodes, rule=args.rule, inner_steps=args.inner_steps, repeats=args.repeats)
    with macaw.folder_lock(args.results, wait=True, purpose=f"writing {out.name}"):  # (one writer at a time)
        results = in_study_order({**earlier_results(out, settings).get("runs", {}), **results}, lambda key, res: res["method"])
        macaw.write_json(out, dict(runs=results, commit=commit, **settings,
                                   targets=list(dict.fromkeys(res["target"] for res in results.values()))))
    print(f"\n{cfg.env}, rule {args.rule}: mean return over test tasks, then mean ± std over runs")
    print("| method | runs | " + " | ".join(f"after {e} episodes" for e in range(args.episodes + 1)) + " |")
    print("|---|---|" + "---|" * (args.episodes + 1))
    for method, per_run in method_returns(results).items():
        print(f"| {method} | {len(per_run)} | " + " | ".join(f"{m:.0f} ± {sd:.0f}" for m, sd in
                                                             zip(per_run.mean(0), per_run.std(0))) + " |")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, (name, returns) in enumerate(method_returns(results).items()):  # mean over runs; band: their range
        steps = np.mean([s for res in results.values() if series(res) == name
                         for task in res["curves"].values() for s, _ in task], axis=0)
        ax.plot(steps, returns.mean(0), color=f"C{n}", label=f"{name} ({len(returns)} runs)")
        ax.fill_between(steps, returns.min(0), returns.max(0), color=f"C{n}", alpha=0.12, lw=0)
    ax.set(xlabel="online environment steps (mean over test tasks)", ylabel="episode return",
           title=f"{', '.join(dict.fromkeys(res['env'] for res in results.values()))}: "
                 "online fine-tuning after offline adaptation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    macaw.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
