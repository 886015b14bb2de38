# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the contributors to the macaw repository (MIT licence: see LICENSE, or
# https://opensource.org/license/mit; keep these two lines in a copy of this file).
"""MACAW: Meta-Actor Critic with Advantage Weighting, in one file.

Offline meta-RL (Mitchell, Rafailov, Peng, Levine, Finn, ICML 2021, arXiv 2008.06043): meta-train on
fixed offline data from many tasks, then adapt to a new task from 256 of its own offline transitions
with ONE gradient step on a value function and ONE on a policy. Both inner and outer objectives are
supervised regressions: value regression onto Monte-Carlo returns and advantage-weighted regression (AWR).

    pip install -r requirements.txt
    python macaw.py --env point-robot        # a 2-D toy task (under a minute on one CPU core)
    python macaw.py --env cheetah-dir        # makes the offline data once, meta-trains, evaluates
    torchrun --nproc-per-node 2 macaw.py --env cheetah-dir   # the same over 2 processes (section 9)
    python -m pytest                         # the tests (and the tutorial notebook)

How to read this file
---------------------
Read sections 1-7 top to bottom: config, tasks, the offline data as MACAW reads them, then the algorithm,
sections 4-7 (under 400 lines): networks, losses, the inner and outer loops (with the paper's baselines,
Meta-BC and multi-task AWR), evaluation. Section 6 is a plain loop over tasks with the plain inner step,
and `python macaw.py --plain` meta-trains with exactly that code. A default run takes section 10's faster
forms of section 6 (2-5x faster, the same numbers up to float rounding; the tests hold every form to section
6 and a step recorded from the authors' code), picked in one place, meta_step_function. After editing section 6,
run with --plain: a default run stops and says so rather than ignore the edit. Sections 8 (making the
data) and 9 (running it: files, locks, checkpoints, logs, plots, the CLI) are machinery a first read can
skip. Every default mirrors the authors' `config/alg/standard.json` unless docs/differences.md says otherwise.

Key equations (one notation everywhere; code names in [brackets])
-----------------------------------------------------------------
Data of one task: transitions (s_t, a_t, r_t); the episode holding step t ends at step H.
    R_t = sum_{k=t}^{H-1} gamma^(k-t) r_k                     [mc_return; s_H: terminal_obs,
                                                                 gamma^(H-t): terminal_discount]
    (terminal_discount is 0 where the episode ended by a fall, not the time limit: nothing follows a fall)
Meta-parameters: value weights phi, policy weights theta (trunk + advantage head), one unconstrained
scalar l_j per parameter tensor giving its step size alpha_j = softplus(l_j) [raw_value_lrs,
raw_policy_lrs], and an unconstrained lambda giving the head's loss weight softplus(lambda) [raw_adv_coef].
D_in = inner batch (256 contiguous rows), D_out = outer batch (256 random rows) of the same task.
Every layer is a weight-transform layer: its parameters are generated as omega = T z + c (section 4).
  (1) inner value loss  L_V(phi)  = mean_{D_in} (V_phi(s_t) - R_t)^2
                        phi'      = phi - alpha_V * grad L_V(phi)          (per tensor alpha_j)
  (2) advantage         A(s_t, a_t) = R_t + gamma^(H-t) V_phi'(s_H) - V_phi'(s_t)    (no gradient)
  (3) AWR weight        w = exp(min((A - mean A) / std A, log 20))    (batch mean, unbiased std)
  (4) inner policy loss L_pi(theta) = mean_{D_in} [ -w log N(a_t; mu_theta(s_t), 0.2^2 I)
                                                    + softplus(lambda) (A_hat_theta(s_t, a_t) - A)^2 ]
                        theta'    = theta - alpha_pi * grad L_pi(theta)
  (5) outer value loss  L_V^out   = mean_{D_out} (V_phi'(s_t) - [R_t + gamma^(H-t) V_phibar(s_H)])^2,
                        phibar    = rho phi + (1 - rho) phi', rho = 0.9  (no gradient through phibar)
  (6) outer policy loss L_pi^out  = mean_{D_out} [ -w log N(a_t; mu_theta'(s_t), 0.2^2 I) ],
                                    w from (2)-(3) on D_out with phi'
Meta-objective over a meta-batch M of training tasks:
    J(phi, theta, l, lambda) = (1 / N_train) sum_{i in M} (L_V^out_i + L_pi^out_i),
minimised by Adam, differentiating through the inner steps (full second order).

Algorithm 1 (meta-training), each line with the function that implements it
---------------------------------------------------------------------------
    for step = 1 .. steps:                                                    [train]
        M = meta_batch training tasks, each with D_in and D_out               [sample_meta_batch]
        for task i in M:                                                      [meta_losses]
            phi'   <- one step on (1)                                         [adapt]
            A, w   <- (2), (3) on D_in with phi'                              [advantages, awr_weights]
            theta' <- one step on (4)                                         [adapt, inner_policy_loss]
            L_V^out_i, L_pi^out_i <- (5), (6)                                 [outer_losses]
        J <- the sum over i of both, / N_train                                [meta_objective]
        Adam step on grad J for phi, theta, l, lambda                         [meta_train_step]
    Meta-test on a held-out task: D = 256 random offline rows of it; phi', theta' by (1)-(4) on D;
    act with mu_theta'(s) in that task's environment                          [evaluate]

Why each design choice (one line each)
--------------------------------------
- AWR, not an off-policy actor-critic: a regression onto the data's own actions never queries Q at unseen actions.
- Inner value target R_t (pure Monte-Carlo): one step from the data alone, no bootstrap to go wrong.
- Outer target bootstrapped through phibar: a slow mix of phi and phi' as a target network with no extra state.
- D_in contiguous (as the authors sample it: one or two 200-step episodes from one stage of the collector's
  learning), D_out random rows of the whole buffer; at test time, 256 random rows (docs/differences.md).
- Outer losses divided by N_train (not |M|), as the authors: a constant factor that Adam all but cancels.
- Weight transform omega = T z + c: one step moves the weights along a meta-learned T T^T of the gradient.
- Advantage head A_hat: regressing A itself puts more of the new task into the one step than the AWR weights.
- ReLU on [h, a] (the dataset action too) inside the head: the authors' code does it; kept on purpose.
"""
import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

try:
    import fcntl  # OS file locks (Linux, macOS)
except ImportError:  # Windows
    fcntl = None
try:
    import mujoco  # the MuJoCo benchmarks; point-robot runs without it
except ImportError:
    mujoco = None

DATA_FORMAT_VERSION = 1


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data file); main() prints it as one line."""


# ================================================================================================
# 1. Config: every field is a command-line flag (--field-name), with its help text beside it.
# ================================================================================================
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- what to run
    env: str = arg("cheetah-dir", "benchmark: cheetah-dir, cheetah-vel, ant-dir, walker-params, point-robot or ml45")
    method: str = arg("macaw", "macaw, or a baseline of the paper: meta-bc or mt-awr (docs/comparisons.md)")
    seed: int = arg(1, "seed of meta-training and evaluation (the offline data has its own --data-seed)")
    steps: int = arg(-1, "meta-training steps; -1 = the benchmark's default (15000; point-robot 400)")
    eval_every: int = arg(-1, "evaluate every this many meta-steps; -1 = the benchmark's default")
    device: str = arg("cpu", "torch device, e.g. cpu or cuda")
    threads: int = arg(1, "torch CPU threads; 1 is steadiest on small nets (docs/speed.md)")
    data_dir: str = arg("data", "offline data lives in <data-dir>/<env>/task<k>.npz")
    out: str = arg("runs", "runs are written to <out>/<run-name>/")
    run_name: str = arg("", "name of the run folder; default <env>-seed<seed> (a baseline: <env>-<method>-seed<seed>)")
    resume: str = arg("", "path of a run folder to continue from its checkpoint")
    # --- MACAW (the authors' standard.json, except where docs/differences.md says)
    net_width: int = arg(100, "hidden width of the policy and value networks")
    net_depth: int = arg(3, "hidden layers of the policy and value networks")
    latent_dim: int = arg(100, "size of the latent z of each weight-transform layer")
    adv_head_width: int = arg(32, "hidden width of the advantage head")
    weight_transform: bool = arg(True, "use weight-transform layers (--no-weight-transform: plain Linear)")
    adv_head: bool = arg(True, "the advantage head in the inner policy loss (--no-adv-head: MAML + AWR)")
    inner_batch: int = arg(256, "inner (adaptation) batch: contiguous transitions of one task")
    outer_batch: int = arg(256, "outer (meta) batch: random transitions of the same task")
    meta_batch: int = arg(5, "tasks per meta-step (all of them if a benchmark has fewer)")
    inner_lr_init: float = arg(1e-3, "initial learned inner step size, softplus(l) ~ this")
    adv_coef_init: float = arg(0.01, "initial advantage-head loss weight softplus(lambda)")
    outer_policy_lr: float = arg(1e-4, "Adam learning rate of the policy")
    outer_value_lr: float = arg(1e-4, "Adam learning rate of the value function (authors: 1e-5; docs/differences.md)")
    outer_log_lr_lr: float = arg(1e-3, "Adam learning rate of the step sizes and lambda")
    discount: float = arg(0.99, "discount of the Monte-Carlo returns")
    action_sigma: float = arg(0.2, "fixed std of the Gaussian policy used in the log-likelihood")
    adv_clip: float = arg(20.0, "AWR weights are exp(min(normalised advantage, log adv_clip))")
    target_vf_alpha: float = arg(0.9, "the target mix of (5): phibar = rho phi + (1 - rho) phi', rho = this")
    buffer_skip: int = arg(1, "keep every k-th transition of each task's data (authors: 7)")
    bootstrap_terminations: bool = arg(False, "bootstrap the value target after a fall too, as the authors' code")
    value_target: str = arg("mc", "outer value target (5): mc (the paper's) or td-lambda (docs/differences.md)")
    td_lambda: float = arg(0.95, "lambda of --value-target td-lambda (1: the mc target, 0: one-step TD)")
    td_refresh: int = arg(250, "--value-target td-lambda: recompute the lambda-returns every this many meta-steps")
    plain: bool = arg(False, "meta-train with section 6 as written, not section 10's faster forms (same numbers)")
    compile: bool = arg(False, "compile the meta-gradient with torch.compile (needs a C compiler; docs/speed.md)")
    finetune_steps: int = arg(20, "mt-awr only: Adam steps on the test task's batch at test time (at the outer lrs)")
    # --- evaluation
    eval_batch: int = arg(256, "offline transitions of a test task given for adaptation")
    eval_rollouts: int = arg(3, "adaptations (one rollout each) per test task at each evaluation in training")
    final_eval_rollouts: int = arg(10, "adaptations (one rollout each) per test task in the final summary")
    # --- offline data
    data_seed: int = arg(0, "seed of the data collectors")
    collector_steps: int = arg(-1, "env steps of each task's collector; -1 = the benchmark's default")
    collector_width: int = arg(-1, "hidden width of the SAC collectors; -1 = the benchmark's default (docs/data.md)")
    collector_lr: float = arg(-1.0, "Adam learning rate of the SAC collectors; -1 = the benchmark's default")
    collector_design: str = arg("", "per-task (one SAC agent per task) or shared (one task-conditioned agent per "
                                     "worker); '' = the benchmark's default")
    regenerate_data: bool = arg(False, "delete and regenerate this env's offline data")
    data_source: str = arg("npz", "npz (<data-dir>/<env>/, made here) or minari (the data sets --export-minari writes)")
    export_minari: bool = arg(False, "write this env's data (made first if missing) as Minari data sets, then stop")

    def resolve(self, bench):
        """A copy with the benchmark-dependent defaults (-1, '') filled in, every value checked before any
        work starts (UserError otherwise). The config it is called on stays as it was."""
        cfg = dataclasses.replace(self, **{name: bench.defaults[name] for name in (
            "steps", "eval_every", "collector_steps", "collector_width", "collector_lr") if getattr(self, name) == -1})
        cfg.collector_design = cfg.collector_design or bench.defaults["collector_design"]
        if cfg.collector_design not in ("per-task", "shared"):
            raise UserError(f"unknown --collector-design {cfg.collector_design!r}; choose per-task or shared")
        if cfg.method not in METHODS:
            raise UserError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        if cfg.method != "macaw":
            cfg.adv_head = False  # the head is part of MACAW's inner loss only
        if cfg.value_target not in ("mc", "td-lambda") or not 0 <= cfg.td_lambda <= 1:
            raise UserError("--value-target is mc or td-lambda, with 0 <= --td-lambda <= 1")
        if cfg.value_target == "td-lambda" and cfg.method != "macaw":
            raise UserError(f"--value-target td-lambda is for MACAW's outer value loss; --method {cfg.method} has none")
        if cfg.data_source not in ("npz", "minari"):
            raise UserError(f"unknown --data-source {cfg.data_source!r}; choose npz or minari")
        if cfg.export_minari and cfg.data_source == "minari":
            raise UserError("--export-minari writes the .npz data as Minari data sets: leave out --data-source minari")
        if cfg.plain and cfg.compile:
            raise UserError("--compile compiles the faster forms, --plain runs section 6 as written: pass one of them")
        cfg.run_name = cfg.run_name or default_run_name(cfg)
        for name in ("steps", "eval_every", "threads", "net_width", "net_depth", "latent_dim", "adv_head_width",
                     "inner_batch", "outer_batch", "meta_batch", "buffer_skip", "eval_batch", "eval_rollouts",
                     "final_eval_rollouts", "collector_steps", "collector_width", "finetune_steps", "td_refresh"):
            if getattr(cfg, name) < 1:
                raise UserError(f"{flag_name(name)} must be >= 1 (got {getattr(cfg, name)})")
        for name in ("inner_lr_init", "adv_coef_init", "outer_policy_lr", "outer_value_lr",
                     "outer_log_lr_lr", "action_sigma", "collector_lr"):
            if not getattr(cfg, name) > 0:
                raise UserError(f"{flag_name(name)} must be > 0 (got {getattr(cfg, name)})")
        if not 0 < cfg.discount <= 1 or not 0 <= cfg.target_vf_alpha <= 1 or cfg.adv_clip <= 1:
            raise UserError("need 0 < --discount <= 1, 0 <= --target-vf-alpha <= 1 and --adv-clip > 1")
        batch = max(cfg.inner_batch, cfg.outer_batch, cfg.eval_batch)
        kept = cfg.collector_steps // cfg.buffer_skip  # rows per task
        if batch > kept:
            raise UserError(f"a batch of {batch} exceeds a task's {kept} transitions (--collector-steps, "
                            f"--buffer-skip); lower the batch sizes")
        try:
            torch.empty(0, device=cfg.device)
        except (RuntimeError, ValueError) as e:
            reason = str(e).splitlines()[0]
            raise UserError(f"--device {cfg.device} is not usable here ({reason}); try --device cpu") from None
        return cfg


METHODS = ("macaw", "meta-bc", "mt-awr")


def default_run_name(cfg):
    return f"{cfg.env}-seed{cfg.seed}" if cfg.method == "macaw" else f"{cfg.env}-{cfg.method}-seed{cfg.seed}"


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def parse_config(argv=None, config=Config, description="MACAW: offline meta-RL with advantage weighting", hide=()):
    """The CLI from `config`'s fields: --field-name, or --no-field for booleans on by default; hide: fields left out."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config):
        flag = flag_name(f.name)
        if f.name in hide:
            continue  # (it keeps its default)
        if f.type is bool or f.type == "bool":
            if f.default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                    help=f"turns off, on by default: {f.metadata['help']}")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                                help=f.metadata["help"] + f" (default {f.default})")
    return config(**vars(parser.parse_args(argv)))


