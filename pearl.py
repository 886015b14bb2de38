# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the contributors to the macaw repository (MIT licence: see LICENSE).
"""Offline PEARL: the paper's main prior method, a context-based meta-learner, as a baseline for MACAW.

    python pearl.py --env point-robot        # the whole pipeline on the toy task
    python pearl.py --env cheetah-vel        # the same offline data as `python macaw.py --env cheetah-vel`

PEARL (Rakelly, Zhou, Quillen, Finn, Levine, ICML 2019) infers a task from a few of its transitions instead
of taking a gradient step on them. A context encoder q(task_z | context) maps each transition (s, a, r) of a
task's context to a Gaussian factor; their product is the posterior over a 5-d task latent task_z (a
permutation-invariant function of the context), pulled towards N(0, I) by a KL term. A soft actor-critic whose
policy, twin critics and value function all read task_z is trained on the task's transitions; the encoder learns only
through the critics' loss (and the KL). Offline, as the MACAW paper ran it: context batches and RL batches
are both drawn from each training task's offline data, nothing is collected, and at test time the context
is the same 256 random transitions of a held-out task that MACAW adapts on (no online steps).

This file is not MACAW and does not touch macaw.py's algorithm: it imports macaw.py's tasks, offline data,
rollouts and run machinery (locks, atomic checkpoints, logs, summaries, plots), so its runs, summaries and
plots look like MACAW's. Settings follow PEARL's code (katerakelly/oyster, configs/default.py and
rlkit/torch/sac/sac.py) where they apply; docs/comparisons.md lists where this file differs.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import macaw
from macaw import arg


@dataclass
class PearlConfig(macaw.Config):
    """macaw.py's Config (env, seed, data, evaluation, run folders) plus PEARL's own settings."""
    latent_size: int = arg(5, "size of the task latent (PEARL: 5)")
    pearl_width: int = arg(300, "hidden width of the policy, critics and value function (PEARL: 300)")
    encoder_width: int = arg(200, "hidden width of the context encoder (PEARL: 200)")
    pearl_meta_batch: int = arg(16, "tasks per training step (PEARL: 16; all of them if a benchmark has fewer)")
    rl_batch: int = arg(256, "RL transitions per task and step (PEARL: 256)")
    context_batch: int = arg(64, "context transitions per task and step (PEARL: 64)")
    kl_weight: float = arg(0.1, "weight of KL(q(task_z | context) || N(0, I)) in the encoder's loss (PEARL: 0.1)")
    reward_scale: float = arg(5.0, "rewards are multiplied by this in the Bellman target (PEARL: 5)")
    pearl_lr: float = arg(3e-4, "Adam learning rate of every PEARL network (PEARL: 3e-4)")
    target_tau: float = arg(0.005, "soft update rate of the target value function (PEARL: 0.005)")

    def resolve(self, bench):
        """macaw.Config.resolve (the benchmark's defaults, every check), with PEARL's run name and method. (It
        resolves as method "macaw", the one whose checks apply, and refuses MACAW's own settings, unused here.)"""
        unused = [f.name for f in dataclasses.fields(macaw.Config) if f.name in MACAW_ONLY
                  and getattr(self, f.name) != f.default and not (f.name == "method" and self.method == "pearl")]
        if unused:
            raise macaw.UserError(f"pearl.py does not use {macaw.flag_name(unused[0])} (a MACAW setting); PEARL's "
                                  f"own are --latent-size, --pearl-width, --pearl-meta-batch, ... (python pearl.py -h)")
        name = self.run_name or f"{self.env}-pearl-seed{self.seed}"
        cfg = macaw.Config.resolve(dataclasses.replace(self, method="macaw", run_name=name), bench)
        for key in ("latent_size", "pearl_width", "encoder_width", "pearl_meta_batch", "rl_batch", "context_batch"):
            if getattr(cfg, key) < 1:
                raise macaw.UserError(f"{macaw.flag_name(key)} must be >= 1 (got {getattr(cfg, key)})")
        rows = cfg.collector_steps // cfg.buffer_skip
        if max(cfg.rl_batch, cfg.context_batch) > rows:
            raise macaw.UserError(f"--rl-batch / --context-batch exceed a task's {rows} transitions; lower them")
        return dataclasses.replace(cfg, method="pearl")


# macaw.py's settings that PEARL has no use for (its networks, meta-learning and MACAW's faster forms)
MACAW_ONLY = ("method", "net_width", "net_depth", "latent_dim", "adv_head_width", "weight_transform", "adv_head",
              "inner_batch", "outer_batch", "meta_batch", "inner_lr_init", "adv_coef_init", "outer_policy_lr",
              "outer_value_lr", "outer_log_lr_lr", "action_sigma", "adv_clip", "target_vf_alpha",
              "bootstrap_terminations", "plain", "compile", "finetune_steps", "value_target", "td_lambda", "td_refresh",
              "export_minari")


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Pearl(nn.Module):
    """The context encoder, the SAC networks that read the task latent (task_z in the code, to keep it apart from
    macaw.py's weight-transform latents z), and the target value function."""

    def __init__(self, obs_dim, act_dim, cfg):
        super().__init__()
        w, n = cfg.pearl_width, cfg.latent_size
        self.encoder = mlp([obs_dim + act_dim + 1, cfg.encoder_width, cfg.encoder_width, cfg.encoder_width, 2 * n])
        self.policy = mlp([obs_dim + n, w, w, w, 2 * act_dim])  # mean and log std of a tanh-Gaussian
        self.q1, self.q2 = mlp([obs_dim + act_dim + n, w, w, w, 1]), mlp([obs_dim + act_dim + n, w, w, w, 1])
        self.value = mlp([obs_dim + n, w, w, w, 1])
        self.target_value = mlp([obs_dim + n, w, w, w, 1])
        self.target_value.load_state_dict(self.value.state_dict())
        self.latent_size = n

    def posterior(self, context):
        """q(task_z | context) for each task: context (tasks, N, obs + act + 1) -> mean, variance (tasks, latent).
        Each transition gives a Gaussian factor N(mu_n, s_n^2); the posterior is their product,
            1 / var = sum_n 1 / s_n^2,   mean = var * sum_n mu_n / s_n^2,
        so it does not depend on the order of the transitions, and it narrows as transitions are added."""
        mu, raw = self.encoder(context).split(self.latent_size, -1)
        s2 = F.softplus(raw).clamp(min=1e-7)
        var = 1.0 / (1.0 / s2).sum(1)
        return var * (mu / s2).sum(1), var

    def act(self, obs, task_z, deterministic=False):
        """tanh-squashed Gaussian policy: obs (..., obs), task_z (..., latent) -> action in [-1, 1], log pi, mean,
        log std."""
        mean, log_std = self.policy(torch.cat([obs, task_z], -1)).chunk(2, -1)
        log_std = log_std.clamp(-20, 2)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        logp = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
                - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), logp, mean, log_std


def kl_to_prior(mean, var):
    """KL(N(mean, var) || N(0, I)), summed over latent dimensions and tasks."""
    return 0.5 * (var + mean.pow(2) - 1 - var.log()).sum()


def make_optimizers(model, cfg):
    """One Adam per network, as PEARL (the target value function follows the value function by soft updates)."""
    return [torch.optim.Adam(net.parameters(), lr=cfg.pearl_lr)
            for net in (model.encoder, model.policy, model.q1, model.q2, model.value)]


def train_step(model, optimizers, context, batch, cfg):
    """One PEARL step on a meta-batch (rlkit's PEARLSoftActorCritic._take_step, offline). context: (tasks, N, in);
    batch: dict of (tasks, B, ...) tensors obs, actions (in [-1, 1]), rewards, next_obs, terminations.
    Returns the losses."""
    encoder_opt, policy_opt, q1_opt, q2_opt, value_opt = optimizers
    tasks, b = batch["obs"].shape[:2]
    mean, var = model.posterior(context)
    task_z = (mean + var.sqrt() * torch.randn_like(mean))[:, None].expand(tasks, b, -1)  # one sample a task
    obs, actions = batch["obs"], batch["actions"]
    # critics and encoder: the encoder learns only from the critics' loss and the KL
    q_in = torch.cat([obs, actions, task_z], -1)
    with torch.no_grad():
        target_v = model.target_value(torch.cat([batch["next_obs"], task_z], -1)).squeeze(-1)
        q_target = cfg.reward_scale * batch["rewards"] + (1 - batch["terminations"]) * cfg.discount * target_v
    q_loss = sum((q(q_in).squeeze(-1) - q_target).pow(2).mean() for q in (model.q1, model.q2))
    kl = kl_to_prior(mean, var)
    for opt in (encoder_opt, q1_opt, q2_opt):
        opt.zero_grad()
    (cfg.kl_weight * kl + q_loss).backward()
    for opt in (encoder_opt, q1_opt, q2_opt):
        opt.step()
    # value function and policy, at the sampled task_z without a gradient into the encoder
    task_z = task_z.detach()
    new_actions, logp, pre_mean, log_std = model.act(obs, task_z)
    new_q_in = torch.cat([obs, new_actions, task_z], -1)
    min_q = torch.min(model.q1(new_q_in), model.q2(new_q_in)).squeeze(-1)
    v_loss = (model.value(torch.cat([obs, task_z], -1)).squeeze(-1) - (min_q - logp).detach()).pow(2).mean()
    value_opt.zero_grad()
    v_loss.backward()
    value_opt.step()
    with torch.no_grad():
        for p, p_target in zip(model.value.parameters(), model.target_value.parameters()):
            p_target.lerp_(p, cfg.target_tau)
    policy_loss = (logp - min_q).mean() + 1e-3 * (pre_mean.pow(2).mean() + log_std.pow(2).mean())
    policy_opt.zero_grad()
    policy_loss.backward()  # (the critics get gradients here too; they are zeroed before their next step)
    policy_opt.step()
    return dict(q=q_loss.item(), kl=kl.item(), value=v_loss.item(), policy=policy_loss.item())


class PearlTaskData:
    """One task's offline transitions as tensors (actions scaled to [-1, 1]), every buffer_skip-th row as MACAW
    keeps them, with random batches."""

    def __init__(self, data, scale, cfg):
        fields = dict(obs="observations", actions="actions", rewards="rewards", next_obs="next_observations",
                      terminations="terminations")
        device = cfg.device
        self.tensors = {k: torch.as_tensor(np.asarray(data[v][::cfg.buffer_skip], np.float32), device=device)
                        for k, v in fields.items()}
        self.tensors["actions"] = self.tensors["actions"] / torch.as_tensor(scale, dtype=torch.float32, device=device)
        self.size = len(self.tensors["obs"])
        self.collector_return = float(data["collector_return"])
        self.random_return = float(data["random_return"])

    def random_batch(self, n, gen):
        idx = torch.randperm(self.size, generator=gen)[:n].to(self.tensors["obs"].device)
        return {k: v[idx] for k, v in self.tensors.items()}


def as_context(batch):
    """(s, a, r) of each transition: PEARL's default context, without s'. (walker-params' tasks differ in their
    dynamics, which s' would show more directly; the context here is the same for every benchmark.)"""
    return torch.cat([batch["obs"], batch["actions"], batch["rewards"][..., None]], -1)


def stack(batches):
    return {k: torch.stack([b[k] for b in batches]) for k in batches[0]}


def evaluate(model, bench, task_data, cfg, gen, rollouts=1):
    """Per test task, like macaw.evaluate: `rollouts` times, infer task_z from a fresh context of eval_batch random
    transitions of the task and run one deterministic episode with the posterior mean ("post"), and one with
    the prior mean task_z = 0, the policy before it has seen the task ("pre")."""
    scale = bench.make_env().action_space.high

    def actor(task_z):
        def act(obs):
            with torch.no_grad():
                o = torch.as_tensor(obs, dtype=torch.float32, device=cfg.device)[None]
                return model.act(o, task_z[None], deterministic=True)[0][0].cpu().numpy() * scale
        return act
    results = {}
    for k in bench.test_ids:
        env = macaw.make_task_env(bench, k)
        pre, post = [], []
        for r in range(rollouts):
            with torch.no_grad():
                mean, _ = model.posterior(as_context(task_data[k].random_batch(cfg.eval_batch, gen))[None])
            seed = 10_000 * cfg.seed + r
            pre.append(macaw.rollout(env, actor(torch.zeros_like(mean[0])), seed))
            post.append(macaw.rollout(env, actor(mean[0]), seed))
        results[k] = dict(pre=float(np.mean(pre)), post=float(np.mean(post)), pre_each=pre, post_each=post)
    return results


def train(cfg):
    """Train offline PEARL end to end; returns the summary (also <out>/<run-name>/summary.json). Runs, resumes
    (--resume), locks and writes its files as macaw.train does."""
    if cfg.resume:
        cfg = macaw.load_resume_config(cfg)
    if macaw.process_share()[1] > 1:
        raise macaw.UserError("pearl.py runs in one process: start it with python, not torchrun")
    bench = macaw.get_benchmark(cfg.env)
    resume = cfg.resume
    cfg = cfg.resolve(bench)
    run_dir = Path(cfg.out) / cfg.run_name
    macaw.check_writable(run_dir, "--out")
    macaw.check_writable(Path(cfg.data_dir) / cfg.env, "--data-dir")
    with macaw.folder_lock(run_dir, wait=False, purpose="training"), macaw.run_settings(cfg) as stop:
        if not resume and any((run_dir / n).exists() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
            raise macaw.UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
        return run_locked(cfg, bench, run_dir, stop, resume)


def run_locked(cfg, bench, run_dir, stop, resume):
    run_versions = macaw.versions()
    t0 = time.time()
    if cfg.data_source == "npz":
        macaw.ensure_data(cfg, bench, stop)
    scale = bench.make_env().action_space.high
    task_data = [PearlTaskData(macaw.load_task_data(macaw.task_data_path(cfg, k), bench, k, cfg), scale, cfg)
                 for k in range(len(bench.tasks))]
    data_time = time.time() - t0
    obs_dim, act_dim = task_data[0].tensors["obs"].shape[1], task_data[0].tensors["actions"].shape[1]
    model = Pearl(obs_dim, act_dim, cfg).to(cfg.device)
    optimizers = make_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall_time, running = 0, 0.0, []
    ckpt_path, log_path, summary_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl", run_dir / "summary.json"
    if resume:
        state = macaw.load_checkpoint(run_dir, cfg.device)
        if state["step"] >= cfg.steps and summary_path.exists():
            print(f"{run_dir} is already finished at step {state['step']}")
            return json.loads(summary_path.read_text())
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, wall_time, running = state["step"], state["wall_time"], state["running"]
    records = macaw.read_log(log_path, step)
    macaw.write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    macaw.write_json(run_dir / "versions.json", run_versions)
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("target_value"))
    print(f"offline PEARL on {cfg.env}: {len(bench.train_ids)} train / {len(bench.test_ids)} test tasks, "
          f"{n_params:,} parameters, {cfg.steps} steps -> {run_dir}/")
    bar = tqdm(total=cfg.steps, initial=step, desc="pearl", mininterval=1, dynamic_ncols=True)
    t_start, interval_start = time.time() - wall_time, time.time()
    try:
        while step < cfg.steps and not stop:
            n = min(cfg.pearl_meta_batch, len(bench.train_ids))
            ids = [bench.train_ids[i] for i in torch.randperm(len(bench.train_ids), generator=gen)[:n].tolist()]
            context = as_context(stack([task_data[k].random_batch(cfg.context_batch, gen) for k in ids]))
            batch = stack([task_data[k].random_batch(cfg.rl_batch, gen) for k in ids])
            stats = train_step(model, optimizers, context, batch, cfg)
            if not all(math.isfinite(v) for v in stats.values()):
                raise macaw.UserError(f"non-finite loss at step {step + 1} ({stats}); the last good checkpoint is "
                                      f"{ckpt_path}")
            step += 1
            running.append(stats)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record = dict(step=step, time=round(time.time() - t_start, 1),
                              **{k: float(np.mean([r[k] for r in running])) for k in running[0]})
                record["steps_per_s"] = round(len(running) / (time.time() - interval_start), 2)
                record["eval"] = {str(k): v for k, v in evaluate(model, bench, task_data, cfg, gen,
                                                                 cfg.eval_rollouts).items()}
                running = []
                records.append(record)
                bar.write(f"step {step}: " + "  ".join(f"task {k} pre {v['pre']:.0f} post {v['post']:.0f}"
                                                       for k, v in record["eval"].items()))
                macaw.save_checkpoint(ckpt_path, model, optimizers, gen, step, time.time() - t_start, running, cfg)
                macaw.atomic_write(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
                macaw.plot_run(records, task_data, bench, run_dir / "curves.png", ("q", "value", "policy", "kl"))
                interval_start = time.time()
    finally:
        bar.close()
    if stop:
        macaw.save_checkpoint(ckpt_path, model, optimizers, gen, step, time.time() - t_start, running, cfg)
        raise macaw.Interrupted(f"{stop[0]}: stopped at step {step}; continue with python pearl.py --resume {run_dir}")
    final = evaluate(model, bench, task_data, cfg, gen, rollouts=cfg.final_eval_rollouts)
    summary = macaw.summarize(cfg, bench, task_data, final, time.time() - t_start, data_time, run_versions)
    summary["command"] = summary["command"].replace("python macaw.py", "python pearl.py").replace(" --method pearl", "")
    macaw.write_json(summary_path, summary)
    macaw.print_summary(summary)
    return summary


def parse_config(argv=None):
    return macaw.parse_config(argv, PearlConfig, "offline PEARL, a baseline for MACAW (pearl.py)", hide=MACAW_ONLY)


def main(argv=None):
    """The command line; returns the exit code (0 done, 2 a problem the user can fix, 130 stopped)."""
    try:
        train(parse_config(argv))
        return 0
    except macaw.UserError as e:
        print(f"{'stopped' if isinstance(e, macaw.Interrupted) else 'error'}: {e}", file=sys.stderr)
        return 130 if isinstance(e, macaw.Interrupted) else 2


if __name__ == "__main__":
    sys.exit(main())