# ================================================================================================
# 2. Tasks. A benchmark = an env whose reward depends on a task parameter + train/test task lists.
#    Adding one: write its env (with set_task), add a Benchmark entry to BENCHMARKS.
# ================================================================================================
def mujoco_warning(message):
    """MuJoCo's warnings to stderr (not to a MUJOCO_LOG.TXT), except MuJoCo 4's 'settotalmass' deprecation
    warning, printed for every HalfCheetah built from gymnasium's half_cheetah.xml (which still works)."""
    if "settotalmass" not in message:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def mujoco_warnings():
    """mujoco_warning as MuJoCo's (process-wide) warning handler while a run or data worker lasts, then the old one."""
    previous = mujoco.get_mju_user_warning() if mujoco else None
    if mujoco:
        mujoco.set_mju_user_warning(mujoco_warning)
    try:
        yield
    finally:
        if mujoco:
            mujoco.set_mju_user_warning(previous)


class TaskEnv(gym.Wrapper):
    """A gymnasium v5 MuJoCo env with 200-step episodes whose reward (or dynamics) depends on a task
    parameter set by set_task. Subclasses say which env, and how the task enters."""

    env_id, env_kwargs = "", {}

    def __init__(self):
        super().__init__(gym.make(self.env_id, max_episode_steps=200, **self.env_kwargs))
        self.task = None

    def set_task(self, task):
        self.task = float(task)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, self.task_reward(reward, info, action), terminated, truncated, info

    def task_reward(self, reward, info, action):
        return reward


class CheetahDir(TaskEnv):
    """HalfCheetah-v5, reward d * v_x - 0.05 * ||a||^2 for direction d in {-1, +1}.

    gymnasium's observation is 17-d (qpos[1:], qvel); the authors' was 20-d (plus the torso COM)."""

    env_id = "HalfCheetah-v5"

    def task_reward(self, reward, info, action):
        return self.task * info["x_velocity"] - 0.05 * float(np.sum(np.square(action)))


class CheetahVel(TaskEnv):
    """HalfCheetah-v5, reward -|v_x - v*| - 0.05 * ||a||^2 for a target speed v*."""

    env_id = "HalfCheetah-v5"

    def task_reward(self, reward, info, action):
        return -abs(info["x_velocity"] - self.task) - 0.05 * float(np.sum(np.square(action)))


class AntDir(TaskEnv):
    """Ant-v5 with the 27-d observation (no contact forces), reward v_xy . (cos g, sin g) - 0.5 ||a||^2
    - contact cost + 1 (while healthy) for a direction angle g. A fall (torso height outside
    [0.2, 1.0]) ends the episode: a true termination, not a time limit."""

    env_id, env_kwargs = "Ant-v5", dict(include_cfrc_ext_in_observation=False)

    def task_reward(self, reward, info, action):
        forward = info["x_velocity"] * math.cos(self.task) + info["y_velocity"] * math.sin(self.task)
        return forward + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]


class WalkerParams(TaskEnv):
    """Walker2d-v5 (reward v_x + 1 - 1e-3 ||a||^2; a fall ends the episode) whose physics differ per
    task: every body mass, inertia and geom friction entry is scaled by 1.5^U(-3,3), every joint damping
    by 1.3^U(-3,3) (the authors' rand_param_envs), drawn from a fixed seed and k. MuJoCo keeps these values
    across reset(), so set_task writes them from the originals, never on top of the previous task's."""

    env_id = "Walker2d-v5"
    PHYSICS = {"body_mass": 1.5, "body_inertia": 1.5, "geom_friction": 1.5, "dof_damping": 1.3}

    def __init__(self):
        super().__init__()
        self.original = {name: getattr(self.unwrapped.model, name).copy() for name in self.PHYSICS}

    def set_task(self, task):
        super().set_task(task)
        rng = np.random.default_rng([WALKER_SEED, int(task)])
        for name, base in self.PHYSICS.items():
            scale = base ** rng.uniform(-3, 3, self.original[name].shape)
            getattr(self.unwrapped.model, name)[:] = self.original[name] * scale


class PointRobot(gym.Env):
    """A 2-D point starting at the origin; goal on the upper half unit circle; reward -||p - goal||.

    Actions are clipped to [-0.1, 0.1]^2, episodes last 20 steps. Pure numpy: for tests and the tutorial.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-0.1, 0.1, (2,), np.float32)

    def __init__(self):
        self.goal = np.array([1.0, 0.0])
        self.pos = np.zeros(2)
        self.t = 0

    def set_task(self, angle):
        self.goal = np.array([np.cos(angle), np.sin(angle)])

    def expert(self, obs):  # the data collector's controller: straight to the goal
        return np.clip(self.goal - obs, -0.1, 0.1)

    def reset(self, seed=None, options=None):
        self.pos, self.t = np.zeros(2), 0
        return self.pos.astype(np.float32), {}

    def step(self, action):
        self.pos = self.pos + np.clip(action, -0.1, 0.1)
        self.t += 1
        reward = -float(np.linalg.norm(self.pos - self.goal))
        return self.pos.astype(np.float32), reward, False, self.t >= 20, {}


# Meta-World ML45, optional (pip install --no-deps -r requirements-ml45.txt). As the authors' ML45Env: one task per
# class, the 45 training classes as training tasks and the 5 test classes held out, 150-step episodes, and the goal
# in the observation (Meta-World's own ML45 zeroes those 3 numbers: docs/differences.md). Task k is class
# ML45_CLASSES[k] (Meta-World's order), its one goal drawn once from a fixed seed.
ML45_CLASSES = tuple(f"{name}-v3" for name in """assembly basketball button-press-topdown button-press-topdown-wall
    button-press button-press-wall coffee-button coffee-pull coffee-push dial-turn disassemble door-close door-open
    drawer-close drawer-open faucet-open faucet-close hammer handle-press-side handle-press handle-pull-side
    handle-pull lever-pull pick-place-wall pick-out-of-hole push-back pick-place plate-slide plate-slide-side
    plate-slide-back plate-slide-back-side peg-insert-side peg-unplug-side soccer stick-push stick-pull push-wall
    push reach-wall reach shelf-place sweep-into sweep window-open window-close
    bin-picking box-close hand-insert door-lock door-unlock""".split())
ML45_SEED = 45  # task k's goal is drawn with the env seeded by ML45_SEED * 1000 + k


def import_metaworld():
    """The metaworld package, with the MuJoCo 4 shim below in place; one line naming the install if missing."""
    try:
        import metaworld.env_dict
        import metaworld.policies
        import metaworld.sawyer_xyz_env
    except ImportError:
        raise UserError("--env ml45 needs Meta-World: pip install --no-deps -r requirements-ml45.txt") from None
    metaworld.sawyer_xyz_env.SawyerMocapBase.reset_mocap_welds = reset_mocap_welds_mujoco4
    warnings.filterwarnings("ignore", r"Constant\(s\) may be too high")  # (the scripted policies' own warning)
    return metaworld


def reset_mocap_welds_mujoco4(self):
    """Meta-World 3.1.1's reset_mocap_welds, for MuJoCo 4. Meta-World pins MuJoCo 3.3.0, where a weld's data row has
    11 numbers; MuJoCo 4 added a 12th, and Meta-World's 11-number write then fails. Same 11 numbers (anchor 0,
    relative pose 0 with quaternion (-1, 0, 0, 0), torque scale 5) into the first 11 fields; the 12th keeps its
    compiled value. test_the_metaworld_weld_shim_still_matches_metaworld checks the original is still this."""
    if self.model.nmocap > 0 and self.model.eq_data is not None:
        for i in np.flatnonzero(self.model.eq_type == mujoco.mjtEq.mjEQ_WELD):
            self.model.eq_data[i, :11] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0]


class ML45Env(gym.Env):
    """One Meta-World ML45 class per task, set by set_task(k). Observation 39-d (hand, gripper, objects, their
    previous values, goal), action 4-d (hand motion, gripper), reward in [0, 10] per step. `successes` gets
    Meta-World's success flag of every finished episode (did it succeed at any step); `expert` is the class's
    scripted policy, which the data collector uses (section 8)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (39,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

    def __init__(self):
        self.env, self.policy, self.successes, self.success = None, None, [], False

    def set_task(self, task):
        metaworld, k = import_metaworld(), int(task)
        name = ML45_CLASSES[k]
        split = "train" if name in metaworld.env_dict.ML45_V3["train"] else "test"
        self.env = env = metaworld.env_dict.ML45_V3[split][name]()
        # the goal (object and target positions), drawn as Meta-World draws its tasks' (reset() with the positions
        # unfrozen: some classes redraw until they are far enough apart), from this class's seed
        env._freeze_rand_vec, env.seeded_rand_vec, env._set_task_called = False, True, True
        env.seed(ML45_SEED * 1000 + k)
        env.reset()
        goal = env._last_rand_vec
        kwargs = {key: v for key, v in metaworld.env_dict.ML45_ARGS_KWARGS[split][name]["kwargs"].items()
                  if key != "task_id"}
        data = dict(kwargs, rand_vec=goal, env_cls=type(env), partially_observable=False)  # the goal visible
        env.set_task(metaworld.Task(env_name=name, data=pickle.dumps(data)))
        env.max_path_length = 150
        self.policy = metaworld.policies.ENV_POLICY_MAP[name]()

    def reset(self, seed=None, options=None):  # (Meta-World's reset ignores the seed: one goal, one start)
        self.success = False
        return self.env.reset()

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.success = self.success or bool(info["success"])
        if terminated or truncated:
            self.successes.append(self.success)
        return obs, float(reward), terminated, truncated, info

    def expert(self, obs):
        return self.policy.get_action(obs)


SAC_LR = 3e-4  # the SAC collectors' Adam learning rate (Haarnoja et al. 2018), unless a benchmark sets collector_lr


@dataclass(frozen=True)
class Benchmark:
    name: str
    make_env: type
    tasks: tuple  # task parameter of every task (train and test)
    train_ids: tuple
    test_ids: tuple
    collector: str  # "sac" (a from-scratch agent's replay buffer) or "scripted" (annealed noise)
    defaults: dict  # steps, eval_every, collector_steps, collector_width (and collector_design, collector_lr
    #                 where they differ from per-task and 3e-4)

    def __post_init__(self):
        self.defaults.setdefault("collector_design", "per-task")  # so every benchmark names its design
        self.defaults.setdefault("collector_lr", SAC_LR)


def _point_goals(n=25, n_test=5):
    angles = np.random.default_rng(0).uniform(0, np.pi, n)
    return tuple(angles.tolist()), tuple(range(n - n_test)), tuple(range(n - n_test, n))


def _split(tasks, test_ids):
    """Task parameters + (train ids, test ids); the held-out ids are the authors' (their config files)."""
    return tuple(float(t) for t in tasks), tuple(k for k in range(len(tasks)) if k not in test_ids), test_ids


WALKER_SEED = 2021  # walker-params: task k's physics are drawn from np.random.default_rng([WALKER_SEED, k])

BENCHMARKS = {
    # Official split: 2 tasks, test tasks = train tasks. One task-conditioned SAC agent for both directions at
    # learning rate 1e-3, 180k steps: data about as strong on average as two per-direction agents' at 3e-4 and
    # 300k steps (forward stronger, backward weaker), for about a third of the CPU time (docs/data.md).
    "cheetah-dir": Benchmark("cheetah-dir", CheetahDir, (1.0, -1.0), (0, 1), (0, 1), "sac",
                             dict(steps=15_000, eval_every=500, collector_steps=180_000, collector_width=128,
                                  collector_lr=1e-3, collector_design="shared")),
    # 40 target speeds evenly spaced in [0.075, 3] (the authors'), 5 held out. One shared task-conditioned
    # agent per worker: far stronger data than per-task agents for half the CPU (docs/speed.md).
    "cheetah-vel": Benchmark("cheetah-vel", CheetahVel, *_split(np.linspace(0.075, 3, 40), (2, 7, 15, 23, 26)),
                             "sac", dict(steps=15_000, eval_every=1000, collector_steps=40_000, collector_width=256,
                                         collector_design="shared")),
    # 50 direction angles drawn uniformly from [0, 2 pi) with a fixed seed, 5 held out. Per-task agents at
    # learning rate 1e-3, 55k steps: the choices that gave walking collectors in the CPU budget (docs/data.md).
    "ant-dir": Benchmark("ant-dir", AntDir,
                         *_split(np.random.default_rng(0).uniform(0, 2 * np.pi, 50), (6, 17, 23, 30, 41)),
                         "sac", dict(steps=15_000, eval_every=1000, collector_steps=55_000, collector_width=64,
                                     collector_lr=1e-3)),
    # 50 physics draws (the task parameter is k; see WalkerParams), 5 held out.
    "walker-params": Benchmark("walker-params", WalkerParams, *_split(np.arange(50), (2, 12, 15, 39, 43)),
                               "sac", dict(steps=15_000, eval_every=1000, collector_steps=40_000,
                                           collector_width=64)),
    # 20 training goals, 5 held-out goals.
    "point-robot": Benchmark("point-robot", PointRobot, *_point_goals(), "scripted",
                             dict(steps=400, eval_every=100, collector_steps=2_000, collector_width=128)),
    # Meta-World ML45 (see ML45Env): classes 0-44 train, 45-49 held out; scripted policies with noise make the data.
    "ml45": Benchmark("ml45", ML45Env, tuple(range(50)), tuple(range(45)), tuple(range(45, 50)), "scripted",
                      dict(steps=15_000, eval_every=1000, collector_steps=20_000, collector_width=128)),
}


def get_benchmark(name):
    if name not in BENCHMARKS:
        raise UserError(f"unknown env '{name}'; valid envs: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def make_task_env(bench, task_id):
    with mujoco_warnings():  # (building a HalfCheetah warns under MuJoCo 4; see mujoco_warning)
        env = bench.make_env()
        env.set_task(bench.tasks[task_id])
    return env


def rollout(env, act, seed):
    """Return of one episode; act maps an observation (np array) to an action (np array)."""
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action = np.clip(act(obs), env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        done = terminated or truncated
    return total


def random_policy_return(env, seed, episodes=10):
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    return float(np.mean([rollout(env, lambda o: rng.uniform(low, high), seed + i) for i in range(episodes)]))



# ================================================================================================
# 3. The offline data, as MACAW reads them: one validated .npz per task, Monte-Carlo targets,
#    the inner (contiguous) and outer (random) batch samplers. How the files are made: section 8.
# ================================================================================================
def task_data_path(cfg, task_id):
    """Where task k's data are: its .npz file, or with --data-source minari its Minari data set (section 8)."""
    if cfg.data_source == "minari":
        return f"{MINARI}{minari_id(cfg.env, task_id)}"
    return Path(cfg.data_dir) / cfg.env / f"task{task_id}.npz"


DATA_KEYS = {"observations": "obs", "actions": "act", "rewards": None, "next_observations": "obs",
             "terminations": None, "truncations": None}


def load_task_data(path, bench, task_id, cfg=None):
    """Load one task's .npz and check it; any problem -> UserError naming the file and the fix.
    With a cfg, the file must also come from the collector it asks for (--collector-steps, -width, -lr)."""
    minari = str(path).startswith(MINARI)
    fix = "export it again (--export-minari)" if minari else f"delete {path} or pass --regenerate-data"
    try:
        if minari:
            data = read_minari(str(path)[len(MINARI):])
        else:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); {fix}") from None
    missing = [k for k in (*DATA_KEYS, "env", "task", "format_version", "collector_return", "random_return")
               if k not in data]
    if missing:
        raise UserError(f"{path} lacks keys {missing}; {fix}")
    if int(data["format_version"]) != DATA_FORMAT_VERSION or str(data["env"]) != bench.name:
        raise UserError(f"{path} was made for env {data['env']} format {data['format_version']}, "
                        f"need {bench.name} format {DATA_FORMAT_VERSION}; {fix}")
    if not np.isclose(float(data["task"]), bench.tasks[task_id]):
        raise UserError(f"{path} holds task {float(data['task'])}, expected {bench.tasks[task_id]}; {fix}")
    env = make_task_env(bench, task_id)
    dims = {"obs": env.observation_space.shape[0], "act": env.action_space.shape[0]}
    n = len(data["rewards"])
    for key, kind in DATA_KEYS.items():
        shape = (n, dims[kind]) if kind else (n,)
        if data[key].shape != shape:
            raise UserError(f"{path}: {key} has shape {data[key].shape}, expected {shape}; {fix}")
        if not np.all(np.isfinite(data[key])):
            raise UserError(f"{path}: {key} holds NaN or inf; {fix}")
    if n < 2 or not (data["terminations"][-1] or data["truncations"][-1]):
        raise UserError(f"{path}: the data must end with a finished episode; {fix}")
    if cfg is not None:  # the collector that made the file must be the one this run asks for
        sac = "collector_width" in data

        def collector(steps, width, shared, lr):
            return f"{steps} steps" + (f" of a width-{int(width)} {'shared ' if shared else ''}SAC at lr {float(lr):g}"
                                       if sac else "")
        made = collector(n, data.get("collector_width"), data.get("collector_shared", False),
                         data.get("collector_lr", SAC_LR))  # files made before --collector-lr: all at 3e-4
        wanted = collector(cfg.collector_steps, cfg.collector_width, cfg.collector_design == "shared", cfg.collector_lr)
        if made != wanted:
            raise UserError(f"{path} holds {made}, this run asks for {wanted} (--collector-steps, --collector-width, "
                            f"--collector-design, --collector-lr); pass the flags that match the file, or "
                            f"--regenerate-data")
    return data


def monte_carlo_targets(rewards, next_obs, episode_ends, discount, terminations=None):
    """Per step t of an episode ending at H: mc_return_t = sum_{k=t}^{H-1} gamma^(k-t) r_k,
    terminal_obs_t = s_H (the last next-observation), terminal_discount_t = gamma^(H-t), the weight of the
    bootstrap V(s_H) in the value target: right after a time limit, wrong after a fall (nothing follows it),
    so an episode whose last step has terminations set gets 0; terminations=None bootstraps every episode
    (the authors' code, --bootstrap-terminations)."""
    n = len(rewards)
    mc_return = np.zeros(n, np.float64)
    terminal_obs = np.zeros_like(next_obs)
    terminal_discount = np.zeros(n, np.float64)
    running, end = 0.0, None
    for t in reversed(range(n)):  # sweep backwards, restarting at every episode end
        if episode_ends[t]:
            fell = terminations is not None and terminations[t]
            running, end, disc = 0.0, t, 0.0 if fell else 1.0
        running = rewards[t] + discount * running
        disc *= discount
        mc_return[t], terminal_obs[t], terminal_discount[t] = running, next_obs[end], disc
    return mc_return.astype(np.float32), terminal_obs, terminal_discount.astype(np.float32)


BATCH_FIELDS = ("obs", "actions", "mc_return", "terminal_obs", "terminal_discount")


class TaskData:
    """One task's offline transitions as tensors, with the MACAW batch samplers.

    code: a vector appended to every observation (mt-awr's one-hot task id, see task_code); none by default."""

    def __init__(self, data, cfg, code=None):
        ends = np.logical_or(data["terminations"], data["truncations"])
        fell = None if cfg.bootstrap_terminations else data["terminations"]
        mc, term_obs, term_disc = monte_carlo_targets(data["rewards"], data["next_observations"], ends, cfg.discount,
                                                      fell)
        self.keep = slice(None, None, cfg.buffer_skip)  # targets first (from whole episodes), then subsample, as theirs
        self.code = np.zeros(0, np.float32) if code is None else np.asarray(code, np.float32)
        with_code = lambda obs: np.concatenate([obs, np.broadcast_to(self.code, (len(obs), len(self.code)))], 1)
        arrays = (with_code(data["observations"]), data["actions"], mc, with_code(term_obs), term_disc)
        self.tensors = {k: torch.as_tensor(a[self.keep], device=cfg.device) for k, a in zip(BATCH_FIELDS, arrays)}
        if cfg.value_target == "td-lambda":  # every stored step, for refresh_lambda_returns
            no_fall = np.ones(len(ends)) if fell is None else 1.0 - np.asarray(fell, np.float64)
            self.episodes = dict(rewards=data["rewards"], ends=ends, end_discounts=no_fall,
                                 next_obs=torch.as_tensor(with_code(data["next_observations"]), device=cfg.device))
        self.size = len(self.tensors["obs"])
        self.collector_return = float(data["collector_return"])
        self.random_return = float(data["random_return"])

    def contiguous_batch(self, n, gen):
        """Inner batch: n consecutive rows (a slice of a few trajectories), as the authors sample it."""
        start = int(torch.randint(0, self.size - n + 1, (), generator=gen))
        return {k: v[start:start + n] for k, v in self.tensors.items()}

    def random_batch(self, n, gen):
        """Outer batch (and the test-time adaptation batch): n distinct random rows."""
        idx = torch.randperm(self.size, generator=gen)[:n].to(self.tensors["obs"].device)
        return {k: v[idx] for k, v in self.tensors.items()}


def task_code(cfg, bench, k):
    """What mt-awr appends to task k's observations: a one-hot id over the benchmark's tasks for a
    training task, zeros for a held-out one (the agent never saw its id). The meta-learners get none."""
    if cfg.method != "mt-awr":
        return None
    return np.eye(len(bench.tasks), dtype=np.float32)[k] * (k in bench.train_ids)


def load_benchmark_data(cfg, bench, stop=()):
    """Every task's TaskData; makes the files first if they are missing (ensure_data, section 8)."""
    if cfg.data_source == "npz":
        ensure_data(cfg, bench, stop)
    tasks = [TaskData(load_task_data(task_data_path(cfg, k), bench, k, cfg), cfg, task_code(cfg, bench, k))
             for k in range(len(bench.tasks))]
    need = max(cfg.inner_batch, cfg.outer_batch, cfg.eval_batch)
    small = [k for k, t in enumerate(tasks) if t.size < need]
    if small:
        raise UserError(f"tasks {small} have {tasks[small[0]].size} transitions (after --buffer-skip "
                        f"{cfg.buffer_skip}), fewer than a batch of {need}; lower the batch or the skip")
    return tasks


# ================================================================================================
# 4. Networks. Every linear layer is a weight-transform layer (WLinear) unless --no-weight-transform.
# ================================================================================================
class WLinear(nn.Module):
    """y = x Omega + b, where omega = T z + c is generated from a learned latent z and split into the layer's
    matrix Omega and bias b (the paper's weight transform; T and c are the transform's weight and bias).

    With G = dL/domega (the plain layer's gradient as one vector), dL/dT = G z^T, dL/dz = T^T G and dL/dc = G,
    so one SGD step on (z, T, c) moves omega by  -(alpha_T |z|^2 + alpha_c) G - alpha_z T T^T G  (to first order): the
    plain direction, rescaled, plus the gradient mixed through T T^T. T is meta-learned, so meta-training
    shapes which weight changes one step from a few examples makes: a learned preconditioner (the paper's
    "expressivity of the MAML update"; the tutorial's section 3 shows it is not about rank).
    """

    def __init__(self, in_features, out_features, latent_dim=100):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.z = nn.Parameter(torch.randn(latent_dim) / out_features)  # N(0, (1/out)^2), as the authors
        self.fc = nn.Linear(latent_dim, in_features * out_features + out_features)  # T (weight) and c (bias)

    def forward(self, x):
        omega = self.fc(self.z)  # (in*out + out,)
        n = self.in_features * self.out_features
        weight = omega[:n].view(self.in_features, self.out_features)  # row-major: Omega[i, j] = omega[i*out + j]
        return x @ weight + omega[n:]  # (B, out)


def make_layer(in_features, out_features, cfg):
    if cfg.weight_transform:
        return WLinear(in_features, out_features, cfg.latent_dim)
    return nn.Linear(in_features, out_features)


def layer_stack(sizes, cfg):
    return nn.Sequential(OrderedDict((f"fc_{i}", make_layer(sizes[i], sizes[i + 1], cfg))
                                     for i in range(len(sizes) - 1)))


class ValueNet(nn.Module):
    """V(s): obs -> width x depth (ReLU) -> 1."""

    def __init__(self, obs_dim, cfg):
        super().__init__()
        self.seq = layer_stack([obs_dim] + [cfg.net_width] * cfg.net_depth + [1], cfg)

    def forward(self, obs):
        x = obs
        for i, layer in enumerate(self.seq):
            x = layer(x) if i == len(self.seq) - 1 else F.relu(layer(x))
        return x.squeeze(-1)  # (B,)


class PolicyNet(nn.Module):
    """mu(s) = tanh(MLP(s)); given dataset actions too, also the advantage head's A_hat(s, a) =
    fc_1(ReLU(fc_0(ReLU([h, a])))), h the last hidden layer BEFORE its ReLU. Its loss is in the inner step
    only; the outer loss never reads it, and it is meta-trained through the second-order path. The ReLU
    on [h, a] zeroes negative action components: the authors' code does so, kept on purpose."""

    def __init__(self, obs_dim, act_dim, cfg):
        super().__init__()
        self.seq = layer_stack([obs_dim] + [cfg.net_width] * cfg.net_depth + [act_dim], cfg)
        if cfg.adv_head:
            self.head_seq = layer_stack([cfg.net_width + act_dim, cfg.adv_head_width, 1], cfg)

    def forward(self, obs, actions=None):
        x = obs
        for layer in self.seq[:-1]:
            h = layer(x)  # pre-activation of the last hidden layer after the loop
            x = F.relu(h)
        mu = torch.tanh(self.seq[-1](x))  # (B, act)
        if actions is None:
            return mu
        head_in = F.relu(torch.cat([h, actions], -1))
        adv = self.head_seq.fc_1(F.relu(self.head_seq.fc_0(head_in))).squeeze(-1)  # (B,)
        return mu, adv


class MACAW(nn.Module):
    """All meta-parameters: value weights phi, policy weights theta, and the unconstrained ("raw")
    parameters behind the positive quantities, as in the Key Equations:
        raw_value_lrs[j]  = l_j  -> step size alpha_j = softplus(l_j) of the j-th value tensor
        raw_policy_lrs[j] = l_j  -> step size alpha_j = softplus(l_j) of the j-th policy tensor
        raw_adv_coef      = lambda -> advantage-head loss weight softplus(lambda)
    Softplus keeps them positive. They are initialised at log(x) as the authors do, so that
    softplus(log 1e-3) = 9.995e-4 ~ inner_lr_init and softplus(log 0.01) = 0.00995 ~ adv_coef_init.
    """

    def __init__(self, obs_dim, act_dim, cfg):
        super().__init__()
        self.value = ValueNet(obs_dim, cfg)
        self.policy = PolicyNet(obs_dim, act_dim, cfg)
        init = math.log(cfg.inner_lr_init)
        self.raw_value_lrs = nn.Parameter(torch.full((len(list(self.value.parameters())),), init))
        self.raw_policy_lrs = nn.Parameter(torch.full((len(list(self.policy.parameters())),), init))
        self.raw_adv_coef = nn.Parameter(torch.tensor(math.log(cfg.adv_coef_init)))

    def params(self):
        """The value and policy weights as dicts name -> tensor, in parameter (= step size) order."""
        return dict(self.value.named_parameters()), dict(self.policy.named_parameters())


# ================================================================================================
# 5. Losses. `batch` is a dict of tensors: obs (B, obs), actions (B, act), mc_return (B,),
#    terminal_obs (B, obs), terminal_discount (B,). Params are dicts: torch.func style.
# ================================================================================================
def value_loss(value, vparams, batch, target):
    """Mean squared error of V(s) against a target (B,): equations (1) and (5)."""
    return (functional_call(value, vparams, (batch["obs"],)) - target).pow(2).mean()


def bootstrapped_return(value, vparams, batch):
    """mc_return + gamma^(H-t) V(s_H): the Monte-Carlo return with the tail bootstrapped. (B,)"""
    return batch["mc_return"] + batch["terminal_discount"] * functional_call(value, vparams, (batch["terminal_obs"],))


def advantages(value, vparams, batch):
    """Equation (2): A(s, a) = mc_return + gamma^(H-t) V(s_H) - V(s), never differentiated: in the policy
    losses it is a constant weight. V(s) and V(s_H) in one call, over both batches of states. (B,)"""
    vparams = {k: v.detach() for k, v in vparams.items()}
    v_s, v_end = functional_call(value, vparams, (torch.cat([batch["obs"], batch["terminal_obs"]]),)).chunk(2)
    return batch["mc_return"] + batch["terminal_discount"] * v_end - v_s


def lambda_returns(rewards, next_values, ends, end_discounts, discount, lam):
    """--value-target td-lambda: the TD(lambda) value target of every stored step, backwards over each episode,
        G_t = r_t + gamma ((1 - lam) V(s_t+1) + lam G_t+1),   at an episode's last step G = r + gamma d V(s_H),
    d = 1 after a time limit and 0 after a fall, as in (5). lam = 1 gives (5)'s bootstrapped Monte-Carlo target,
    lam = 0 the one-step TD target r + gamma V(s'). All (N,) numpy arrays (V: the target value function)."""
    out = np.zeros(len(rewards), np.float64)
    for t in reversed(range(len(rewards))):
        follow = end_discounts[t] * next_values[t] if ends[t] else (1 - lam) * next_values[t] + lam * out[t + 1]
        out[t] = rewards[t] + discount * follow
    return out


def awr_weights(adv, adv_clip):
    """Equation (3): w = exp(min(A_n, log clip)), A_n = (A - mean A) / std A (unbiased std, temperature 1)."""
    normalised = (adv - adv.mean()) / adv.std()
    return torch.exp(torch.clamp(normalised, max=math.log(adv_clip)))


def gaussian_log_prob(mu, actions, sigma):
    """log N(a; mu, sigma^2 I), summed over action dimensions. (B,)"""
    return (-0.5 * ((actions - mu) / sigma).pow(2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def awr_policy_loss(policy, pparams, batch, adv, cfg):
    """AWR (Peng et al. 2019): mean[-w * log pi(a|s)], the outer policy loss (6)."""
    mu = functional_call(policy, pparams, (batch["obs"],))
    return (-awr_weights(adv, cfg.adv_clip) * gaussian_log_prob(mu, batch["actions"], cfg.action_sigma)).mean()  # (3)


def bc_loss(policy, pparams, batch, cfg):
    """Behaviour cloning, Meta-BC's loss in both loops: mean[-log pi(a|s)], i.e. AWR with every weight 1."""
    mu = functional_call(policy, pparams, (batch["obs"],))
    return -gaussian_log_prob(mu, batch["actions"], cfg.action_sigma).mean()


def inner_policy_loss(policy, pparams, raw_adv_coef, batch, adv, cfg):
    """Equation (4): mean[-w * log pi(a|s) + softplus(lambda) * (A_hat(s, a) - A)^2], lambda = raw_adv_coef;
    the head regresses the unnormalised A. Returns (loss, head term)."""
    if not cfg.adv_head:
        return awr_policy_loss(policy, pparams, batch, adv, cfg), torch.zeros(())
    mu, adv_hat = functional_call(policy, pparams, (batch["obs"], batch["actions"]))
    awr = -awr_weights(adv, cfg.adv_clip) * gaussian_log_prob(mu, batch["actions"], cfg.action_sigma)  # (3)
    head = F.softplus(raw_adv_coef) * (adv_hat - adv).pow(2)
    return (awr + head).mean(), head.mean()


# ================================================================================================
# 6. Inner and outer loops (Algorithm 1 in the module docstring). The (1)-(6) markers are the Key
#    Equations, and they run in that order: `adapt` does (1)-(4) on the inner batch, then
#    `outer_losses` does (5) and (6) on the outer batch, recomputing (2)-(3) there with phi'. This is the
#    form to read; a default run takes section 10's faster forms of it, --plain this section as written.
# ================================================================================================
def sgd_step(params, grads, raw_lrs, fraction=1.0):
    """One inner step, each tensor with its own learned step size: p' = p - softplus(l_j) * g_j.
    fraction < 1 stops part-way: with fraction 1 - rho it gives the target mix phibar of (5)."""
    alphas = fraction * F.softplus(raw_lrs)  # alpha_j of every tensor j, in parameter order
    return {k: p - a * grads[k] for (k, p), a in zip(params.items(), alphas)}


def adapt(model, vparams, pparams, inner, cfg):
    """MACAW's inner loop on one task's inner batch: one value step, then one policy step.

    Differentiable (torch.func.grad keeps the graph), so the outer loss can reach the meta-params
    through the adapted params: the full second-order MAML gradient. Returns the adapted value params
    phi', the adapted policy params theta', the target mix phibar of (5) and the inner losses.
    """
    if cfg.method == "meta-bc":  # no rewards: no value step, and the policy step clones the batch's actions
        def bc_step_loss(p):
            loss = bc_loss(model.policy, p, inner, cfg)
            return loss, loss.detach()
        p_grads, inner_pi = grad(bc_step_loss, has_aux=True)(pparams)
        return vparams, sgd_step(pparams, p_grads, model.raw_policy_lrs), vparams, dict(inner_policy=inner_pi)

    def value_step_loss(p):  # (1) L_V = mean (V_phi(s) - mc_return)^2: plain Monte-Carlo regression
        loss = value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()

    v_grads, inner_v = grad(value_step_loss, has_aux=True)(vparams)
    adapted_v = sgd_step(vparams, v_grads, model.raw_value_lrs)  # phi' = phi - alpha_V * grad
    # phibar = rho phi + (1 - rho) phi' = phi - (1 - rho) alpha_V * grad: fresh, gradient-free (no target network)
    target_v = {k: p.detach() for k, p in sgd_step(vparams, v_grads, model.raw_value_lrs,
                                                   1 - cfg.target_vf_alpha).items()}
    adv = advantages(model.value, adapted_v, inner)  # (2) from the ADAPTED value function, no gradient

    def policy_step_loss(p):  # (4) AWR with weights (3) + softplus(lambda) * advantage-head regression
        loss, head = inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())

    p_grads, (inner_pi, head) = grad(policy_step_loss, has_aux=True)(pparams)
    adapted_p = sgd_step(pparams, p_grads, model.raw_policy_lrs)  # theta' = theta - alpha_pi * grad
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


def outer_losses(model, adapted_v, adapted_p, target_v, outer, cfg):
    """(5) and (6) on the outer batch, at the adapted params: the terms of the meta-objective."""
    if cfg.method == "meta-bc":  # the adapted policy clones the outer batch; no value function
        return dict(outer_value=torch.zeros(()), outer_policy=bc_loss(model.policy, adapted_p, outer, cfg))
    # (5) Outer value loss at phi' against mc_return + gamma^(H-t) V_phibar(s_H) (--value-target td-lambda: the
    # lambda-returns of refresh_lambda_returns; the inner step (1) keeps its Monte-Carlo target either way).
    if cfg.value_target == "td-lambda":
        target = outer["lambda_return"]
    else:
        target = bootstrapped_return(model.value, target_v, outer).detach()
    outer_v = value_loss(model.value, adapted_v, outer, target)
    # (6) Outer policy loss: plain AWR at theta' on the outer batch, (2)-(3) from phi'; no head term.
    adv = advantages(model.value, adapted_v, outer)
    return dict(outer_value=outer_v, outer_policy=awr_policy_loss(model.policy, adapted_p, outer, adv, cfg))


def task_meta_losses(model, vparams, pparams, inner, outer, cfg):
    """One task: adapt on its inner batch, then its outer losses. Returns a dict of scalars: outer_value and
    outer_policy carry gradients, the inner losses are for logging."""
    adapted_v, adapted_p, target_v, stats = adapt(model, vparams, pparams, inner, cfg)
    return dict(**outer_losses(model, adapted_v, adapted_p, target_v, outer, cfg), **stats)


def meta_losses(model, batches, cfg):
    """Per-task losses of a meta-batch, each (tasks,). batches: list of (inner, outer) dicts, one per task."""
    vparams, pparams = model.params()
    if cfg.method == "mt-awr":  # no inner loop: plain AWR on each task's outer batch
        losses = [multitask_losses(model, vparams, pparams, outer, cfg) for _, outer in batches]
    else:
        losses = [task_meta_losses(model, vparams, pparams, inner, outer, cfg) for inner, outer in batches]
    return {k: torch.stack([l[k] for l in losses]) for k in losses[0]}


# The multi-task baseline (--method mt-awr; Meta-BC is the meta-bc branches above). One value function
# and one policy over all training tasks, each observation carrying its task's one-hot id (task_code), trained
# with the same losses as MACAW's outer loop but without any inner step; at test time a held-out task's id is
# zeros, and the weights are fine-tuned on the test batch with a few Adam steps.
def multitask_losses(model, vparams, pparams, batch, cfg):
    """One task's MT-AWR losses: V regresses R_t + gamma^(H-t) V(s_H) (the tail from V itself, no gradient
    through it; --value-target td-lambda: the batch's lambda-returns, which only the online fine-tuning study
    gives), the policy takes plain AWR (3) with advantages (2) from V."""
    target = (batch["lambda_return"] if cfg.value_target == "td-lambda"
              else bootstrapped_return(model.value, {k: v.detach() for k, v in vparams.items()}, batch).detach())
    adv = advantages(model.value, vparams, batch)
    return dict(outer_value=value_loss(model.value, vparams, batch, target),
                outer_policy=awr_policy_loss(model.policy, pparams, batch, adv, cfg))


def finetune(model, batch, cfg, params=None):
    """MT-AWR's test-time adaptation: --finetune-steps Adam steps of multitask_losses on the test batch (at the
    outer learning rates), from copies of the weights or of params = (value, policy) dicts. Returns the
    fine-tuned (value, policy). (The test-time studies continue MACAW and Meta-BC this way, Meta-BC by bc_loss.)"""
    params = model.params() if params is None else params
    vparams, pparams = ({k: p.detach().clone().requires_grad_() for k, p in d.items()} for d in params)
    opt = torch.optim.Adam([dict(params=list(vparams.values()), lr=cfg.outer_value_lr),
                            dict(params=list(pparams.values()), lr=cfg.outer_policy_lr)])
    with torch.enable_grad():
        for _ in range(cfg.finetune_steps):
            if cfg.method == "meta-bc":
                loss = bc_loss(model.policy, pparams, batch, cfg)
            else:
                losses = multitask_losses(model, vparams, pparams, batch, cfg)
                loss = losses["outer_value"] + losses["outer_policy"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: p.detach() for k, p in vparams.items()}, {k: p.detach() for k, p in pparams.items()}


def make_optimizers(model, cfg):
    """Adam on the value weights (--outer-value-lr, default 1e-4; authors 1e-5), the policy weights
    (--outer-policy-lr, 1e-4) and the raw step sizes + lambda (--outer-log-lr-lr, 1e-3)."""
    return [torch.optim.Adam(model.value.parameters(), lr=cfg.outer_value_lr),
            torch.optim.Adam(model.policy.parameters(), lr=cfg.outer_policy_lr),
            torch.optim.Adam([model.raw_value_lrs, model.raw_policy_lrs, model.raw_adv_coef], lr=cfg.outer_log_lr_lr)]


class NonFiniteError(Exception):
    pass


def sample_meta_batch(task_data, train_ids, cfg, gen):
    """meta_batch training tasks (all of them, in order, if there are fewer), each with an inner
    batch of contiguous rows and an outer batch of random rows from the same task's data."""
    if cfg.meta_batch >= len(train_ids):
        ids = list(train_ids)
    else:
        ids = [train_ids[i] for i in torch.randperm(len(train_ids), generator=gen)[:cfg.meta_batch].tolist()]
    return [(task_data[k].contiguous_batch(cfg.inner_batch, gen), task_data[k].random_batch(cfg.outer_batch, gen))
            for k in ids]


def meta_objective(model, batches, n_train_tasks, cfg):
    """J: the sum over tasks of (outer value + outer policy loss) / number of TRAINING tasks (as the
    authors divide). Returns J and the mean of every logged loss."""
    losses = meta_losses(model, batches, cfg)
    total = (losses["outer_value"].sum() + losses["outer_policy"].sum()) / n_train_tasks
    return total, {k: v.mean() for k, v in losses.items()}


def meta_train_step(model, optimizers, batches, n_train_tasks, cfg):
    """One MACAW meta-step: J, one backward through the inner steps, one Adam step per group."""
    total, stats = meta_objective(model, batches, n_train_tasks, cfg)
    stats = {k: v.item() for k, v in stats.items()}
    if not math.isfinite(total.item()):
        raise NonFiniteError(", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in optimizers:
        opt.step()
    return stats


def refresh_lambda_returns(model, task_data, train_ids, cfg, gen):
    """--value-target td-lambda: each training task's lambda-returns (its batches' "lambda_return"), from its target
    value function phibar of (5) after one inner value step (1) on an inner batch. V at every stored next state
    costs more than a meta-step, so train() does this every --td-refresh meta-steps (docs/differences.md)."""
    vparams = {k: p.detach() for k, p in model.params()[0].items()}
    for k in train_ids:
        data = task_data[k]
        inner = data.contiguous_batch(cfg.inner_batch, gen)
        grads = grad(lambda p: value_loss(model.value, p, inner, inner["mc_return"]))(vparams)
        target_v = sgd_step(vparams, grads, model.raw_value_lrs.detach(), 1 - cfg.target_vf_alpha)
        with torch.no_grad():
            next_values = functional_call(model.value, target_v, (data.episodes["next_obs"],)).double().cpu().numpy()
        returns = lambda_returns(data.episodes["rewards"], next_values, data.episodes["ends"],
                                 data.episodes["end_discounts"], cfg.discount, cfg.td_lambda)
        data.tensors["lambda_return"] = torch.as_tensor(returns[data.keep], dtype=torch.float32, device=cfg.device)


# ================================================================================================
# 7. Evaluation: adapt on 256 offline transitions of a test task, act in THAT task's env.
# ================================================================================================
def policy_actor(policy, pparams, device, code=None):
    """Deterministic actor: obs (np) -> mu(s) (np); the rollout clips it to the action bounds.
    code: appended to each observation, as in the task's data (mt-awr's zeroed task id)."""
    pparams = {k: v.detach() for k, v in pparams.items()}
    code = np.zeros(0, np.float32) if code is None else code

    def act(obs):
        with torch.no_grad():
            obs = torch.as_tensor(np.concatenate([obs, code]), dtype=torch.float32, device=device)[None]
            return functional_call(policy, pparams, (obs,))[0].cpu().numpy()
    return act


def adapt_policy(model, batch, cfg):
    """The adapted policy params from one test batch: MACAW and Meta-BC take their inner step (adapt),
    MT-AWR fine-tunes."""
    if cfg.method == "mt-awr":
        return finetune(model, batch, cfg)[1]
    return adapt(model, *model.params(), batch, cfg)[1]


def evaluate(model, bench, task_data, cfg, gen, rollouts=1):
    """Per test task: the pre- and post-adaptation episode returns of `rollouts` adaptations (mean, and
    each in pre_each / post_each); episodes last 200 steps (point-robot 20, ml45 150) unless the agent falls.
    Each adaptation uses a fresh random batch of eval_batch transitions and (1)-(4): one value step,
    one policy step (the baselines adapt their own way, adapt_policy). ml45: each episode's success flag too."""
    pparams = model.params()[1]
    results = {}
    for k in bench.test_ids:
        env = make_task_env(bench, k)  # the env is switched to the task being evaluated
        pre, post = [], []
        for r in range(rollouts):
            batch = task_data[k].random_batch(cfg.eval_batch, gen)
            adapted_p = adapt_policy(model, batch, cfg)
            env_seed = 10_000 * cfg.seed + r
            pre.append(rollout(env, policy_actor(model.policy, pparams, cfg.device, task_data[k].code), env_seed))
            post.append(rollout(env, policy_actor(model.policy, adapted_p, cfg.device, task_data[k].code), env_seed))
        results[k] = dict(pre=float(np.mean(pre)), post=float(np.mean(post)), pre_each=pre, post_each=post)
        if hasattr(env, "successes"):  # (episodes alternate: pre, post)
            results[k].update(pre_success=env.successes[0::2], post_success=env.successes[1::2])
    return results


def normalized_score(ret, data):
    """(return - random policy) / (collector - random policy): 0 = random, 1 = the data's collector."""
    return (ret - data.random_return) / (data.collector_return - data.random_return)



# ================================================================================================
# 8. How the data are made (skip on a first read): each task's data is the replay buffer of a SAC agent
#    trained from scratch on it (a scripted controller's for point-robot), made once. The agents of many
#    tasks train as one stacked set of networks, envs in lock-step, one worker process per core, resumable.
# ================================================================================================
class StackedLinear(nn.Module):
    """n independent linear layers applied at once: x (n, B, in) -> (n, B, out), one batched matmul."""

    def __init__(self, n, in_features, out_features):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, for each of the n layers
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


def stacked_mlp(n, sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [StackedLinear(n, sizes[i], sizes[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers[:-1])


class SAC(nn.Module):
    """n independent soft actor-critic agents (Haarnoja et al. 2018) stacked along a first dimension: twin Q,
    target critics, learned temperature. Each loss is a sum of per-agent means and Adam works elementwise,
    so each agent learns exactly as it would alone: stacking only batches the arithmetic."""

    def __init__(self, n, obs_dim, act_dim, width=128, lr=SAC_LR):
        super().__init__()
        self.actor = stacked_mlp(n, [obs_dim, width, width, 2 * act_dim])
        self.q1, self.q2 = (stacked_mlp(n, [obs_dim + act_dim, width, width, 1]) for _ in range(2))
        self.q1_targ, self.q2_targ = (stacked_mlp(n, [obs_dim + act_dim, width, width, 1]) for _ in range(2))
        self.q1_targ.load_state_dict(self.q1.state_dict())
        self.q2_targ.load_state_dict(self.q2.state_dict())
        self.log_alpha = nn.Parameter(torch.zeros(n, 1))
        self.target_entropy = -act_dim
        # foreach Adam and in-place ReLUs (stacked_mlp): the same numbers as the defaults, bitwise, in
        # less time (docs/speed.md)
        self.pi_opt = torch.optim.Adam(self.actor.parameters(), lr=lr, foreach=True)
        self.q_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=lr, foreach=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr, foreach=True)

    def optimizers(self):
        return [self.pi_opt, self.q_opt, self.alpha_opt]

    def sample(self, obs, deterministic=False):
        """tanh-squashed Gaussian in [-1, 1]: obs (n, B, obs) -> action (n, B, act), log-probability (n, B)."""
        mean, log_std = self.actor(obs).chunk(2, -1)
        std = log_std.clamp(-5, 2).exp()
        u = mean if deterministic else mean + std * torch.randn_like(mean)
        action = torch.tanh(u)
        logp = (torch.distributions.Normal(mean, std).log_prob(u)
                - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return action, logp

    def q(self, nets, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.min(nets[0](x), nets[1](x)).squeeze(-1)  # (n, B)

    def update(self, obs, act, rew, next_obs, term, gamma=0.99, tau=0.005):
        """One gradient step of every agent on its own batch; every argument is (n, B, ...)."""
        alpha = self.log_alpha.exp().detach()  # (n, 1)
        with torch.no_grad():  # soft Bellman backup with the target critics
            next_act, next_logp = self.sample(next_obs)
            target = rew + gamma * (1 - term) * (self.q((self.q1_targ, self.q2_targ), next_obs, next_act)
                                                 - alpha * next_logp)
        x = torch.cat([obs, act], -1)
        q_loss = sum((net(x).squeeze(-1) - target).pow(2).mean(-1).sum() for net in (self.q1, self.q2))
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()
        new_act, logp = self.sample(obs)
        pi_loss = (alpha * logp - self.q((self.q1, self.q2), obs, new_act)).mean(-1).sum()
        self.pi_opt.zero_grad()
        pi_loss.backward()
        self.pi_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean(-1).sum()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for net, targ in ((self.q1, self.q1_targ), (self.q2, self.q2_targ)):
                for p, pt in zip(net.parameters(), targ.parameters()):
                    pt.lerp_(p, tau)


def lockstep_returns(envs, act, seed):
    """Return of one episode in every env at once; act maps observations (n, obs) to actions (n, act)."""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    totals, done = np.zeros(len(envs)), np.zeros(len(envs), bool)
    while not done.all():
        actions = act(obs)
        for i, env in enumerate(envs):
            if not done[i]:
                action = np.clip(actions[i], env.action_space.low, env.action_space.high)
                obs[i], reward, terminated, truncated, _ = env.step(action)
                totals[i] += reward
                done[i] = terminated or truncated
    return totals


BUFFER_KEYS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations")


def time_limit(env):
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


def env_state(env):
    """Everything that decides an env's future mid-episode: MuJoCo's integration state (positions,
    velocities, warm start...), the steps taken in this episode, and the env's random generator."""
    import mujoco
    model, data, spec = env.unwrapped.model, env.unwrapped.data, mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, physics, spec)
    return dict(physics=physics, elapsed=time_limit(env)._elapsed_steps,
                rng=env.unwrapped.np_random.bit_generator.state)


def restore_env_state(env, state):
    import mujoco
    env.reset()  # sets up the wrappers; everything it changed is overwritten below
    mujoco.mj_setState(env.unwrapped.model, env.unwrapped.data, state["physics"], mujoco.mjtState.mjSTATE_INTEGRATION)
    time_limit(env)._elapsed_steps = state["elapsed"]
    env.unwrapped.np_random.bit_generator.state = state["rng"]


def collect_sac(envs, steps, seed, checkpoint=None, checkpoint_every_s=180.0, should_stop=lambda: False,
                random_steps=2000, batch_size=256, width=128, position=0, shared=False, update_every=1,
                lr=SAC_LR):
    """Train one SAC agent per env from scratch, all in lock-step; each agent's whole replay buffer
    (`steps` transitions) is its task's offline data. Returns one data dict per env. shared=True trains ONE
    agent for all envs (input: observation + one-hot task code; buffers kept per task; one update per
    lock-step on random (task, transition) pairs). Resumable: every checkpoint_every_s seconds the whole
    state (agents, optimisers, buffers, RNG states, every env's simulator state) goes atomically to
    `checkpoint`, and a later call continues from it to the same data; should_stop() is checked after
    every step (if true: save, raise Interrupted)."""
    n, obs_dim, act_dim = len(envs), envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    scale = envs[0].action_space.high  # SAC acts in [-1, 1]; env actions are scale * that
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    agent = SAC(1, obs_dim + n, act_dim, width, lr) if shared else SAC(n, obs_dim, act_dim, width, lr)
    code = torch.eye(n)  # the shared agent's one-hot task codes

    def agent_input(o, tasks=None):
        """Observations (n, obs) of the envs, or (1, B, obs) of tasks (1, B) -> the agent's (agents, B, in)."""
        o = torch.as_tensor(o, dtype=torch.float32)
        if not shared:
            return o[:, None] if tasks is None else o
        return torch.cat([o, code], -1)[None] if tasks is None else torch.cat([o, code[tasks]], -1)

    dims = dict(observations=obs_dim, actions=act_dim, next_observations=obs_dim)
    buf = {k: np.zeros((n, steps, dims[k]) if k in dims else (n, steps), np.float32) for k in BUFFER_KEYS}
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        agent.load_state_dict(state["agent"])
        for opt, s in zip(agent.optimizers(), state["optimizers"]):
            opt.load_state_dict(s)
        start = state["t"]
        for k in BUFFER_KEYS:
            buf[k][:, :start] = state["buffers"][k]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for env, s in zip(envs, state["envs"]):
            restore_env_state(env, s)
        obs, episode_return, last_returns = state["obs"], state["episode_return"], state["last_returns"]
    else:
        obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
        episode_return, last_returns = np.zeros(n), np.full(n, np.nan)

    def save(t):
        state = dict(agent=agent.state_dict(), optimizers=[o.state_dict() for o in agent.optimizers()], t=t,
                     buffers={k: v[:, :t] for k, v in buf.items()}, rng=rng.bit_generator.state,
                     torch_rng=torch.get_rng_state(), envs=[env_state(env) for env in envs], obs=obs,
                     episode_return=episode_return, last_returns=last_returns)
        atomic_torch_save(checkpoint, state)

    bar = tqdm(total=n * steps, initial=n * start, desc=f"SAC x{n}", unit="env step", unit_scale=True,
               position=position, mininterval=2, leave=True)
    last_save = time.time()
    for t in range(start, steps):
        if t < random_steps:
            a = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                a = agent.sample(agent_input(obs))[0].reshape(n, act_dim).numpy()
        done = np.zeros(n, bool)
        for i, env in enumerate(envs):
            next_obs, reward, terminated, truncated, _ = env.step(a[i] * scale)
            for k, v in zip(BUFFER_KEYS, (obs[i], a[i] * scale, reward, next_obs, terminated, truncated)):
                buf[k][i, t] = v
            episode_return[i] += reward
            obs[i], done[i] = next_obs, terminated or truncated
        if t >= random_steps and (t - random_steps) % update_every == 0:  # one update per update_every steps
            if shared:  # random (task, transition) pairs
                tasks, rows = rng.integers(0, n, (1, batch_size)), rng.integers(0, t + 1, (1, batch_size))
            else:  # each agent samples its own buffer
                tasks, rows = np.arange(n)[:, None], rng.integers(0, t + 1, (n, batch_size))
            b = {k: torch.as_tensor(v[tasks, rows]) for k, v in buf.items()}
            agent.update(agent_input(b["observations"], tasks), b["actions"] / torch.as_tensor(scale), b["rewards"],
                         agent_input(b["next_observations"], tasks), b["terminations"])
        bar.update(n)
        if done.any():
            last_returns[done], episode_return[done] = episode_return[done], 0.0
            bar.set_postfix(mean_episode_return=f"{np.nanmean(last_returns):.0f}", refresh=False)
        for i in np.flatnonzero(done):
            obs[i] = envs[i].reset()[0]
        if checkpoint is not None and t + 1 < steps:
            stopping = should_stop()
            if stopping or time.time() - last_save >= checkpoint_every_s:
                save(t + 1)
                last_save = time.time()
            if stopping:
                bar.close()
                raise Interrupted(f"data collection stopped at step {t + 1}; saved {checkpoint}")
    bar.close()
    with torch.no_grad():
        def act(o):  # (n, obs) -> (n, act): the deterministic action in each env
            return agent.sample(agent_input(o), deterministic=True)[0].reshape(n, act_dim).numpy() * scale
        collector_returns = np.mean([lockstep_returns(envs, act, seed + 10_000 + 100 * e) for e in range(5)], axis=0)
    return [dict({k: v[i] for k, v in buf.items()}, collector_return=collector_returns[i]) for i in range(n)]


def expert_actor(env):
    """The env's scripted controller (point-robot, ml45), its action clipped to the action bounds."""
    low, high = env.action_space.low, env.action_space.high
    return lambda o: np.clip(env.expert(o), low, high)


def collect_scripted(env, steps, seed):
    """Scripted collector (point-robot, ml45): the env's expert controller, its action mixed with uniform noise,
    a = (1 - n) expert + n noise, where n anneals from 1 (pure noise) to 0 (the expert) over the data: every level
    in between is equally common, so the data spans random to competent behaviour like a replay buffer."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    expert = expert_actor(env)
    buf = {k: [] for k in BUFFER_KEYS}
    obs, _ = env.reset(seed=seed)
    for t in range(steps):
        noise = 1.0 - t / steps
        a = np.clip((1 - noise) * expert(obs) + noise * rng.uniform(low, high), low, high)
        next_obs, reward, terminated, truncated, _ = env.step(a)
        for k, v in zip(BUFFER_KEYS, (obs, a, reward, next_obs, terminated, truncated)):
            buf[k].append(v)
        obs = env.reset()[0] if terminated or truncated else next_obs
    buf = {k: np.asarray(v, np.float32) for k, v in buf.items()}
    buf["collector_return"] = rollout(env, expert, seed)
    return buf


def write_task_data(bench, task_id, env, data, seed, path):
    """Add the bookkeeping keys to one task's collected data and write it atomically."""
    data["truncations"][-1] = max(data["truncations"][-1], 1 - data["terminations"][-1])  # close the last episode
    data.update(env=bench.name, task_id=task_id, task=np.float64(bench.tasks[task_id]), seed=seed,
                random_return=random_policy_return(env, seed + 20_000), collector=bench.collector,
                format_version=DATA_FORMAT_VERSION)
    atomic_write(path, lambda f: np.savez(f, **data))


# Minari (optional: pip install "minari[hdf5]"), the offline-RL data sets' exchange format: --export-minari writes
# task k's data as the data set macaw/<env>-task<k>-v0 (one Minari episode per stored episode, the file's other
# keys in its metadata; MINARI_DATASETS_PATH says where), and --data-source minari trains from them.
MINARI = "minari:"


def minari_id(env, task_id):
    return f"macaw/{env}-task{task_id}-v0"


def import_minari():
    try:
        import minari
    except ImportError:
        raise UserError('Minari is not installed; pip install -r requirements-optional.txt (that is, "minari[hdf5]")'
                        ) from None
    return minari


def export_minari(cfg):
    """--export-minari: every task's data (made first if missing) as a Minari data set; replaces older exports."""
    if process_share()[1] > 1:
        raise UserError("--export-minari runs in one process: start it with python, not torchrun")
    minari = import_minari()
    bench = get_benchmark(cfg.env)
    cfg = cfg.resolve(bench)
    ensure_data(cfg, bench)
    space = bench.make_env()
    for k in range(len(bench.tasks)):
        data = load_task_data(task_data_path(cfg, k), bench, k, cfg)
        ends = np.flatnonzero(np.logical_or(data["terminations"], data["truncations"])) + 1
        episodes = []
        for i, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
            obs, next_obs = data["observations"][start:end], data["next_observations"][start:end]
            if not np.array_equal(obs[1:], next_obs[:-1]):
                raise UserError(f"task {k}'s episode {i} is not one unbroken trajectory; Minari cannot hold it")
            episodes.append(minari.data_collector.EpisodeBuffer(
                id=i, observations=np.concatenate([obs, next_obs[-1:]]), actions=data["actions"][start:end],
                rewards=data["rewards"][start:end], terminations=data["terminations"][start:end].astype(bool),
                truncations=data["truncations"][start:end].astype(bool)))
        name = minari_id(cfg.env, k)
        if name in minari.list_local_datasets():
            with contextlib.redirect_stdout(io.StringIO()):  # (it prints a line per data set)
                minari.delete_dataset(name)
        with warnings.catch_warnings():  # (that the env has no gymnasium registry entry: these envs are macaw.py's)
            warnings.simplefilter("ignore", UserWarning)
            dataset = minari.create_dataset_from_buffers(
                name, episodes, action_space=space.action_space,
                observation_space=gym.spaces.Box(-np.inf, np.inf, data["observations"].shape[1:], np.float32),
                algorithm_name=f"{bench.collector} collector (macaw.py)", description=f"{cfg.env} task {k} (macaw.py)")
        dataset.storage.update_metadata({"macaw": {key: value.tolist() for key, value in data.items()
                                                   if key not in DATA_KEYS}})
    print(f"Wrote {len(bench.tasks)} Minari data sets, {minari_id(cfg.env, 0)} ... (train from them with "
          f"--data-source minari)")


def read_minari(name):
    """One task's data dict, as load_task_data reads a .npz, from the Minari data set `name`."""
    minari = import_minari()
    if name not in minari.list_local_datasets():
        raise UserError(f"no Minari data set {name} here; write it with --export-minari")
    dataset = minari.load_dataset(name)
    episodes = list(dataset.iterate_episodes())
    data = dict(observations=np.concatenate([e.observations[:-1] for e in episodes]),
                next_observations=np.concatenate([e.observations[1:] for e in episodes]),
                **{k: np.concatenate([getattr(e, k) for e in episodes]).astype(np.float32)  # (as the .npz files)
                   for k in ("actions", "rewards", "terminations", "truncations")})
    data.update({k: np.asarray(v) for k, v in dataset.storage.metadata["macaw"].items()})
    return data


def collect_scripted_tasks(bench, task_ids, steps, seeds, paths, should_stop=lambda: False, position=0):
    """Scripted tasks one after another, each task's file written when it is done: a stopped collection keeps
    the tasks it finished, and the same command makes only the rest."""
    for k, seed, path in zip(tqdm(task_ids, desc="scripted tasks", position=position, leave=True), seeds, paths):
        if should_stop():
            raise Interrupted(f"data collection stopped before task {k}; the tasks before it are kept")
        env = make_task_env(bench, k)
        write_task_data(bench, k, env, collect_scripted(env, steps, seed), seed, path)


def collect_group(bench_name, task_ids, steps, seeds, width, shared, lr, paths, checkpoint, position):
    """Worker process: collect a group of tasks and write each task's file. SAC tasks train in lock-step
    (checkpointed, seeded by the group's first seed); scripted ones run one after another. It stops
    (SAC: after saving its checkpoint) when the process that started it sends SIGTERM or is gone."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent ends us
    told_to_stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: told_to_stop.append(True))  # finish the step, save, exit
    bench = BENCHMARKS[bench_name]
    parent = os.getppid()
    should_stop = lambda: bool(told_to_stop) or os.getppid() != parent
    try:
        with mujoco_warnings():
            if bench.collector != "sac":
                return collect_scripted_tasks(bench, task_ids, steps, seeds, paths, should_stop, position)
            envs = [make_task_env(bench, k) for k in task_ids]
            datas = collect_sac(envs, steps, seeds[0], checkpoint, should_stop=should_stop,
                                width=width, position=position, shared=shared, lr=lr)
            for k, env, data, path in zip(task_ids, envs, datas, paths):
                write_task_data(bench, k, env, dict(data, collector_width=width, collector_shared=shared,
                                                    collector_lr=lr), seeds[0], path)
    except Interrupted as e:  # stopped and saved; the parent (if any) says what to do next
        print(e, file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    checkpoint.unlink(missing_ok=True)


def task_seed(cfg, task_id):
    return cfg.data_seed * 1000 + task_id  # a SAC worker's group uses the seed of its first task


def missing_tasks(cfg, bench):
    return [k for k in range(len(bench.tasks)) if not task_data_path(cfg, k).exists()]


def ensure_data(cfg, bench, stop=()):
    """Generate the missing tasks' data, keep what is already there. A second run that needs the same data
    waits on the data folder's lock, then reuses the files. `stop` (run_settings' signal list): when it
    fills, every worker process is ended and Interrupted is raised."""
    folder = Path(cfg.data_dir) / cfg.env
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = process_share()  # under torchrun, process 0 holds the lock and each makes a share of the tasks
    if world == 1 and not cfg.regenerate_data and not missing_tasks(cfg, bench):
        return
    lock = folder_lock(folder, wait=True, purpose=f"generating the {cfg.env} data in {folder}/")
    with lock if rank == 0 else contextlib.nullcontext():
        if cfg.regenerate_data and rank == 0:
            for p in [*folder.glob("task*.npz"), *folder.glob("collector-*.pt")]:
                p.unlink()
        missing = [missing_tasks(cfg, bench)]  # another run may have made them while we waited
        if world > 1:
            dist.broadcast_object_list(missing, src=0)  # process 0's view, for every process
        mine = np.array_split(np.array(missing[0], dtype=int), world)[rank].tolist()
        if mine:
            generate_tasks(cfg, bench, mine, stop)
        if world > 1:
            dist.barrier()


def generate_tasks(cfg, bench, task_ids, stop=()):
    folder = Path(cfg.data_dir) / cfg.env
    shared = cfg.collector_design == "shared"
    width = (f"{' shared' if shared else ''} width {cfg.collector_width}, lr {cfg.collector_lr:g}"
             if bench.collector == "sac" else "")
    print(f"Generating offline data for {len(task_ids)} {cfg.env} task(s) in {folder}/ "
          f"({bench.collector}{width} collector, {cfg.collector_steps} steps each; done once, reused later)")
    if bench.collector != "sac" and len(task_ids) * cfg.collector_steps <= 100_000:  # point-robot: a second
        return collect_scripted_tasks(bench, task_ids, cfg.collector_steps, [task_seed(cfg, k) for k in task_ids],
                                      [task_data_path(cfg, k) for k in task_ids])
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # (torchrun: per process)
    # one worker per core, each with a group of tasks; a shared agent serves at least two (one task: per-task)
    groups = [g.tolist() for g in np.array_split(task_ids, max(1, min(cores, len(task_ids) // (2 if shared else 1))))]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=collect_group, daemon=True,
                               args=(cfg.env, group, cfg.collector_steps, [task_seed(cfg, k) for k in group],
                                     cfg.collector_width, shared, cfg.collector_lr,
                                     [task_data_path(cfg, k) for k in group],
                                     folder / f"collector-tasks{group[0]}-{group[-1]}-width{cfg.collector_width}"
                                              f"-lr{cfg.collector_lr:g}{'-shared' if shared else ''}.pt", position))
               for position, group in enumerate(groups)]
    for w in workers:
        w.start()
    try:
        while any(w.is_alive() for w in workers):
            if stop:
                raise Interrupted(f"{stop[0]}: data generation stopped; the collectors' checkpoints are in "
                                  f"{folder}/; run the same command again to continue")
            time.sleep(0.2)
    finally:
        for w in workers:  # Ctrl-C, SIGTERM or an error: no worker is left running
            if w.is_alive():
                w.terminate()
            w.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise UserError(f"data generation failed in {len(failed)} worker(s) (exit codes {failed}; their messages "
                        f"are above); run the same command again to continue from their checkpoints")


# ================================================================================================
# 9. Running it (skip on a first read): atomic files, locks, checkpoints, logs, plots, summary,
#    and the CLI: data -> meta-training (periodic evaluation, log, checkpoint) -> summary and plot.
# ================================================================================================
class WriteError(UserError):
    """A file could not be written (disk full, permissions); its previous version is intact."""


def atomic_write(path, write, keep_previous=False):
    """Write via a temporary file in the same folder, fsync, then rename: never a half-written file.
    keep_previous: first rename the current file to <name>.prev<suffix>, so the last two versions exist.
    An OSError (disk full, permissions) leaves the current file as it was and raises WriteError."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        if keep_previous and path.exists():
            os.replace(path, path.with_name(f"{path.stem}.prev{path.suffix}"))  # checkpoint.prev.pt
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path} ({e.strerror or e}); its previous version is intact") from None
        raise


def atomic_torch_save(path, obj, keep_previous=False):
    """torch.save through atomic_write, serialised in memory first: a failing disk is a WriteError, not a zip error."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), keep_previous=keep_previous)


@contextlib.contextmanager
def folder_lock(folder, wait, purpose):
    """Hold an OS file lock on <folder>/.lock (fcntl.flock) for the `with` block; the OS drops it when the
    process ends, however it ends. Held elsewhere: wait=False raises UserError naming the holder's pid,
    wait=True says so and waits. (No locking where fcntl is missing, i.e. on Windows.)"""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                if not wait:
                    raise UserError(f"{folder} is in use by another run (pid {holder}); wait for it to finish, "
                                    f"or pass another --run-name") from None
                print(f"Waiting for process {holder}, which is {purpose} ...", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def git_commit():
    """The code's commit, with "-dirty" if a tracked file other than results/ and docs/ (what runs and studies
    write, not code) differs from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results",
                                ":(exclude)docs"], cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions():
    try:
        import mujoco  # not needed for point-robot
        mujoco_version = mujoco.__version__
    except ImportError:
        mujoco_version = None
    from importlib.metadata import version
    optional = {name: version(name) for name in ("metaworld", "minari") if name in sys.modules}  # if used
    try:  # the CPU model (the same code and seeds have made different SAC data in different sittings: docs/data.md)
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or None
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                gymnasium=gym.__version__, mujoco=mujoco_version, **optional, machine=platform.machine(),
                cpu=cpu, cpus=os.cpu_count(), commit=git_commit())


CHECKPOINT_KEYS = ("model", "optimizers", "generator", "torch_rng", "step", "wall_time", "running")


def save_checkpoint(path, model, optimizers, gen, step, wall_time, running, cfg, **extra):
    """Everything a resumed run needs to continue exactly (weights, Adam and RNG states, the step, the current
    logging interval's losses, and `extra`: --value-target td-lambda's current targets); the previous checkpoint
    stays beside it as checkpoint.prev.pt."""
    state = dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                 generator=gen.get_state(), torch_rng=torch.get_rng_state(), step=step,
                 wall_time=wall_time, running=running, config=dataclasses.asdict(cfg), **extra)
    if not all(torch.isfinite(v).all() for v in state["model"].values()):
        raise NonFiniteError("non-finite parameters; the checkpoint was not overwritten")
    atomic_torch_save(path, state, keep_previous=True)


def load_checkpoint(run_dir, device):
    """The latest readable checkpoint of a run: checkpoint.pt, else (saying so) checkpoint.prev.pt."""
    latest = run_dir / "checkpoint.pt"
    problems = []
    for path in (latest, run_dir / "checkpoint.prev.pt"):
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            state = torch.load(path, map_location=device, weights_only=False)
            if not all(k in state for k in CHECKPOINT_KEYS):
                raise KeyError("incomplete")
        except Exception as e:  # a cut-short zip, garbage, an unpickling error: all mean "damaged"
            problems.append(f"{path} is damaged ({type(e).__name__})")
            continue
        if problems:
            print(f"Note: {'; '.join(problems)}; resuming from the previous checkpoint {path} "
                  f"(step {state['step']}): at most one logging interval is redone")
        return state
    raise UserError(f"--resume {run_dir}: no readable checkpoint ({'; '.join(problems)}); "
                    f"start the run again with another --run-name")


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_log(path, up_to_step):
    """The JSONL log's records up to a step (a resumed run drops what came after its checkpoint)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def plot_run(records, task_data, bench, path, losses=("outer_value", "outer_policy", "inner_policy")):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_ret, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    evals = [r for r in records if "eval" in r]
    steps = [r["step"] for r in evals]
    for n, k in enumerate(bench.test_ids):
        color = f"C{n}"
        label = f"task {k} ({bench.tasks[k]:+.2f})"
        ax_ret.plot(steps, [r["eval"][str(k)]["post"] for r in evals], color=color, label=f"{label} adapted")
        each = [r["eval"][str(k)].get("post_each", [r["eval"][str(k)]["post"]]) for r in evals]
        ax_ret.fill_between(steps, [min(e) for e in each], [max(e) for e in each], color=color, alpha=0.12, lw=0)
        ax_ret.plot(steps, [r["eval"][str(k)]["pre"] for r in evals], color=color, ls="--", alpha=0.6,
                    label=f"{label} before adaptation")
        if len(bench.test_ids) <= 2:
            ax_ret.axhline(task_data[k].collector_return, color=color, ls=":", lw=1, label=f"{label} collector")
    ax_ret.set(xlabel="meta-training step", ylabel="episode return",
               title=f"{bench.name}: test-task returns (band: min-max over adaptations)")
    ax_ret.legend(fontsize=7)
    train = [r for r in records if losses[0] in r]
    for key in [k for k in losses if train and k in train[0]]:
        ax_loss.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax_loss.set(xlabel="meta-training step", ylabel="loss", yscale="symlog", title="meta-training losses")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def command_line(cfg, bench):
    """The command that reproduces this run: `python macaw.py` and the flags whose values are not
    the defaults (so the summary says what was run, also when train() is called from a notebook)."""
    parts = ["python macaw.py"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = bench.defaults.get(f.name, f.default)
        if f.name == "resume" or value == default or (f.name == "run_name" and value == default_run_name(cfg)):
            continue
        if isinstance(value, bool):
            parts.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        else:
            parts.append(f"{flag_name(f.name)} {value}")
    return " ".join(parts)


def summarize(cfg, bench, task_data, final_eval, wall_time, data_time, run_versions):
    """Per test task: returns before and after adaptation (mean and every adaptation's), the collector's and
    random returns, the normalised score; overall: the means, and the share of adaptations reaching half
    the collector's normalised return (all-or-nothing adaptation shows up there, not in the mean)."""
    tasks = {}
    for k, res in final_eval.items():
        d = task_data[k]
        each = [normalized_score(r, d) for r in res["post_each"]]
        tasks[str(k)] = dict(task=bench.tasks[k], collector_return=d.collector_return,
                             random_return=d.random_return, pre_return=res["pre"], post_return=res["post"],
                             normalized=normalized_score(res["post"], d), pre_returns=res["pre_each"],
                             post_returns=res["post_each"], share_half=float(np.mean(np.array(each) >= 0.5)))
        if "pre_success" in res:  # ml45: the class, and the share of its episodes that succeeded
            tasks[str(k)].update(name=ML45_CLASSES[int(bench.tasks[k])], pre_success=float(np.mean(res["pre_success"])),
                                 post_success=float(np.mean(res["post_success"])), post_successes=res["post_success"])
    success = {f"{when}_success": float(np.mean([t[f"{when}_success"] for t in tasks.values()]))
               for when in ("pre", "post") if all(f"{when}_success" in t for t in tasks.values())}
    return dict(env=cfg.env, method=cfg.method, seed=cfg.seed, steps=cfg.steps, wall_time_s=round(wall_time, 1),
                data_time_s=round(data_time, 1), commit=run_versions["commit"],
                command=command_line(cfg, bench), final_eval_rollouts=cfg.final_eval_rollouts,
                mean_normalized=float(np.mean([t["normalized"] for t in tasks.values()])),
                mean_post_return=float(np.mean([t["post_return"] for t in tasks.values()])),
                share_half=float(np.mean([t["share_half"] for t in tasks.values()])), **success,
                tasks=tasks, versions=run_versions)


def print_summary(summary):
    method = "" if summary.get("method", "macaw") == "macaw" else f" ({summary['method']})"
    print(f"\n{summary['env']}{method}, seed {summary['seed']}, {summary['steps']} steps, "
          f"{summary['wall_time_s'] / 60:.1f} min; returns averaged over {summary['final_eval_rollouts']} "
          f"adaptations per task")
    print(f"{'task':>12} {'collector':>10} {'random':>9} {'pre-adapt':>10} {'adapted':>9} "
          f"{'(min .. max)':>17} {'normalised':>11} {'>= 0.5':>7}")
    for k, t in summary["tasks"].items():
        name = t.get("name", f"{k} ({t['task']:+.2f})")
        spread = f"({min(t['post_returns']):.0f} .. {max(t['post_returns']):.0f})"
        print(f"{name:>12} {t['collector_return']:10.1f} {t['random_return']:9.1f} "
              f"{t['pre_return']:10.1f} {t['post_return']:9.1f} {spread:>17} {t['normalized']:11.2f} "
              f"{t['share_half']:7.0%}")
    print(f"mean adapted return {summary['mean_post_return']:.1f}; mean normalised score "
          f"{summary['mean_normalized']:.2f}; adaptations reaching half the collector's: {summary['share_half']:.0%}")
    if "post_success" in summary:
        print(f"success rate (Meta-World's flag, share of episodes): {summary['pre_success']:.0%} before adaptation, "
              f"{summary['post_success']:.0%} adapted; per class: " + ", ".join(
                  f"{t['name']} {t['pre_success']:.0%} -> {t['post_success']:.0%}" for t in summary["tasks"].values()))


def load_resume_config(cfg):
    """--resume <run dir>: the saved config wins, except --steps and --resume; it names any other flag it ignores."""
    run_dir = Path(cfg.resume)
    if not any((run_dir / name).exists() for name in ("checkpoint.pt", "checkpoint.prev.pt")):
        raise UserError(f"--resume {run_dir}: no checkpoint.pt there; pass a run folder such as runs/<run-name>")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume {run_dir}: cannot read config.json ({e}); the run folder is incomplete") from None
    given = [f for f in dataclasses.fields(cfg) if f.name not in ("steps", "resume")
             and getattr(cfg, f.name) != f.default and getattr(cfg, f.name) != saved.get(f.name)]
    if given:
        print(f"Note: --resume keeps the run's saved settings; ignored: "
              f"{', '.join(f'{flag_name(f.name)} {getattr(cfg, f.name)}' for f in given)}")
    saved["steps"] = cfg.steps if cfg.steps != -1 else saved["steps"]
    saved.update(resume=cfg.resume, out=str(run_dir.parent), run_name=run_dir.name)
    return saved_config(saved, type(cfg))


def saved_config(saved, config=Config):
    """A Config from a run's config.json, leaving out fields that later versions retired."""
    return config(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(config)}})


def check_writable(folder, flag):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); pass a writable {flag}") from None


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped cleanly (exit code 130)."""


@contextlib.contextmanager
def run_settings(cfg):
    """Process-wide settings of one run, all restored on exit (so train() leaves a notebook's process as it
    was): threads, the global torch RNG (seeded with cfg.seed), MuJoCo's warning handler and, in the main
    thread only, Ctrl-C/SIGTERM handlers that append the signal's name to the yielded list."""
    threads = torch.get_num_threads()
    stop = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            handlers[s] = signal.signal(s, lambda signum, frame: stop.append(signal.Signals(signum).name))
    try:
        with torch.random.fork_rng(devices=[]), mujoco_warnings():
            torch.set_num_threads(cfg.threads)
            torch.manual_seed(cfg.seed)
            yield stop
    finally:
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)


# torchrun: `torchrun --nproc-per-node N macaw.py ...` is one run over N processes (and --nnodes machines, the
# data and run folders on a shared file system). Every process samples the same meta-batch from the same
# generator and takes its share of the tasks; J is a sum over tasks, so the meta-gradient is the SUM of the
# processes' gradients: one all-reduce of them all, just before the optimisers step, keeps every process's
# parameters and Adam state identical. Evaluation splits the test tasks and data generation the missing tasks;
# process 0 alone writes files. `python macaw.py` is one process and runs none of this.
def process_share():
    """(this process's rank, the number of processes): (0, 1) unless started by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_processes(cfg):
    """Under torchrun, join the process group once (gloo for CPU tensors, and NCCL for CUDA ones on a GPU; a generous
    timeout: a process may wait for the others' data)."""
    if process_share()[1] > 1 and not dist.is_initialized():
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cfg.device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=6))


def sum_gradients_over_processes(model, optimizers):
    """Before the first optimiser steps, replace every gradient by its sum over the processes: one all-reduce of
    all of them, flattened. (A tensor without a gradient has none in every process: it is left out, as Adam
    leaves it.)"""
    def all_reduce(optimizer, args, kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    optimizers[0].register_step_pre_hook(all_reduce)


def any_process(flag):
    """Whether `flag` is set in any process (every process gets the same answer: they stop at the same step)."""
    if process_share()[1] == 1:
        return bool(flag)
    flags = torch.tensor([float(bool(flag))])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def meta_step_over_processes(model, n_train_tasks, cfg):
    """meta_step_function's optimisers and step, with the gradients summed over the processes under torchrun."""
    optimizers, meta_step = meta_step_function(model, n_train_tasks, cfg)
    if process_share()[1] > 1:
        sum_gradients_over_processes(model, optimizers)
    return optimizers, meta_step


def mean_over_processes(losses, n_tasks):
    """The meta-batch's mean of each logged loss from each process's mean over its n_tasks tasks."""
    names = sorted(losses)
    total = torch.tensor([n_tasks * losses[k] for k in names] + [n_tasks], dtype=torch.float64)
    dist.all_reduce(total)
    return {k: float(v) for k, v in zip(names, total[:-1] / total[-1])}


def evaluate_over_processes(model, bench, task_data, cfg, gen, rollouts):
    """evaluate, each process on its share of the test tasks, all processes getting every result; then the
    generator is process 0's again, so that every process keeps drawing the same meta-batches."""
    rank, world = process_share()
    mine = evaluate(model, dataclasses.replace(bench, test_ids=bench.test_ids[rank::world]), task_data, cfg, gen,
                    rollouts)
    shares, state, results = [None] * world, [gen.get_state()], {}
    dist.all_gather_object(shares, mine)
    dist.broadcast_object_list(state, src=0)
    gen.set_state(state[0])
    for share in shares:
        results.update(share)
    return {k: results[k] for k in bench.test_ids}


def train(cfg):
    """Run MACAW end to end; returns the summary dict (also in <run>/summary.json). Raises UserError (one line)
    for anything the user can fix; holds the run folder's lock throughout."""
    if cfg.resume:
        cfg = load_resume_config(cfg)
    bench = get_benchmark(cfg.env)
    cfg = cfg.resolve(bench)
    if not cfg.plain:
        check_section_6()  # before any data are made
    join_processes(cfg)
    world = process_share()[1]
    if world > min(cfg.meta_batch, len(bench.train_ids)):
        raise UserError(f"{world} processes share a meta-batch of {min(cfg.meta_batch, len(bench.train_ids))} tasks; "
                        f"use at most that many processes, or a larger --meta-batch")
    run_dir = Path(cfg.out) / cfg.run_name
    check_writable(run_dir, "--out")
    check_writable(Path(cfg.data_dir) / cfg.env, "--data-dir")
    lock = folder_lock(run_dir, wait=False, purpose="training") if process_share()[0] == 0 else contextlib.nullcontext()
    with lock, run_settings(cfg) as stop:
        if not cfg.resume and any((run_dir / n).exists() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
            raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                            f"or pass another --run-name (or delete the folder)")
        try:
            return run_locked(cfg, bench, run_dir, stop)
        except WriteError as e:
            raise WriteError(f"{e}; after fixing that, continue with python macaw.py --resume {run_dir}") from None


def run_locked(cfg, bench, run_dir, stop):
    """train() once the run folder is locked and the process settings are made."""
    run_versions = versions()  # read once, before the data (which may take long): the commit this process runs
    t0 = time.time()
    task_data = load_benchmark_data(cfg, bench, stop)
    data_time = time.time() - t0
    obs_dim, act_dim = task_data[0].tensors["obs"].shape[1], task_data[0].tensors["actions"].shape[1]
    model = MACAW(obs_dim, act_dim, cfg).to(cfg.device)  # obs_dim includes mt-awr's task id
    optimizers, meta_step = meta_step_over_processes(model, len(bench.train_ids), cfg)  # section 6's forms or 10's
    rank, world = process_share()  # (0, 1) but under torchrun
    gen = torch.Generator().manual_seed(cfg.seed)  # all batch sampling draws from this
    step, wall_time, running = 0, 0.0, []
    ckpt_path, log_path, summary_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl", run_dir / "summary.json"
    if cfg.resume:
        state = load_checkpoint(run_dir, cfg.device)
        if state["step"] >= cfg.steps and summary_path.exists():
            print(f"{run_dir} is already finished at step {state['step']} ({summary_path}); to train it "
                  f"longer: python macaw.py --resume {run_dir} --steps N (N > {state['step']})")
            return json.loads(summary_path.read_text())
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, wall_time, running = state["step"], state["wall_time"], state["running"]
        for k, targets in state.get("lambda_returns", {}).items():  # --value-target td-lambda's, as they were
            task_data[k].tensors["lambda_return"] = targets
        if rank == 0:
            print(f"Resuming {run_dir} at step {step}")
    records = read_log(log_path, step)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
        write_json(run_dir / "versions.json", run_versions)
        print(f"{cfg.method} on {cfg.env}: {len(bench.train_ids)} train / {len(bench.test_ids)} test tasks, "
              f"{n_params:,} meta-parameters, {cfg.steps} steps -> {run_dir}/" + (f" ({world} processes)" if world > 1
                                                                                   else ""))
    evaluation = evaluate_over_processes if world > 1 else evaluate

    def checkpoint():  # checkpoint first: a log never runs ahead of the checkpoint it belongs to
        if rank > 0:
            return
        targets = {k: task_data[k].tensors["lambda_return"] for k in bench.train_ids
                   if "lambda_return" in task_data[k].tensors}
        save_checkpoint(ckpt_path, model, optimizers, gen, step, time.time() - t_start, running, cfg,
                        **(dict(lambda_returns=targets) if targets else {}))
        atomic_write(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))

    # Ctrl-C / SIGTERM only append to `stop` (run_settings), checked between meta-steps: no half-step checkpoint.
    if cfg.compile:
        print("--compile: the first meta-step compiles the meta-gradient (a minute or two)")
    bar = tqdm(total=cfg.steps, initial=step, desc="meta-train", mininterval=1, dynamic_ncols=True, disable=rank > 0)
    t_start, interval_start, first_step = time.time() - wall_time, time.time(), step
    try:
        while step < cfg.steps and not any_process(stop):
            if cfg.value_target == "td-lambda" and (step % cfg.td_refresh == 0 or
                                                    "lambda_return" not in task_data[bench.train_ids[0]].tensors):
                step_gen = torch.Generator().manual_seed(1_000_003 * cfg.seed + step)  # (training's gen untouched)
                refresh_lambda_returns(model, task_data, bench.train_ids, cfg, step_gen)
            batches = sample_meta_batch(task_data, bench.train_ids, cfg, gen)
            try:
                stats = meta_step(batches[rank::world])  # (every task, but under torchrun)
            except NonFiniteError as e:
                raise UserError(f"non-finite loss at step {step + 1} ({e}); the last good checkpoint is "
                                f"{ckpt_path} (step {records[-1]['step'] if records else 0})") from None
            except Exception as e:  # the first --compile step compiles: no C compiler, a torch.compile limit, ...
                if not cfg.compile or step > first_step:
                    raise
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                raise UserError(f"--compile: torch.compile failed ({type(e).__name__}: {first_line}); run without "
                                f"--compile (the same results, slower)") from e
            step += 1
            running.append(stats)
            bar.update(1)
            bar.set_postfix(v=f"{stats['outer_value']:.3g}", pi=f"{stats['outer_policy']:.3g}", refresh=False)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                losses = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
                if world > 1:
                    losses = mean_over_processes(losses, len(batches[rank::world]))
                record = dict(step=step, time=round(time.time() - t_start, 1), **losses)
                record["steps_per_s"] = round(len(running) / (time.time() - interval_start), 2)
                results = evaluation(model, bench, task_data, cfg, gen, cfg.eval_rollouts)
                record["eval"] = {str(k): v for k, v in results.items()}
                running = []
                records.append(record)
                if rank == 0:
                    bar.write(f"step {step}: " + "  ".join(
                        f"task {k} pre {v['pre']:.0f} post {v['post']:.0f}" for k, v in record["eval"].items()))
                    checkpoint()
                    plot_run(records, task_data, bench, run_dir / "curves.png")
                interval_start = time.time()
    finally:
        bar.close()
    if step < cfg.steps:  # stopped (in every process at the same step)
        checkpoint()
        signal_name = stop[0] if stop else "another process's signal"
        raise Interrupted(f"{signal_name}: stopped at step {step}; saved {ckpt_path}; continue with "
                          f"python macaw.py --resume {run_dir}")
    final = evaluation(model, bench, task_data, cfg, gen, rollouts=cfg.final_eval_rollouts)
    wall_time = time.time() - t_start
    summary = summarize(cfg, bench, task_data, final, wall_time, data_time, run_versions)
    if rank == 0:
        write_json(summary_path, summary)
        print_summary(summary)
        print(f"Wrote {run_dir}/: config.json, log.jsonl, checkpoint.pt, curves.png, summary.json")
    return summary


def main(argv=None):
    """The command line. Returns the exit code (0 done, 2 a problem the user can fix, 130 stopped by
    Ctrl-C/SIGTERM) instead of exiting, so a script or notebook can call main([...]); a malformed
    flag still raises argparse's SystemExit."""
    try:
        cfg = parse_config(argv)
        if cfg.export_minari:
            export_minari(cfg)
        else:
            train(cfg)
        return 0
    except UserError as e:
        print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 2
    except RuntimeError as e:  # torchrun: a collective whose peer process is gone (and torchrun stops this one)
        if process_share()[1] == 1 or not (isinstance(e, dist.DistError) or "closed by peer" in str(e)):
            raise
        print(f"error: another process of this torchrun run stopped ({type(e).__name__}); the run folder holds "
              f"process 0's last checkpoint", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ================================================================================================
# 10. Faster forms of section 6: the same numbers (skip on a first read). A default run meta-trains with
#     these (--plain: section 6 as written), each exact and tested against section 6 and the authors' step:
#     the fast inner step (no stepped copy of any T), vmap over the tasks of a meta-batch, each T's
#     meta-gradient in one product (merged_transform_losses), and, opt-in, --compile. The fast_* functions
#     differ from section 6's only in what they call: diff them. Measured gains: docs/speed.md.
# ================================================================================================
# The fast inner step, exact. A WLinear generates omega = T z + c; with G = dL/domega the chain rule gives
#     dL/dc = G,    dL/dz = T^T G,    dL/dT = G z^T   (an outer product: (in*out + out) x latent, ~1M numbers).
# One SGD step makes z' = z - alpha_z T^T G, T' = T - alpha_T G z^T and c' = c - alpha_c G, so the adapted weights are
#     omega' = T' z' + c' = T z' - alpha_T (z . z') G + c - alpha_c G = T z' + c'',
#     c'' = c - (alpha_c + alpha_T (z . z')) G:
# the UNCHANGED T with a shifted bias. T' and dL/dT never exist, and as G = dL/dc, the inner gradient is
# needed only for z and c; autograd through this form gives the same meta-gradient. It holds part-way along
# the step too (every alpha scaled alike), and for ONE step from (z, T, c): a multi-step edit belongs in section 6.
def is_transform_matrix(name):
    return name.endswith(".fc.weight")  # T of a WLinear (plain nn.Linear weights are named "<layer>.weight")


def fast_sgd_step(params, grads, raw_lrs, fraction=1.0, probes=None):
    """sgd_step without the stepped copy of T: each WLinear becomes (z', T, c''); other tensors as in sgd_step.
    `grads` needs no entry for the T's. probes: see TransformProbes (the merged dJ/dT below)."""
    lr = dict(zip(params, fraction * F.softplus(raw_lrs)))
    if probes is not None:
        grads = probes.at_z_gradients(grads)
    stepped = {}
    for k, p in params.items():  # (a WLinear's z comes before its T and c)
        if is_transform_matrix(k):
            stepped[k] = p  # T stays as it is
        elif k.endswith(".fc.bias"):  # c'' = c - (alpha_c + alpha_T (z . z')) G, with G = dL/dc
            layer = k[:-len("fc.bias")]
            z, z_new = params[layer + "z"], stepped[layer + "z"]
            stepped[k] = p - (lr[k] + lr[layer + "fc.weight"] * (z @ z_new)) * grads[k]
        else:
            stepped[k] = p - lr[k] * grads[k]
    return stepped if probes is None else probes.at_adapted(grads, stepped)


def fast_inner_gradients(loss_fn, params):
    """grad of loss_fn (which returns (loss, aux)) at params, leaving out the T's, whose gradient the fast
    step never uses."""
    fixed = {k: p for k, p in params.items() if is_transform_matrix(k)}
    wrt = {k: p for k, p in params.items() if not is_transform_matrix(k)}
    return grad(lambda p: loss_fn({**p, **fixed}), has_aux=True)(wrt)


def fast_adapt(model, vparams, pparams, inner, cfg, probes=(None, None)):
    """adapt with fast_inner_gradients and fast_sgd_step; probes: the (value, policy) TransformProbes of the
    merged dJ/dT, or None."""
    if cfg.method == "meta-bc":
        def bc_step_loss(p):
            loss = bc_loss(model.policy, p, inner, cfg)
            return loss, loss.detach()
        p_grads, inner_pi = fast_inner_gradients(bc_step_loss, pparams)
        return vparams, fast_sgd_step(pparams, p_grads, model.raw_policy_lrs, probes=probes[1]), vparams, \
            dict(inner_policy=inner_pi)

    def value_step_loss(p):
        loss = value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()

    v_grads, inner_v = fast_inner_gradients(value_step_loss, vparams)
    adapted_v = fast_sgd_step(vparams, v_grads, model.raw_value_lrs, probes=probes[0])
    target_v = {k: p.detach() for k, p in fast_sgd_step(vparams, v_grads, model.raw_value_lrs,
                                                         1 - cfg.target_vf_alpha).items()}
    adv = advantages(model.value, adapted_v, inner)

    def policy_step_loss(p):
        loss, head = inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())

    p_grads, (inner_pi, head) = fast_inner_gradients(policy_step_loss, pparams)
    adapted_p = fast_sgd_step(pparams, p_grads, model.raw_policy_lrs, probes=probes[1])
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


def fast_task_meta_losses(model, vparams, pparams, inner, outer, cfg, probes=(None, None)):
    """task_meta_losses with fast_adapt."""
    adapted_v, adapted_p, target_v, stats = fast_adapt(model, vparams, pparams, inner, cfg, probes)
    return dict(**outer_losses(model, adapted_v, adapted_p, target_v, outer, cfg), **stats)


def fast_meta_losses(model, batches, cfg, merge=True):
    """meta_losses with the tasks stacked to (tasks, B, ...) and mapped with torch.func.vmap, which turns the
    tasks' many matrix-vector products with the shared T's into matrix products, and (merge, when gradients
    are on) each T's meta-gradient formed in one product."""
    vparams, pparams = model.params()
    inner, outer = ({k: torch.stack([b[i][k] for b in batches]) for k in batches[0][i]} for i in (0, 1))
    if cfg.method == "mt-awr":
        return vmap(lambda inner, outer: multitask_losses(model, vparams, pparams, outer, cfg))(inner, outer)
    if merge and cfg.weight_transform and torch.is_grad_enabled():
        return merged_transform_losses(model, vparams, pparams, inner, outer, cfg)
    return vmap(lambda inner, outer: fast_task_meta_losses(model, vparams, pparams, inner, outer, cfg))(inner, outer)


# Merged T gradients. In the fast form T enters J only through products: omega = T z + c, dL/dz = T^T G and
# omega' = T z' + c''. Each y = T x adds (dJ/dy) x^T to dJ/dT (y = T^T G adds G (dJ/dy)^T), and autograd writes
# each 1 M-number outer product separately, then sums them: memory traffic, not arithmetic. So T is used
# detached and a zero "probe" is added to each product's output; one autograd node (MergedTransformGradients)
# turns the probes' gradients into dJ/dT = sum_uses (dJ/dy) x^T, ONE product of two thin matrices per T.
def merged_transform_gradient(z, factors, g_omega, g_z, g_adapted):
    """dJ/dT of one layer from its probes' gradients, ONE product of two thin matrices: sum over T's uses of
    (dJ/dy) x^T. z: the layer's latent; factors: its (G, z') per task from fast_sgd_step, or (None, None)."""
    G, z_new = factors
    terms = [(g_omega, z),  # dJ/domega + dJ/domega' (c'' is built from c + p_omega) ...
             (g_adapted, None if z_new is None else z_new - z),  # ... hence z' - z here
             (G, g_z)]  # y = dL/dz = T^T G adds G (dJ/dy)^T
    terms = [(a, b) for a, b in terms if a is not None and b is not None]
    if not terms:
        return None
    left = [a.reshape(-1, a.shape[-1]) for a, _ in terms]  # rows (uses, P)
    right = [b.reshape(-1, b.shape[-1]) for _, b in terms]  # rows (uses, latent)
    return torch.cat(left).t() @ torch.cat(right)


class TransformProbes:
    """One task's probes for one network (dicts WLinear layer prefix -> zero tensor): at dL/dz (added to the
    inner gradient of z) and at omega' (added to c''). The probe at omega is added to c itself, outside the
    vmap (merged_transform_losses). fast_sgd_step fills `factors`: each layer's G = dL/dc and z'."""

    def __init__(self, at_z_gradient, at_adapted_weights):
        self.at_z_gradient, self.at_adapted_weights, self.factors = at_z_gradient, at_adapted_weights, {}

    def at_z_gradients(self, grads):
        return {**grads, **{l + "z": grads[l + "z"] + p for l, p in self.at_z_gradient.items()}}

    def at_adapted(self, grads, stepped):
        for l in self.at_adapted_weights:
            self.factors[l] = (grads[l + "fc.bias"].detach(), stepped[l + "z"].detach())
        return {**stepped, **{l + "fc.bias": stepped[l + "fc.bias"] + p for l, p in self.at_adapted_weights.items()}}


def probes_dropped(layer):
    return RuntimeError(f"merged T gradients: the inner step of {layer} took no probes; an edited fast_adapt must "
                        f"pass them to fast_sgd_step, or run with --plain (section 6 as written)")


class MergedTransformGradients(torch.autograd.Function):
    """Forward: each T (P, latent) -> its three zero probes. Backward: all the probes' gradients -> dJ/dT for
    every T, one product each. `record`: each layer's (network, prefix) and z, and the factors G, z' that the
    step records (filled in after the vmap)."""

    @staticmethod
    def forward(ctx, record, tasks, *transforms):
        ctx.record = record
        ctx.set_materialize_grads(False)  # None for a probe that J does not reach
        # per T (P, latent), zeros at omega (P,), at dL/dz (tasks, latent) and at omega' (tasks, P)
        return tuple(p for T in transforms for p in (T.new_zeros(T.shape[0]), T.new_zeros(tasks, T.shape[1]),
                                                     T.new_zeros(tasks, T.shape[0])))

    @staticmethod
    def backward(ctx, *grads):
        record, grad_T = ctx.record, []
        for i, ((net, l), z) in enumerate(zip(record["layers"], record["z"])):
            if grads[3 * i] is not None and l not in record["factors"][net]:
                raise probes_dropped(l)
            factors = record["factors"][net].get(l, (None, None))  # (tasks, P), (tasks, latent)
            grad_T.append(merged_transform_gradient(z, factors, *grads[3 * i:3 * i + 3]))
        return None, None, *grad_T


def merged_transform_losses(model, vparams, pparams, inner, outer, cfg):
    """fast_meta_losses with every T used detached, and the probes that let backward() form each T's
    meta-gradient as one matrix product (MergedTransformGradients)."""
    tasks, nets = len(inner["obs"]), (vparams, pparams)
    layers = [(net, k[:-len("fc.weight")]) for net, params in enumerate(nets) for k in params  # ('seq.fc_0.', ...)
              if is_transform_matrix(k)]
    record = dict(layers=layers, z=[nets[net][l + "z"].detach() for net, l in layers], factors=None)
    made = MergedTransformGradients.apply(record, tasks, *[nets[net][l + "fc.weight"] for net, l in layers])
    probes = [{}, {}]  # per network: layer -> dict(omega, z, adapted)
    for i, (net, l) in enumerate(layers):
        probes[net][l] = dict(zip(("omega", "z", "adapted"), made[3 * i:3 * i + 3]))
    probed = [{k: p.detach() if is_transform_matrix(k) else p for k, p in params.items()} for params in nets]
    for params, layer_probes in zip(probed, probes):  # c + p_omega
        for l, p in layer_probes.items():
            params[l + "fc.bias"] = params[l + "fc.bias"] + p["omega"]

    def per_task(inner, outer, at_z, at_adapted):
        task_probes = [TransformProbes(z, a) for z, a in zip(at_z, at_adapted)]
        losses = fast_task_meta_losses(model, *probed, inner, outer, cfg, task_probes)
        return losses, [p.factors for p in task_probes]

    pick = lambda key: [{l: p[key] for l, p in layer_probes.items()} for layer_probes in probes]
    losses, record["factors"] = vmap(per_task)(inner, outer, pick("z"), pick("adapted"))
    return losses


def fast_meta_objective(model, batches, n_train_tasks, cfg, merge=True):
    """meta_objective with fast_meta_losses."""
    losses = fast_meta_losses(model, batches, cfg, merge)
    total = (losses["outer_value"].sum() + losses["outer_policy"].sum()) / n_train_tasks
    return total, {k: v.mean() for k, v in losses.items()}


def fast_meta_train_step(model, optimizers, batches, n_train_tasks, cfg, merge=True, meta_gradient=None):
    """meta_train_step with fast_meta_objective; meta_gradient: compiled_meta_gradient's function (--compile)."""
    if meta_gradient is None:
        total, stats = fast_meta_objective(model, batches, n_train_tasks, cfg, merge)
    else:
        grads, (total, stats) = meta_gradient({k: p.detach() for k, p in model.named_parameters()}, batches)
    stats = {k: v.item() for k, v in stats.items()}
    if not math.isfinite(total.item()):
        raise NonFiniteError(", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if meta_gradient is None:
        total.backward()
    else:
        for name, p in model.named_parameters():
            p.grad = grads[name]
    for opt in optimizers:
        opt.step()
    return stats


class MetaObjective(nn.Module):
    """J as a module whose parameters are the model's ("model.<name>"), so that torch.func can call it as a
    function of the meta-parameters (--compile). Autograd's own T gradients: the merged ones come from a
    custom autograd node, which torch.func.grad does not run."""

    def __init__(self, model, n_train_tasks, cfg):
        super().__init__()
        self.model, self.n_train_tasks, self.cfg = model, n_train_tasks, cfg

    def forward(self, batches):
        return fast_meta_objective(self.model, batches, self.n_train_tasks, self.cfg, merge=False)


def compiled_meta_gradient(model, n_train_tasks, cfg, backend="inductor", mode=None):
    """--compile: (meta-parameters, batches) -> (dJ/dparams, (J, losses)) as ONE pure function, compiled with
    torch.compile. The same numbers as backward() up to float rounding, faster after up to a minute or two of compiling
    (docs/speed.md); never needed for correctness. torch.compile cannot trace autograd's double backward,
    which backward() uses, so J is differentiated with torch.func.grad instead. mode="reduce-overhead" adds CUDA
    graphs on a GPU (speed/meta_step.py's "graphs" form)."""
    objective = MetaObjective(model, n_train_tasks, cfg)

    def differentiated(params, batches):
        total, stats = functional_call(objective, {"model." + k: p for k, p in params.items()}, (batches,))
        return total, (total.detach(), stats)  # (what grad differentiates, what it passes through)
    return torch.compile(grad(differentiated, has_aux=True), backend=backend, mode=mode)


SECTION_6 = ("sgd_step", "adapt", "outer_losses", "task_meta_losses", "meta_losses", "make_optimizers",
             "meta_objective", "meta_train_step")
SECTION_6_SOURCE = "6a17e7cc76aaffe2"  # check_section_6's fingerprint of the section 6 that section 10 mirrors


def fast_optimizers(model, cfg):
    """make_optimizers with fused Adam: the same update in one kernel per group, where torch has one."""
    fused = model.raw_adv_coef.device.type in ("cpu", "cuda")
    return [torch.optim.Adam([dict(params=g["params"], lr=g["lr"]) for g in opt.param_groups], fused=fused)
            for opt in make_optimizers(model, cfg)]


def check_section_6():
    """Stop, naming the fix, if section 6 is not the code section 10 mirrors (an edit the faster forms would ignore):
    a fingerprint of its functions' source (unreadable, e.g. defined in a notebook cell, counts as changed)."""
    try:
        source = hashlib.sha256("".join(inspect.getsource(globals()[n]) for n in SECTION_6).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        source = None
    if source != SECTION_6_SOURCE:
        raise UserError(f"section 6 of macaw.py was edited (or a function of it replaced; fingerprint {source}), and "
                        f"section 10's faster forms would not run the edit; meta-train with --plain (cfg.plain=True)")


def meta_step_function(model, n_train_tasks, cfg):
    """THE seam between section 6 and this section: the optimisers and the function train() calls once per
    meta-step, batches -> logged losses. --plain: section 6's make_optimizers and meta_train_step as written;
    by default the faster forms (--compile: compiled). An edit of section 6, in the file or swapped in from a
    notebook, would be ignored by the faster forms, so a run stops here with the fix."""
    if cfg.plain:
        optimizers = make_optimizers(model, cfg)
        return optimizers, lambda batches: meta_train_step(model, optimizers, batches, n_train_tasks, cfg)
    check_section_6()
    optimizers = fast_optimizers(model, cfg)
    gradient = compiled_meta_gradient(model, n_train_tasks, cfg) if cfg.compile else None
    return optimizers, lambda batches: fast_meta_train_step(model, optimizers, batches, n_train_tasks, cfg, True,
                                                            gradient)


if __name__ == "__main__":
    sys.exit(main())
