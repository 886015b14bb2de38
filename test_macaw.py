"""Tests: fidelity to the authors' code first, then mechanics (learn2learn style), then the product.

Run with `pytest` (the README's command also executes tutorial.ipynb).
"""
import dataclasses
import gc
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mujoco
import numpy as np
import pytest
import torch

import macaw

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "authors_meta_step_small.pt"
torch.set_num_threads(1)
# The fidelity and fast-vs-plain tests run on this device; on a GPU machine:
#   MACAW_TEST_DEVICE=cuda python -m pytest test_macaw.py -k "authors or paper_width or same_meta_gradient or merged"
DEVICE = os.environ.get("MACAW_TEST_DEVICE", "cpu")


def small_config(**kw):
    kw = dict(dict(net_width=32, inner_batch=32, outer_batch=32, eval_batch=32), **kw)
    return macaw.Config(**kw)


def random_batch(n, obs_dim=5, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(n, obs_dim, generator=g), actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
                mc_return=torch.randn(n, generator=g) * 10, terminal_obs=torch.randn(n, obs_dim, generator=g),
                terminal_discount=torch.rand(n, generator=g))


# ------------------------------------------------------------------------------------------------
# Fidelity: one meta-step recorded from the authors' code (fixtures/README.md lists tolerances).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True, map_location=DEVICE)


# The authors' names of the step-size and lambda parameters -> this project's (used through softplus).
RAW_NAMES = {"policy_log_lrs": "raw_policy_lrs", "value_log_lrs": "raw_value_lrs", "adv_coef_log": "raw_adv_coef"}


def fixture_model(fx, cfg):
    model = macaw.MACAW(5, 2, cfg).to(DEVICE)
    state = {f"{net}.{k}": v for net in ("policy", "value") for k, v in fx["init"][net].items()}
    state.update({ours: fx["init"][theirs] for theirs, ours in RAW_NAMES.items()})
    model.load_state_dict(state)
    assert list(dict(model.policy.named_parameters())) == fx["policy_param_names"]
    assert list(dict(model.value.named_parameters())) == fx["value_param_names"]
    return model


def fixture_batches(fx):
    def convert(b):
        return dict(obs=b["obs"], actions=b["actions"], mc_return=b["mc_rewards"][:, 0],
                    terminal_obs=b["terminal_obs"], terminal_discount=b["terminal_discounts"][:, 0])
    return [(convert(b["inner"]), convert(b["outer"])) for b in fx["batches"]]


# Every form of the meta-step: (meta_losses, adapt) of section 6 as written (--plain) and of section 10's
# faster forms: vmap + fast inner step with autograd's own T gradients, and the default (merged T gradients).
PATHS = {"plain (section 6)": (macaw.meta_losses, macaw.adapt),
         "vmap (autograd T)": (lambda model, batches, cfg: macaw.fast_meta_losses(model, batches, cfg, merge=False),
                               macaw.fast_adapt),
         "default (merged T)": (macaw.fast_meta_losses, macaw.fast_adapt)}


@pytest.mark.parametrize("path", PATHS)
def test_reproduces_authors_meta_step(fx, path):
    torch.set_num_threads(2)  # the fixture was recorded with 2 threads
    try:
        settings = fx["settings"]  # the authors' standard.json values (this project's value lr differs)
        meta_losses, adapt = PATHS[path]
        cfg = small_config(device=DEVICE,
                           outer_value_lr=settings["outer_value_lr"],
                           outer_policy_lr=settings["outer_policy_lr"], outer_log_lr_lr=settings["log_lr_lr"])
        model = fixture_model(fx, cfg)
        batches = fixture_batches(fx)
        optimizers = macaw.make_optimizers(model, cfg)
        losses = meta_losses(model, batches, cfg)
        names = dict(inner_value="inner_value_loss", outer_value="outer_value_loss",
                     inner_policy="inner_policy_loss", inner_head="inner_policy_head_loss",
                     outer_policy="outer_policy_loss")
        for t, ref in enumerate(fx["per_task"]):
            for ours, theirs in names.items():
                assert losses[ours][t].item() == pytest.approx(ref[theirs].item(), rel=1e-5), (t, ours)
            # AWR weights and advantage means, recomputed from the adapted value function
            vparams, pparams = model.params()
            inner, outer = batches[t]
            adapted_v, _, _, _ = adapt(model, vparams, pparams, inner, cfg)
            for key, batch in (("inner", inner), ("outer", outer)):
                adv = macaw.advantages(model.value, adapted_v, batch)
                torch.testing.assert_close(macaw.awr_weights(adv, cfg.adv_clip), ref[f"{key}_awr_weights"],
                                           rtol=1e-5, atol=0)
                assert adv.mean().item() == pytest.approx(ref[f"{key}_advantage_mean"].item(), rel=1e-5)

        total = (losses["outer_value"].sum() + losses["outer_policy"].sum()) / len(batches)
        for opt in optimizers:
            opt.zero_grad()
        total.backward()
        grads = fx["meta_grads"]
        for net in ("policy", "value"):
            for name, p in getattr(model, net).named_parameters():
                ref = grads[net][name]
                assert ((p.grad - ref).norm() / ref.norm()).item() <= 3e-5, name
                assert torch.equal(p.grad == 0, ref == 0), f"zero pattern of {name}"
        for key in ("policy_log_lrs", "value_log_lrs"):
            g, ref = getattr(model, RAW_NAMES[key]).grad, grads[key]
            assert ((g - ref).norm() / ref.norm()).item() <= 1e-4, key
            has_grad = torch.tensor(grads[f"{key}_has_grad"], device=DEVICE)
            assert torch.all(g[~has_grad] == 0) and torch.all(g[has_grad] != 0), key
        assert model.raw_adv_coef.grad.item() == pytest.approx(grads["adv_coef_log"].item(), rel=1e-5)

        for opt in optimizers:
            opt.step()
        after = fx["after_step"]
        for net, atol in (("policy", 1e-5), ("value", 1e-6)):
            params = dict(getattr(model, net).named_parameters())
            for name, ref in after[net].items():
                torch.testing.assert_close(params[name].detach(), ref, atol=atol, rtol=0)
        for theirs, ours in RAW_NAMES.items():
            torch.testing.assert_close(getattr(model, ours).detach(), after[theirs], atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Pieces against closed forms.
# ------------------------------------------------------------------------------------------------
def test_monte_carlo_targets_closed_form():
    g = 0.9
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32)
    next_obs = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    ends = np.array([0, 0, 1, 0, 1], bool)  # two episodes: steps 0-2 and 3-4
    mc, term_obs, term_disc = macaw.monte_carlo_targets(rewards, next_obs, ends, g)
    np.testing.assert_allclose(mc, [1 + g * 2 + g * g * 3, 2 + g * 3, 3, 10 + g * 20, 20], rtol=1e-6)
    np.testing.assert_allclose(term_disc, [g ** 3, g ** 2, g, g ** 2, g], rtol=1e-6)
    np.testing.assert_array_equal(term_obs[:, 0], [2, 2, 2, 4, 4])  # s_T = next obs of the last step


def test_no_bootstrap_after_a_true_termination():
    """A fall ends the first episode, the time limit the second: only the second adds
    gamma^(T-t) V(s_T); --bootstrap-terminations (the authors' code) bootstraps both."""
    g = 0.9
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32)
    next_obs = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    ends = np.array([0, 0, 1, 0, 1], bool)
    fell = np.array([0, 0, 1, 0, 0], bool)
    mc, _, term_disc = macaw.monte_carlo_targets(rewards, next_obs, ends, g, terminations=fell)
    np.testing.assert_allclose(mc, [1 + g * 2 + g * g * 3, 2 + g * 3, 3, 10 + g * 20, 20], rtol=1e-6)
    np.testing.assert_allclose(term_disc, [0, 0, 0, g ** 2, g], rtol=1e-6)
    data = dict(rewards=rewards, next_observations=next_obs, observations=next_obs,
                actions=np.zeros((5, 1), np.float32), terminations=fell, truncations=ends & ~fell,
                collector_return=1.0, random_return=0.0)
    for flag, expected in (([], [0, 0, 0, g ** 2, g]), (["--bootstrap-terminations"], [g ** 3, g ** 2, g, g ** 2, g])):
        cfg = macaw.parse_config(["--env", "point-robot", "--discount", "0.9", *flag])
        disc = macaw.TaskData(data, cfg).tensors["terminal_discount"].numpy()
        np.testing.assert_allclose(disc, expected, rtol=1e-6)
        value = lambda v_end: (macaw.torch.as_tensor(mc) + macaw.torch.as_tensor(disc) * v_end)[:3]
        assert (value(100.0) == value(0.0)).all() != bool(flag)  # after the fall, V(s_T) adds nothing


def test_buffer_skip_keeps_every_kth_row_with_targets_from_whole_episodes():
    """--buffer-skip 3 keeps rows 0, 3, 6, ... of a task's data; their Monte-Carlo targets are the ones computed
    from the whole episodes before the rows were dropped (as the authors subsample)."""
    rng = np.random.default_rng(0)
    n = 40
    ends = np.zeros(n, bool)
    ends[[9, 24, 39]] = True
    data = dict(rewards=rng.normal(size=n).astype(np.float32), next_observations=rng.normal(size=(n, 2)).astype(np.float32),
                observations=rng.normal(size=(n, 2)).astype(np.float32), actions=rng.normal(size=(n, 1)).astype(np.float32),
                terminations=np.zeros(n, bool), truncations=ends, collector_return=1.0, random_return=0.0)
    full = macaw.TaskData(data, macaw.parse_config(["--env", "point-robot"])).tensors
    kept = macaw.TaskData(data, macaw.parse_config(["--env", "point-robot", "--buffer-skip", "3"])).tensors
    for k in macaw.BATCH_FIELDS:
        torch.testing.assert_close(kept[k], full[k][::3])


def test_awr_weights_standardised_and_clipped():
    adv = torch.cat([torch.linspace(-2, 2, 200), torch.tensor([100.0])])
    w = macaw.awr_weights(adv, 20.0)
    normalised = (adv - adv.mean()) / adv.std(unbiased=True)  # the outlier's A_n is ~14 > log 20
    torch.testing.assert_close(w[:200], torch.exp(normalised[:200]))
    assert w[200].item() == pytest.approx(20.0)  # exp(min(A_n, log 20))
    assert torch.allclose(macaw.awr_weights(adv * 7 + 3, 20.0), w)  # invariant to scale and shift


def test_weight_transform_layer_shapes_and_scale():
    torch.manual_seed(0)
    layer = macaw.WLinear(100, 100, latent_dim=100)
    assert layer.z.shape == (100,) and layer.fc.weight.shape == (100 * 100 + 100, 100)
    x = torch.randn(4096, 100)
    y = layer(x)
    assert y.shape == (4096, 100)
    y_linear = torch.nn.Linear(100, 100)(x)
    ratio = y.std() / y_linear.std()
    assert 0.5 < ratio < 2, ratio  # same output scale as a default nn.Linear at width 100
    theta = layer.fc(layer.z)  # row-major W: W[i, j] = theta[i * out + j]
    torch.testing.assert_close(y, x @ theta[:10000].view(100, 100) + theta[10000:])


# ------------------------------------------------------------------------------------------------
# Mechanics of meta-learning (learn2learn style).
# ------------------------------------------------------------------------------------------------
def test_one_inner_step_lowers_inner_losses():
    torch.manual_seed(0)
    cfg = small_config()  # the default step sizes, softplus(l) ~ 1e-3
    model = macaw.MACAW(5, 2, cfg)
    batch = random_batch(32)
    vparams, pparams = model.params()
    adapted_v, adapted_p, _, stats = macaw.adapt(model, vparams, pparams, batch, cfg)
    after_v = macaw.value_loss(model.value, adapted_v, batch, batch["mc_return"])
    assert after_v.item() < stats["inner_value"].item()
    adv = macaw.advantages(model.value, adapted_v, batch)
    before_pi, _ = macaw.inner_policy_loss(model.policy, pparams, model.raw_adv_coef, batch, adv, cfg)
    after_pi, _ = macaw.inner_policy_loss(model.policy, adapted_p, model.raw_adv_coef, batch, adv, cfg)
    assert after_pi.item() < before_pi.item()


@pytest.mark.parametrize("flags", [{}, dict(weight_transform=False), dict(adv_head=False)],
                         ids=["macaw", "no-weight-transform", "no-adv-head"])
def test_meta_gradients_reach_every_meta_parameter(flags):
    torch.manual_seed(0)
    cfg = small_config(**flags)
    model = macaw.MACAW(5, 2, cfg)
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(2)]
    macaw.meta_train_step(model, macaw.make_optimizers(model, cfg), batches, 2, cfg)
    head = [i for i, name in enumerate(dict(model.policy.named_parameters())) if name.startswith("head_seq")]
    for name, p in model.named_parameters():
        if name == "raw_adv_coef" and not cfg.adv_head:
            continue  # lambda is unused without the head
        assert p.grad is not None and torch.any(p.grad != 0), name
    trunk = [i for i in range(len(model.raw_policy_lrs)) if i not in head]
    assert torch.all(model.raw_policy_lrs.grad[trunk] != 0)  # every trunk step size gets a meta-gradient
    assert torch.all(model.raw_value_lrs.grad != 0)
    # the head is absent from the outer loss, so its step sizes get none (as in the authors' code)
    assert torch.all(model.raw_policy_lrs.grad[head] == 0)
    if cfg.adv_head:
        assert model.raw_adv_coef.grad.item() != 0  # lambda, reached only through theta'


@pytest.mark.parametrize("method", ["meta-bc", "mt-awr"])
def test_each_baseline_takes_a_meta_step_and_its_gradients_reach_its_parameters(method):
    torch.manual_seed(0)
    cfg = small_config(method=method).resolve(macaw.BENCHMARKS["point-robot"])
    assert not cfg.adv_head  # the head belongs to MACAW's inner loss
    model = macaw.MACAW(5, 2, cfg)
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(2)]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    stats = macaw.meta_train_step(model, macaw.make_optimizers(model, cfg), batches, 2, cfg)
    assert all(np.isfinite(v) for v in stats.values())
    # Meta-BC learns the policy and its step sizes (no rewards, so no value function);
    # MT-AWR learns the policy and the value function (no inner step, so no step sizes).
    learned = ["policy.", "raw_policy_lrs"] if method == "meta-bc" else ["policy.", "value."]
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in learned):
            assert p.grad is not None and torch.any(p.grad != 0), name
            assert not torch.equal(p.detach(), before[name]), name
        else:
            assert p.grad is None or not torch.any(p.grad != 0), name


def test_bc_loss_is_the_gaussian_negative_log_likelihood_of_the_actions():
    class Constant(torch.nn.Module):  # mu(s) = m for every state
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Parameter(torch.zeros(2))

        def forward(self, obs):
            return self.m.expand(len(obs), 2)

    batch = dict(obs=torch.zeros(2, 3), actions=torch.tensor([[0.1, 0.1], [0.3, -0.1]]))
    # With sigma = 0.2 and mu = (0.1, 0.1): squared z-scores 0 + 0 and 1 + 1, so the per-row NLLs are
    # 2 c and 2 c + 1 with c = log 0.2 + 0.5 log(2 pi) = -0.69053 ...; their mean is 2 c + 0.5.
    c = math.log(0.2) + 0.5 * math.log(2 * math.pi)
    loss = macaw.bc_loss(Constant(), {"m": torch.tensor([0.1, 0.1])}, batch, macaw.Config(action_sigma=0.2))
    assert loss.item() == pytest.approx(2 * c + 0.5, abs=1e-6)


def test_mt_awr_fine_tuning_lowers_its_loss_and_the_task_id_is_zeroed_for_test_tasks():
    torch.manual_seed(0)
    bench = macaw.BENCHMARKS["point-robot"]
    cfg = small_config(method="mt-awr")
    train_code, test_code = macaw.task_code(cfg, bench, bench.train_ids[3]), macaw.task_code(cfg, bench, bench.test_ids[0])
    assert train_code.sum() == 1 and train_code[bench.train_ids[3]] == 1 and not test_code.any()
    assert macaw.task_code(small_config(), bench, 0) is None  # the meta-learners get no task id
    model = macaw.MACAW(5 + len(bench.tasks), 2, cfg)
    batch = random_batch(32, obs_dim=5 + len(bench.tasks))
    loss = lambda pparams, vparams: sum(macaw.multitask_losses(model, vparams, pparams, batch, cfg).values()).item()
    vparams, pparams = model.params()
    _, tuned = macaw.finetune(model, batch, cfg)
    assert loss(tuned, vparams) < loss(pparams, vparams)


def meta_gradient(meta_losses, cfg, batches, obs_dim=5, act_dim=2):
    torch.manual_seed(0)
    model = macaw.MACAW(obs_dim, act_dim, cfg).to(DEVICE)
    batches = [tuple({k: v.to(DEVICE) for k, v in b.items()} for b in pair) for pair in batches]
    losses = meta_losses(model, batches, cfg)
    ((losses["outer_value"].sum() + losses["outer_policy"].sum()) / len(batches)).backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}, losses


def test_fast_and_plain_inner_steps_agree_at_paper_width():
    """The fast form (no stepped copy of T) is the same function as the plain form: same adapted
    weights, same losses, same meta-gradient for every meta-parameter, at the paper's sizes."""
    batches = [(random_batch(256, 17, 6, seed=2 * t), random_batch(256, 17, 6, seed=2 * t + 1)) for t in range(2)]
    def fast_loop(model, batches, cfg):  # the fast inner step alone, in section 6's loop over tasks
        losses = [macaw.fast_task_meta_losses(model, *model.params(), inner, outer, cfg) for inner, outer in batches]
        return {k: torch.stack([l[k] for l in losses]) for k in losses[0]}
    fast, fast_losses = meta_gradient(fast_loop, macaw.Config(device=DEVICE), batches, 17, 6)
    plain, plain_losses = meta_gradient(macaw.meta_losses, macaw.Config(device=DEVICE), batches, 17, 6)
    for key in fast_losses:
        torch.testing.assert_close(fast_losses[key], plain_losses[key], rtol=1e-5, atol=0)
    for name, g in plain.items():
        assert ((fast[name] - g).norm() / g.norm()).item() <= 1e-5, name
    torch.manual_seed(0)
    model = macaw.MACAW(17, 6, macaw.Config()).to(DEVICE)
    inner = {k: v.to(DEVICE) for k, v in batches[0][0].items()}
    adapted = [adapt(model, *model.params(), inner, macaw.Config()) for adapt in (macaw.fast_adapt, macaw.adapt)]
    x = torch.randn(64, 17, device=DEVICE)
    for index, net in ((0, model.value), (1, model.policy), (2, model.value)):  # phi', theta', phibar
        out_fast, out_plain = (torch.func.functional_call(net, a[index], (x,)) for a in adapted)
        torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags", [{}, dict(weight_transform=False), dict(method="meta-bc"), dict(method="mt-awr")],
                         ids=["macaw", "no-weight-transform", "meta-bc", "mt-awr"])
def test_plain_and_fast_forms_give_the_same_meta_gradient(flags):
    """Section 6's loop over tasks with the plain step and section 10's default form are the same function,
    for MACAW, its ablation and both baselines."""
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(3)]
    grads = [meta_gradient(f, small_config(device=DEVICE, **flags), batches)[0]
             for f in (macaw.meta_losses, macaw.fast_meta_losses)]
    for name, g in grads[0].items():
        if not g.any():  # Meta-BC never uses its value function
            assert not grads[1][name].any(), name
            continue
        assert ((grads[1][name] - g).norm() / g.norm()).item() < 1e-4, name


@pytest.mark.parametrize("method", ["macaw", "meta-bc"])
def test_merged_transform_gradients_equal_autograds_own(method):
    """The default path forms each T's meta-gradient in one product from probes (merged_transform_losses);
    autograd through the same vmapped fast form (merge off) must give the same gradients, also when
    backward() reaches only part of the losses (probes that J does not reach)."""
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(3)]
    for keys in (("outer_value", "outer_policy"), ("outer_policy",)):
        grads = []
        for merge in (True, False):
            torch.manual_seed(0)
            cfg = small_config(method=method, device=DEVICE)
            model = macaw.MACAW(5, 2, cfg).to(DEVICE)
            data = [tuple({k: v.to(DEVICE) for k, v in b.items()} for b in pair) for pair in batches]
            losses = macaw.fast_meta_losses(model, data, cfg, merge=merge)
            sum(losses[k].sum() for k in keys).backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
        for name, g in grads[1].items():
            if g is None or not g.any():
                assert grads[0][name] is None or not grads[0][name].any(), name
                continue
            assert ((grads[0][name] - g).norm() / g.norm()).item() < 1e-5, name
        assert any(macaw.is_transform_matrix(n) and g is not None and g.any() for n, g in grads[0].items())


def test_an_edited_fast_adapt_that_drops_the_probes_fails_loudly(monkeypatch):
    """An edit of fast_adapt that does not pass its probes on would make the merged T gradients wrong: backward()
    says so instead, and names the fix."""
    cfg = small_config()
    model = macaw.MACAW(5, 2, cfg)
    original = macaw.fast_adapt
    monkeypatch.setattr(macaw, "fast_adapt", lambda model, v, p, inner, cfg, probes=(None, None):
                        original(model, v, p, inner, cfg))
    batches = [(random_batch(32, seed=0), random_batch(32, seed=1))]
    losses = macaw.fast_meta_losses(model, batches, cfg)
    with pytest.raises(RuntimeError, match="--plain"):
        losses["outer_value"].sum().backward()


@pytest.mark.parametrize("name", ["adapt", "task_meta_losses", "sgd_step"])
def test_a_replaced_section_6_function_stops_the_fast_forms_with_the_fix(tmp_path, monkeypatch, name):
    """The faster forms would silently ignore an edit of section 6 (an exercise's two inner steps, say): a run
    that would take them stops with one line naming --plain, and with --plain the edit is what runs."""
    calls = []
    original = getattr(macaw, name)
    monkeypatch.setattr(macaw, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    flags = ["--env", "point-robot", "--steps", "2", "--eval-every", "2", "--net-width", "8", "--latent-dim", "4",
             "--final-eval-rollouts", "1", "--eval-rollouts", "1", "--data-dir", str(tmp_path / "data"),
             "--out", str(tmp_path / "runs")]
    with pytest.raises(macaw.UserError, match="section 6 of macaw.py was edited.*--plain"):
        macaw.train(macaw.parse_config(flags))
    macaw.train(macaw.parse_config(flags + ["--plain", "--run-name", "plain"]))
    assert calls


def test_an_edit_of_section_6_in_the_file_stops_a_default_run_and_runs_with_plain(tmp_path):
    """An edit made in the file (not swapped in) is caught too: section 10 mirrors section 6 as recorded in
    SECTION_6_SOURCE, which this test also holds to the file as it is."""
    macaw.check_section_6()  # if this fails after a change of section 6: check that section 10 still mirrors it,
    # then set SECTION_6_SOURCE to the fingerprint the error names
    edited = (HERE / "macaw.py").read_text().replace(
        '    adapted_v = sgd_step(vparams, v_grads, model.raw_value_lrs)  # phi\' = phi - alpha_V * grad',
        '    adapted_v = sgd_step(vparams, v_grads, model.raw_value_lrs)  # phi\' = phi - alpha_V * grad (edited)')
    assert "(edited)" in edited
    (tmp_path / "macaw.py").write_text(edited)
    flags = [*TINY, "--steps", "2", "--eval-every", "2", "--data-dir", str(tmp_path / "data")]
    run = lambda *extra: subprocess.run([sys.executable, str(tmp_path / "macaw.py"), *flags, *extra], cwd=tmp_path,
                                        capture_output=True, text=True, timeout=600)
    default = run()
    assert default.returncode == 2 and "--plain" in default.stderr.strip().splitlines()[-1]
    assert run("--plain").returncode == 0


def test_meta_training_changes_step_sizes_and_memory_stays_flat():
    torch.manual_seed(0)
    cfg = small_config()
    model = macaw.MACAW(5, 2, cfg)
    opts = macaw.make_optimizers(model, cfg)
    before = model.raw_policy_lrs.detach().clone()
    batches = [(random_batch(32, seed=t), random_batch(32, seed=t + 10)) for t in range(2)]
    for _ in range(3):
        macaw.meta_train_step(model, opts, batches, 2, cfg)
    assert not torch.equal(before, model.raw_policy_lrs.detach())
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())  # no graph kept alive

    def live_tensors():  # nothing of a step (graph, probes, hooks) may outlive it
        gc.collect()
        return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())
    counts = [live_tensors()]
    for _ in range(4):
        macaw.meta_train_step(model, opts, batches, 2, cfg)
        counts.append(live_tensors())
    assert counts[-1] <= counts[0], counts


# ------------------------------------------------------------------------------------------------
# Tasks, data, evaluation.
# ------------------------------------------------------------------------------------------------
def test_cheetah_dir_tasks_have_opposite_rewards():
    bench = macaw.BENCHMARKS["cheetah-dir"]
    returns = []
    for k in bench.test_ids:
        env = macaw.make_task_env(bench, k)  # what evaluate() uses for task k
        env.reset(seed=0)
        rewards, speeds = [], []
        for t in range(30):
            _, r, _, _, info = env.step(np.full(6, 0.5 if t % 2 else -0.5, np.float32))
            rewards.append(r)
            speeds.append(info["x_velocity"])
        returns.append((np.array(rewards), np.array(speeds)))
    (r_fwd, v), (r_bwd, _) = returns
    ctrl = 0.05 * 6 * 0.25
    np.testing.assert_allclose(r_fwd, v - ctrl, atol=1e-6)
    np.testing.assert_allclose(r_bwd, -v - ctrl, atol=1e-6)
    assert np.sign(np.sum(r_fwd + ctrl)) == -np.sign(np.sum(r_bwd + ctrl)) != 0


def test_mujoco_warnings_reach_stderr_but_not_the_settotalmass_one(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo's own handler would write MUJOCO_LOG.TXT here
    before = macaw.mujoco.get_mju_user_warning()
    with macaw.mujoco_warnings():  # what a run and a data worker install while they last
        macaw.make_task_env(macaw.BENCHMARKS["cheetah-vel"], 0).reset(seed=0)  # half_cheetah.xml: 'settotalmass'
        macaw.mujoco_warning("Nan, Inf or huge value in QACC at DOF 0")
    err = capfd.readouterr().err
    assert "settotalmass" not in err and "MuJoCo warning: Nan, Inf" in err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert macaw.mujoco.get_mju_user_warning() is before  # importing or running leaves the process's handler
    macaw.make_task_env(macaw.BENCHMARKS["cheetah-vel"], 0)  # outside a run too (the studies build envs)
    assert "settotalmass" not in capfd.readouterr().err and not (tmp_path / "MUJOCO_LOG.TXT").exists()


def body_xy(env):
    """Cheetah and walker: the root's x (qpos[0], as the authors' envs); ant: the torso's x, y (as gymnasium's)."""
    data = env.unwrapped.data
    return data.body("torso").xpos[:2].copy() if isinstance(env, macaw.AntDir) else np.array([data.qpos[0], 0.0])


@pytest.mark.parametrize("env_name", ["cheetah-vel", "ant-dir", "walker-params"])
def test_task_rewards_match_the_simulators_velocities(env_name):
    """The reward is recomputed here from the simulator's own positions before and after each step."""
    bench = macaw.BENCHMARKS[env_name]
    rng = np.random.default_rng(0)
    for k in bench.test_ids[:2]:
        env = macaw.make_task_env(bench, k)
        env.reset(seed=k)
        task = bench.tasks[k]
        for _ in range(20):
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            before = body_xy(env)
            _, reward, terminated, _, info = env.step(action)
            velocity = (body_xy(env) - before) / env.unwrapped.dt
            if env_name == "cheetah-vel":
                expected = -abs(velocity[0] - task) - 0.05 * np.sum(action ** 2)
            elif env_name == "walker-params":  # v_x + 1 (while healthy) - 1e-3 ||a||^2, whatever the physics
                expected = velocity[0] + float(not terminated) - 1e-3 * np.sum(action ** 2)
            else:  # ctrl 0.5 ||a||^2, contact cost from the simulator, +1 while healthy
                healthy = float(not terminated)
                expected = (velocity @ [np.cos(task), np.sin(task)] - 0.5 * np.sum(action ** 2)
                            + info["reward_contact"] + healthy)
                assert info["reward_contact"] <= 0
            assert reward == pytest.approx(expected, abs=1e-5)
            if terminated:
                break


@pytest.mark.parametrize("env_name", ["cheetah-vel", "ant-dir", "walker-params"])
def test_episodes_last_200_steps_and_ant_and_walker_fall(env_name):
    env = macaw.make_task_env(macaw.BENCHMARKS[env_name], 0)
    assert env.observation_space.shape == {"cheetah-vel": (17,), "ant-dir": (27,), "walker-params": (17,)}[env_name]
    assert macaw.time_limit(env)._max_episode_steps == 200
    if env_name != "walker-params":  # a still policy: the cheetah and the ant stand until the time limit
        env.reset(seed=0)
        steps, terminated, truncated = 0, False, False
        while not (terminated or truncated):
            _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, np.float32))
            steps += 1
        assert (steps, terminated, truncated) == (200, False, True)
    if env_name != "cheetah-vel":  # full-force random actions: the walker falls, the ant flips or jumps
        rng, fell = np.random.default_rng(0), 0
        for episode in range(10):
            env.reset(seed=episode)
            for t in range(200):
                _, _, terminated, truncated, _ = env.step(rng.choice([-1.0, 1.0], env.action_space.shape))
                if terminated or truncated:
                    fell += terminated and t < 199
                    break
        assert fell > 0


def test_a_task_switch_changes_the_reward_or_the_dynamics():
    def trajectory(bench, k, env=None):
        env = env or macaw.make_task_env(bench, k)
        env.set_task(bench.tasks[k])
        env.reset(seed=0)
        rng, out = np.random.default_rng(1), []
        for _ in range(50):
            obs, reward, terminated, truncated, _ = env.step(rng.uniform(-0.5, 0.5, env.action_space.shape))
            out.append(np.append(obs, reward))
            if terminated or truncated:
                break
        return np.array(out)
    for name in ("cheetah-vel", "ant-dir"):  # same dynamics, another reward
        bench = macaw.BENCHMARKS[name]
        a, b = trajectory(bench, 0), trajectory(bench, 1)
        np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
        assert not np.allclose(a[:, -1], b[:, -1])
    bench = macaw.BENCHMARKS["walker-params"]  # same actions, other physics -> another trajectory
    env = macaw.make_task_env(bench, 0)
    first = trajectory(bench, 0, env)
    assert not np.allclose(first[:10, :-1], trajectory(bench, 1, env)[:10, :-1])
    np.testing.assert_array_equal(first, trajectory(bench, 0, env))  # task 0 again, after task 1 and resets
    np.testing.assert_array_equal(first, trajectory(bench, 0))  # and the same as in a fresh env
    fresh = macaw.make_task_env(bench, 0)
    fresh.set_task(bench.tasks[7])
    model, original = fresh.unwrapped.model, fresh.original
    ratio = model.body_mass[1:] / original["body_mass"][1:]  # the world body has no mass
    assert np.all((ratio >= 1.5 ** -3) & (ratio <= 1.5 ** 3)) and not np.allclose(ratio, 1)
    ratio = model.dof_damping[3:] / original["dof_damping"][3:]  # the root joints have no damping
    assert np.all((ratio >= 1.3 ** -3) & (ratio <= 1.3 ** 3)) and not np.allclose(ratio, 1)


def test_task_parameters_are_fixed_and_held_out_tasks_never_reach_meta_training():
    for name in ("cheetah-vel", "ant-dir", "walker-params", "point-robot"):
        bench = macaw.BENCHMARKS[name]
        assert not set(bench.train_ids) & set(bench.test_ids)
        assert sorted(bench.train_ids + bench.test_ids) == list(range(len(bench.tasks)))
    assert [len(macaw.BENCHMARKS[n].train_ids) for n in ("cheetah-vel", "ant-dir", "walker-params")] == [35, 45, 45]
    assert macaw.BENCHMARKS["ant-dir"].tasks[:2] == pytest.approx(np.random.default_rng(0).uniform(0, 2 * np.pi, 2))

    class HeldOut:  # a held-out task's data: any use of it fails the test
        def __getattr__(self, name):
            raise AssertionError("a held-out task's data was used in meta-training")
    bench = macaw.BENCHMARKS["cheetah-vel"]
    cfg = small_config(env="cheetah-vel", meta_batch=5)
    data = {k: HeldOut() for k in bench.test_ids}
    train = macaw.TaskData(dict(
        observations=np.zeros((300, 5), np.float32), actions=np.zeros((300, 2), np.float32),
        rewards=np.zeros(300, np.float32), next_observations=np.zeros((300, 5), np.float32),
        terminations=np.zeros(300, bool), truncations=np.arange(300) % 100 == 99,
        collector_return=1.0, random_return=0.0), cfg)
    data.update({k: train for k in bench.train_ids})
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert len(macaw.sample_meta_batch(data, bench.train_ids, cfg, gen)) == 5


def test_evaluate_switches_env_to_the_evaluated_task(monkeypatch):
    bench = macaw.BENCHMARKS["cheetah-dir"]
    made = []
    original = macaw.make_task_env
    monkeypatch.setattr(macaw, "make_task_env", lambda b, k: made.append(k) or original(b, k))
    monkeypatch.setattr(macaw, "rollout", lambda env, act, seed: env.task)  # the "return" is the env's task
    cfg = small_config(env="cheetah-dir")
    model = macaw.MACAW(17, 6, cfg)
    data = [FakeTaskData(17, 6) for _ in bench.tasks]
    results = macaw.evaluate(model, bench, data, cfg, torch.Generator().manual_seed(0))
    assert made == [0, 1]
    assert results[0]["post"] == 1.0 and results[1]["post"] == -1.0


class FakeTaskData:
    def __init__(self, obs_dim, act_dim):
        self.batch = random_batch(32, obs_dim, act_dim)
        self.code = None

    def random_batch(self, n, gen):
        return self.batch


def write_point_data(tmp_path):
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path), collector_steps=400)
    bench = macaw.BENCHMARKS["point-robot"]
    cfg = cfg.resolve(bench)
    macaw.ensure_data(cfg, bench)
    return cfg, bench


def test_data_files_have_the_documented_keys_and_are_reused(tmp_path):
    cfg, bench = write_point_data(tmp_path)
    path = macaw.task_data_path(cfg, 0)
    data = macaw.load_task_data(path, bench, 0)
    for key in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations",
                "task", "collector_return", "random_return", "seed", "format_version"):
        assert key in data
    mtime = path.stat().st_mtime_ns
    macaw.ensure_data(cfg, bench)
    assert path.stat().st_mtime_ns == mtime  # reused, not regenerated
    assert not list(Path(tmp_path).rglob("*.tmp"))
    other = dataclasses.replace(cfg, collector_steps=cfg.collector_steps + 100)  # e.g. a changed default
    with pytest.raises(macaw.UserError, match="--regenerate-data"):
        macaw.load_benchmark_data(other, bench)
    assert path.stat().st_mtime_ns == mtime  # the old data are left alone


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "nan", "other_env"])
def test_broken_data_file_gives_a_clear_error(tmp_path, damage):
    cfg, bench = write_point_data(tmp_path)
    path = macaw.task_data_path(cfg, 3)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        data = dict(np.load(path))
        if damage == "wrong_shape":
            data["observations"] = data["observations"][:, :1]
        elif damage == "nan":
            data["rewards"][5] = np.nan
        else:
            data["env"] = np.array("cheetah-dir")
        np.savez(path, **data)
    with pytest.raises(macaw.UserError) as err:
        macaw.load_benchmark_data(cfg, bench)
    message = str(err.value)
    assert str(path) in message and "--regenerate-data" in message and "\n" not in message


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "file.npz"
    target.write_bytes(b"old contents")

    def interrupted_write(f):
        f.write(b"half of the new con")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        macaw.atomic_write(target, interrupted_write)
    assert target.read_bytes() == b"old contents"
    assert list(tmp_path.iterdir()) == [target]

    def disk_full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(macaw.WriteError, match="No space left on device") as err:
        macaw.atomic_write(target, disk_full, keep_previous=True)
    assert str(target) in str(err.value)
    assert target.read_bytes() == b"old contents"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file, no rotation


# ------------------------------------------------------------------------------------------------
# The product: CLI, reproducibility, checkpoints, learning.
# ------------------------------------------------------------------------------------------------
def cli(*args):
    """`python macaw.py ARGS` and its environment, for subprocess.run or Popen."""
    return [sys.executable, str(HERE / "macaw.py"), *args], dict(os.environ, PYTHONPATH=str(HERE))


def run_cli(*args, cwd):
    command, env = cli(*args)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def read_log_without_timing(path):
    drop = ("time", "steps_per_s")
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in path.read_text().splitlines()]


TINY = ["--env", "point-robot", "--net-width", "16", "--latent-dim", "8", "--inner-batch", "32",
        "--outer-batch", "32", "--eval-batch", "32", "--final-eval-rollouts", "1", "--collector-steps", "400"]


def test_unknown_env_is_one_line_error(tmp_path):
    result = run_cli("--env", "nope", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cheetah-dir" in lines[0] and "point-robot" in lines[0]


@pytest.mark.parametrize("args, words", [(["--steps", "-3"], "--steps"),
                                          (["--inner-batch", "5000"], "batch"),
                                          (["--device", "nonsense"], "--device"),
                                          (["--method", "maml"], "mt-awr"),
                                          (["--collector-design", "both"], "--collector-design"),
                                          (["--collector-lr", "0"], "--collector-lr")])
def test_bad_flag_values_fail_before_work(tmp_path, args, words):
    result = run_cli(*TINY, *args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert not (tmp_path / "runs" / "point-robot-seed1" / "checkpoint.pt").exists()


def test_tiny_cli_run_writes_its_files_and_resumes(tmp_path):
    result = run_cli(*TINY, "--steps", "4", "--eval-every", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "point-robot-seed1"
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "curves.png", "summary.json", "versions.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("collector_return", "random_return", "pre_return", "post_return", "normalized"):
        assert key in summary["tasks"]["20"]
    assert summary["steps"] == 4 and summary["env"] == "point-robot"

    # The same command again must not overwrite the finished run.
    again = run_cli(*TINY, "--steps", "4", "--eval-every", "2", cwd=tmp_path)
    assert again.returncode != 0 and "--resume" in again.stderr
    assert json.loads((run / "summary.json").read_text()) == summary

    # Resume to 6 steps; it must log exactly what an uninterrupted 6-step run logs.
    result = run_cli("--resume", str(run), "--steps", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "at step 4" in result.stdout
    result = run_cli(*TINY, "--steps", "6", "--eval-every", "2", "--run-name", "straight", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = read_log_without_timing(run / "log.jsonl")
    straight = read_log_without_timing(tmp_path / "runs" / "straight" / "log.jsonl")
    assert [r["step"] for r in resumed] == [2, 4, 6]
    assert resumed == straight


def test_tiny_walker_params_run_through_the_cli_makes_valid_data_and_a_summary(tmp_path):
    """A new benchmark end to end: data for all 50 tasks (random-action collectors, falls included),
    a few meta-steps, evaluation on the 5 held-out tasks, and every adaptation's return."""
    args = [a if a != "point-robot" else "walker-params" for a in TINY]
    result = run_cli(*args, "--steps", "2", "--eval-every", "2", "--collector-steps", "300", "--eval-rollouts", "2",
                     "--final-eval-rollouts", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bench = macaw.BENCHMARKS["walker-params"]
    falls = 0
    for k in range(len(bench.tasks)):
        data = macaw.load_task_data(tmp_path / "data" / "walker-params" / f"task{k}.npz", bench, k)
        assert len(data["rewards"]) == 300 and int(data["collector_width"]) == 64
        falls += int(data["terminations"].sum())
    assert falls > 0
    data_flags = ["--env", "walker-params", "--collector-steps", "300", "--data-dir", str(tmp_path / "data")]
    path = tmp_path / "data" / "walker-params" / "task0.npz"
    same = macaw.parse_config(data_flags).resolve(bench)
    assert float(macaw.load_task_data(path, bench, 0, same)["collector_lr"]) == same.collector_lr == 3e-4
    other_lr = macaw.parse_config([*data_flags, "--collector-lr", "1e-3"]).resolve(bench)
    with pytest.raises(macaw.UserError, match="at lr 0.0003, this run asks for .* at lr 0.001 .*--collector-lr"):
        macaw.load_task_data(path, bench, 0, other_lr)
    summary = json.loads((tmp_path / "runs" / "walker-params-seed1" / "summary.json").read_text())
    assert sorted(summary["tasks"]) == sorted(str(k) for k in bench.test_ids)
    for t in summary["tasks"].values():
        assert len(t["post_returns"]) == 2 and t["post_return"] == pytest.approx(np.mean(t["post_returns"]))
    assert 0 <= summary["share_half"] <= 1
    log = [json.loads(line) for line in (tmp_path / "runs" / "walker-params-seed1" / "log.jsonl").open()]
    assert all(len(e["post_each"]) == 2 for e in log[-1]["eval"].values())


def test_same_seed_same_losses_and_checkpoint_roundtrip(tmp_path):
    cfg, bench = write_point_data(tmp_path)
    cfg = macaw.Config(**dict(vars(cfg), net_width=16, latent_dim=8, inner_batch=32, outer_batch=32))
    data = macaw.load_benchmark_data(cfg, bench)

    def run(steps):
        torch.manual_seed(0)
        model = macaw.MACAW(2, 2, cfg)
        opts = macaw.make_optimizers(model, cfg)
        gen = torch.Generator().manual_seed(0)
        losses = [macaw.meta_train_step(model, opts, macaw.sample_meta_batch(data, bench.train_ids, cfg, gen),
                                        len(bench.train_ids), cfg) for _ in range(steps)]
        return model, opts, gen, losses

    model, opts, gen, losses = run(3)
    assert losses == run(3)[3]
    path = tmp_path / "ckpt.pt"
    macaw.save_checkpoint(path, model, opts, gen, 3, 1.0, [], cfg)
    state = torch.load(path, weights_only=False)
    restored = macaw.MACAW(2, 2, cfg)
    restored.load_state_dict(state["model"])
    obs = torch.randn(7, 2)
    torch.testing.assert_close(restored.policy(obs), model.policy(obs), rtol=0, atol=0)
    torch.testing.assert_close(restored.value(obs), model.value(obs), rtol=0, atol=0)
    assert state["step"] == 3


def test_point_robot_adaptation_beats_unadapted_and_random(tmp_path):
    """End to end on held-out goals: one offline adaptation step must clearly help."""
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path / "data"), out=str(tmp_path / "runs"),
                       net_width=32, steps=150, eval_every=150, final_eval_rollouts=5)
    summary = macaw.train(cfg)
    tasks = summary["tasks"].values()  # returns are negative distances summed over 20 steps
    mean = lambda key: np.mean([t[key] for t in tasks])
    assert mean("post_return") > mean("pre_return") + 3, summary["tasks"]
    assert mean("post_return") > mean("random_return") + 5, summary["tasks"]
    assert all(t["post_return"] > t["random_return"] + 3 for t in tasks), summary["tasks"]
    assert summary["mean_normalized"] > 0.4


# ------------------------------------------------------------------------------------------------
# Reliability: interruption, resume, bad data, numerical faults, reproducibility.
# ------------------------------------------------------------------------------------------------
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=str(HERE))
    args = [sys.executable, str(HERE / "macaw.py"), *TINY, "--eval-every", "10"]
    proc = subprocess.Popen([*args, "--steps", "100000"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "runs" / "point-robot-seed1"
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps into the next logging interval
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last_line = err.strip().splitlines()[-1]  # (the lines above it are the progress bar)
    assert last_line.startswith("stopped: SIGTERM") and "--resume" in last_line
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert stopped_at >= 10

    end = stopped_at + 15  # finish mid-interval, so the losses carried over the stop are checked too
    resumed = subprocess.run([sys.executable, str(HERE / "macaw.py"), "--resume", str(run), "--steps", str(end)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*args, "--steps", str(end), "--run-name", "straight"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert read_log_without_timing(run / "log.jsonl") == read_log_without_timing(
        tmp_path / "runs" / "straight" / "log.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {**json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text()),
                       "wall_time_s": summary["wall_time_s"], "command": summary["command"],
                       "data_time_s": summary["data_time_s"]}


def test_same_seed_gives_the_same_evaluation_returns_and_records_versions(tmp_path):
    for name in ("a", "b"):
        result = run_cli(*TINY, "--steps", "6", "--eval-every", "3", "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    logs = [read_log_without_timing(tmp_path / "runs" / n / "log.jsonl") for n in ("a", "b")]
    assert logs[0] == logs[1] and "eval" in logs[0][0]
    versions = json.loads((tmp_path / "runs" / "a" / "versions.json").read_text())
    for key in ("python", "torch", "numpy", "gymnasium", "mujoco", "commit"):
        assert versions[key], key
    config = json.loads((tmp_path / "runs" / "a" / "config.json").read_text())
    assert config["steps"] == 6 and config["net_width"] == 16


def test_interrupted_data_generation_keeps_finished_tasks(tmp_path, monkeypatch):
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path), collector_steps=400)
    bench = macaw.BENCHMARKS["point-robot"]
    cfg = cfg.resolve(bench)
    original, calls = macaw.collect_scripted, []

    def collect_then_interrupt(env, steps, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third task is being collected
        return original(env, steps, seed)

    monkeypatch.setattr(macaw, "collect_scripted", collect_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        macaw.ensure_data(cfg, bench)
    written = sorted(p.name for p in (tmp_path / "point-robot").iterdir() if p.name != ".lock")
    assert written == ["task0.npz", "task1.npz"]  # no partial third file, no temporary leftovers
    mtimes = [macaw.task_data_path(cfg, k).stat().st_mtime_ns for k in (0, 1)]
    monkeypatch.setattr(macaw, "collect_scripted", original)
    macaw.ensure_data(cfg, bench)
    assert [macaw.task_data_path(cfg, k).stat().st_mtime_ns for k in (0, 1)] == mtimes  # reused
    assert len(macaw.load_benchmark_data(cfg, bench)) == len(bench.tasks)


@pytest.mark.parametrize("plain, losses_name", [(True, "meta_losses"), (False, "fast_meta_losses")],
                         ids=["plain", "default"])
def test_non_finite_loss_stops_with_step_terms_and_checkpoint(tmp_path, monkeypatch, plain, losses_name):
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path / "data"), out=str(tmp_path / "runs"),
                       net_width=16, latent_dim=8, inner_batch=32, outer_batch=32, eval_batch=32,
                       collector_steps=400, steps=10, eval_every=2, plain=plain)
    original, calls = getattr(macaw, losses_name), []

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            losses["outer_value"] = losses["outer_value"] * float("nan")
        return losses

    monkeypatch.setattr(macaw, losses_name, poisoned)
    with pytest.raises(macaw.UserError) as err:
        macaw.train(cfg)
    message = str(err.value)
    assert "non-finite loss at step 5" in message and "outer_value=nan" in message
    assert "checkpoint.pt (step 4)" in message
    state = torch.load(tmp_path / "runs" / "point-robot-seed1" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_refuses_non_finite_parameters(tmp_path):
    cfg = small_config()
    model = macaw.MACAW(5, 2, cfg)
    opts = macaw.make_optimizers(model, cfg)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"last good checkpoint")
    with torch.no_grad():
        model.value.seq.fc_0.z[0] = float("inf")
    with pytest.raises(macaw.NonFiniteError):
        macaw.save_checkpoint(path, model, opts, torch.Generator(), 1, 0.0, [], cfg)
    assert path.read_bytes() == b"last good checkpoint"


def test_unwritable_output_dir_fails_before_work(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_cli(*TINY, "--out", str(tmp_path / "a_file" / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0]
    assert not (tmp_path / "data").exists()  # no data generated


# ------------------------------------------------------------------------------------------------
# Reliability, part 2: damaged checkpoints, concurrent runs, failing writes, finished runs.
# ------------------------------------------------------------------------------------------------
def test_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]  # (in-process: main())
    assert macaw.main([*TINY, *places, "--steps", "4", "--eval-every", "2"]) == 0
    run = tmp_path / "runs" / "point-robot-seed1"
    assert torch.load(run / "checkpoint.prev.pt", weights_only=False)["step"] == 2  # kept beside the latest
    latest = run / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as by a full disk or a crash mid-copy

    capsys.readouterr()
    assert macaw.main(["--resume", str(run), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "checkpoint.prev.pt (step 2)" in out
    assert macaw.main([*TINY, *places, "--steps", "6", "--eval-every", "2", "--run-name", "straight"]) == 0
    assert read_log_without_timing(run / "log.jsonl") == read_log_without_timing(
        tmp_path / "runs" / "straight" / "log.jsonl")

    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(b"garbage")
    capsys.readouterr()
    assert macaw.main(["--resume", str(run), "--steps", "8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert str(run / "checkpoint.pt") in lines[0] and "damaged" in lines[0] and "--run-name" in lines[0]


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]  # (in-process: main())
    assert macaw.main([*TINY, *places, "--steps", "2", "--eval-every", "2"]) == 0
    run = tmp_path / "runs" / "point-robot-seed1"
    before = {name: (run / name).read_bytes() for name in ("summary.json", "log.jsonl", "checkpoint.pt")}
    capsys.readouterr()
    assert macaw.main(["--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "already finished at step 2" in out and "--steps" in out
    assert "meta-train" not in err  # no training, no final evaluation
    assert before == {name: (run / name).read_bytes() for name in before}


def wait_for(condition, timeout=120):
    import time
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_into_the_same_folder_stops_and_the_lock_dies_with_its_process(tmp_path):
    import signal
    env = dict(os.environ, PYTHONPATH=str(HERE))
    first = subprocess.Popen([sys.executable, str(HERE / "macaw.py"), *TINY, "--steps", "100000", "--eval-every", "5"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "point-robot-seed1"
    try:
        wait_for(lambda: (run / "checkpoint.pt").exists())
        second = run_cli(*TINY, "--steps", "10", cwd=tmp_path)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0] and "--run-name" in lines[0]
        first.send_signal(signal.SIGKILL)  # no clean-up code runs: only the OS can drop the lock
        first.wait(timeout=60)
    finally:
        first.kill()
    step = torch.load(run / "checkpoint.pt", weights_only=False)["step"] if (run / "checkpoint.pt").exists() else 5
    resumed = run_cli("--resume", str(run), "--steps", str(step + 2), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


def test_a_run_that_needs_data_being_made_waits_for_it_and_reuses_it(tmp_path):
    # the first process holds the data lock until the second says it is waiting (no sleep to race a slow start)
    helper = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from pathlib import Path
import macaw
cfg = macaw.Config(env="point-robot", collector_steps=400)
bench = macaw.BENCHMARKS["point-robot"]
cfg = cfg.resolve(bench)
with macaw.folder_lock(Path("data/point-robot"), wait=False, purpose="a test"):
    print("locked", flush=True)
    sys.stdin.readline()
    macaw.generate_tasks(cfg, bench, macaw.missing_tasks(cfg, bench))
"""
    first = subprocess.Popen([sys.executable, "-c", helper], cwd=tmp_path, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    second = None
    try:
        assert first.stdout.readline().strip() == "locked"
        command, env = cli(*TINY, "--steps", "2", "--eval-every", "2")
        second = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        before = []
        for line in second.stdout:  # up to the line that says it waits (or the end, if it never does)
            before.append(line)
            if "Waiting for process" in line:
                break
        assert f"Waiting for process {first.pid}" in "".join(before), "".join(before)
        first.stdin.write("go\n")
        first.stdin.flush()
        assert "Generating offline data" in first.communicate(timeout=60)[0]
        after, err = second.communicate(timeout=600)
        assert second.returncode == 0, err
        assert "Generating offline data" not in "".join(before) + after  # it reused the first process's files
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_failing_write_keeps_the_last_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    import errno
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path / "data"), out=str(tmp_path / "runs"),
                       net_width=16, latent_dim=8, inner_batch=32, outer_batch=32, eval_batch=32,
                       final_eval_rollouts=1, collector_steps=400, steps=6, eval_every=2)
    disk_full, saves = [], []
    real_fsync, real_save = os.fsync, macaw.save_checkpoint

    def fsync(fd):
        if disk_full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def save_checkpoint(*args):
        saves.append(1)
        if len(saves) == 2:
            disk_full.append(True)  # the disk fills up while the second checkpoint is written
        real_save(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(macaw, "save_checkpoint", save_checkpoint)
    with pytest.raises(macaw.UserError) as err:
        macaw.train(cfg)
    run = tmp_path / "runs" / "point-robot-seed1"
    message = str(err.value)
    assert str(run / "checkpoint.pt") in message and "No space left" in message and "--resume" in message
    assert "\n" not in message
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2  # the last good one, intact
    assert not list(run.glob("*.tmp"))
    monkeypatch.undo()

    resumed = macaw.train(macaw.Config(resume=str(run)))
    straight = macaw.train(dataclasses.replace(cfg, run_name="straight"))
    assert read_log_without_timing(run / "log.jsonl") == read_log_without_timing(
        tmp_path / "runs" / "straight" / "log.jsonl")
    assert resumed["tasks"] == straight["tasks"]


# ------------------------------------------------------------------------------------------------
# Copying into coursework: library calls leave the caller's process alone.
# ------------------------------------------------------------------------------------------------
def test_train_leaves_threads_rng_signal_and_warning_handlers_and_its_config_as_it_found_them(tmp_path):
    import signal
    import threading
    cfg = macaw.Config(env="point-robot", data_dir=str(tmp_path / "data"), out=str(tmp_path / "runs"),
                       net_width=16, latent_dim=8, inner_batch=32, outer_batch=32, eval_batch=32,
                       final_eval_rollouts=1, collector_steps=400, steps=2, eval_every=2, threads=2)
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    warning = macaw.mujoco.get_mju_user_warning()
    before = dataclasses.asdict(cfg)
    summary = macaw.train(cfg)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert handlers == {s: signal.getsignal(s) for s in handlers}
    assert macaw.mujoco.get_mju_user_warning() is warning
    assert dataclasses.asdict(cfg) == before  # the caller's config is not filled in behind its back

    # The command recorded in the summary reproduces the run's settings (not the caller's argv).
    command = summary["command"].split()
    assert command[:2] == ["python", "macaw.py"]
    again = macaw.parse_config(command[2:]).resolve(macaw.BENCHMARKS["point-robot"])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg.resolve(macaw.BENCHMARKS["point-robot"]))

    # From a worker thread (where Python allows no signal handlers) it runs too.
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        macaw.main(["--env", "point-robot", "--data-dir", cfg.data_dir, "--out", cfg.out, "--run-name", "t",
                    "--steps", "2", *TINY[2:]])))
    thread.start()
    thread.join()
    assert errors == [0]


def test_main_returns_its_exit_code_instead_of_exiting(tmp_path, capsys):
    assert macaw.main(["--env", "nope"]) == 2
    assert "valid envs" in capsys.readouterr().err


def test_a_failing_compile_is_one_line_that_names_the_fix(tmp_path, monkeypatch, capsys):
    """--compile needs a C compiler and torch.compile's support: if compiling the first step fails, the run
    stops with one line that says so and how to run without it (tests never really compile)."""
    def compiled(*args, **kw):
        def fail(params, batches):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(more lines)")
        return fail
    monkeypatch.setattr(macaw, "compiled_meta_gradient", compiled)
    assert macaw.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                              "--steps", "2", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --compile: torch.compile failed") and "No working C++ compiler" in err
    assert "run without --compile" in err and "more lines" not in err


def test_point_robot_runs_without_mujoco_installed(tmp_path):
    code = (f"import sys; sys.modules['mujoco'] = None; sys.path.insert(0, {str(HERE)!r}); import macaw; "
            f"sys.exit(macaw.main({TINY + ['--steps', '2', '--eval-every', '2']!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    versions = json.loads((tmp_path / "runs" / "point-robot-seed1" / "versions.json").read_text())
    assert versions["mujoco"] is None


def test_resume_names_the_flags_it_ignores(tmp_path, capsys):
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]  # (in-process: main())
    assert macaw.main([*TINY, *places, "--steps", "2", "--eval-every", "2"]) == 0
    run = tmp_path / "runs" / "point-robot-seed1"
    capsys.readouterr()
    assert macaw.main(["--resume", str(run), "--steps", "4", "--net-width", "64", "--seed", "3"]) == 0
    assert "ignored: --seed 3, --net-width 64" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["net_width"] == 16


# ------------------------------------------------------------------------------------------------
# The data collector: stacked SAC agents in lock-step, checkpointed, stoppable.
# ------------------------------------------------------------------------------------------------
def test_collector_takes_one_update_every_k_env_steps_at_its_learning_rate(monkeypatch):
    """update_every=k (studies/collector_budget.py): after the random steps, one SAC update per k env steps."""
    calls, rates = [], []
    update = macaw.SAC.update

    def counted(agent, *batch):
        calls.append(1)
        rates.append(agent.q_opt.param_groups[0]["lr"])
        return update(agent, *batch)
    monkeypatch.setattr(macaw.SAC, "update", counted)
    bench = macaw.BENCHMARKS["cheetah-dir"]
    for every, lr, updates in ((1, 3e-4, 60), (3, 1e-3, 20)):
        calls.clear()
        macaw.collect_sac([macaw.make_task_env(bench, 0)], 260, 0, random_steps=200, batch_size=32, width=16,
                          update_every=every, lr=lr)
        assert len(calls) == updates and set(rates[-updates:]) == {lr}


@pytest.mark.parametrize("env,shared", [("cheetah-dir", False), ("walker-params", False), ("walker-params", True)])
def test_collector_resumed_from_its_checkpoint_gives_the_uninterrupted_data(tmp_path, env, shared):
    """Stopped mid-episode (walker: after falls at different steps in each env), the collector (one agent
    per task, or one shared task-conditioned agent) continues from its checkpoint to exactly the data of
    an uninterrupted collection."""
    bench = macaw.BENCHMARKS[env]
    envs = lambda: [macaw.make_task_env(bench, k) for k in bench.test_ids[:2]]
    small = dict(random_steps=200, batch_size=32, width=32, shared=shared)
    straight = macaw.collect_sac(envs(), 600, 0, **small)
    checkpoint, calls = tmp_path / "collector.pt", []
    with pytest.raises(macaw.Interrupted, match="stopped at step 333"):
        macaw.collect_sac(envs(), 600, 0, checkpoint, checkpoint_every_s=1e9,
                          should_stop=lambda: calls.append(1) or len(calls) == 333, **small)
    assert torch.load(checkpoint, weights_only=False)["t"] == 333
    resumed = macaw.collect_sac(envs(), 600, 0, checkpoint, **small)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(straight[0]["rewards"], straight[1]["rewards"])  # two tasks, two agents
    if env == "walker-params":  # the envs' episodes ended at different steps
        ends = [np.flatnonzero(d["terminations"]) for d in straight]
        assert len(ends[0]) and len(ends[1]) and not np.array_equal(ends[0], ends[1])


def spawned_children(pid):
    """Pids of the multiprocessing workers that process `pid` started (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads the process table from /proc")
def test_sigterm_during_data_generation_saves_and_stops_every_worker(tmp_path):
    import signal
    env = dict(os.environ, PYTHONPATH=str(HERE))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(HERE / "macaw.py"), "--env", "cheetah-dir", "--collector-steps",
                                 "100000", "--collector-design", "per-task"],  # (per-task: 2 workers)
                                cwd=tmp_path, env=env, text=True, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: log.read_text().count("SAC x1") >= 2)  # both workers are collecting
        workers = spawned_children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: SIGTERM") and "data generation stopped" in last_line
    wait_for(lambda: not any(alive(w) for w in workers), timeout=20)  # no orphaned collector keeps running
    checkpoints = sorted((tmp_path / "data" / "cheetah-dir").glob("collector-*.pt"))
    assert len(checkpoints) == 2  # each worker saved where it stopped, well before its first 3-minute save
    assert all(0 < torch.load(c, weights_only=False)["t"] < 100_000 for c in checkpoints)


# ------------------------------------------------------------------------------------------------
# The tutorial's worked solutions still run (tiny sizes; the notebook quotes the full ones).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", sorted(p.name for p in (HERE / "solutions").glob("ex*.py")))
def test_solution_runs(tmp_path, script):
    result = subprocess.run([sys.executable, str(HERE / "solutions" / script), "--quick", "--data-dir", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("study", ["main", "ablation"])
def test_compare_methods_study_runs_end_to_end_at_a_tiny_size(tmp_path, study, monkeypatch):
    sys.path.insert(0, str(HERE / "studies"))
    import compare_methods
    tiny = ["net_width=16", "latent_dim=8", "inner_batch=32", "outer_batch=32", "eval_batch=32",
            "final_eval_rollouts=1", "eval_rollouts=1", "collector_steps=400", f"data_dir={tmp_path / 'data'}"]
    variants = [*compare_methods.STUDIES[study], *(["no-weight-transform-wide"] if study == "ablation" else [])]
    compare_methods.main([study, "--envs", "point-robot", "--seeds", "1", "--steps", "4", "--eval-every", "2",
                          "--jobs", "2", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "studies"),
                          "--variants", *variants, "--set", *tiny])
    out = json.loads((tmp_path / "studies" / f"{study}.json").read_text())
    assert {r["variant"] for r in out["runs"]} == set(variants)
    assert all(len(r["curve"]) == 2 and r["summary"]["steps"] == 4 for r in out["runs"])
    assert (tmp_path / "studies" / f"{study}.png").stat().st_size > 0
    if study == "ablation":  # the wide plain networks have (at least, and about) MACAW's parameter count
        count = lambda **kw: sum(p.numel() for p in macaw.MACAW(17, 6, macaw.Config(**{"net_width": 16, "latent_dim": 8,
                                                                                       **kw})).parameters())
        width = next(r["net_width"] for r in out["runs"] if r["variant"] == "no-weight-transform-wide")
        assert count(weight_transform=False, net_width=width - 1) < count() <= count(weight_transform=False, net_width=width)
    import tables
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert f"| point-robot | {variants[-1]} |" in tables.comparison_table(study)


def test_sigterm_to_a_comparison_study_stops_every_run_with_a_checkpoint(tmp_path):
    """A real SIGTERM to studies/compare_methods.py reaches its worker processes: each run saves its
    checkpoint and stops, no worker keeps running, and the same command continues the runs."""
    import signal
    import time
    tiny = ["net_width=16", "latent_dim=8", "inner_batch=32", "outer_batch=32", "eval_batch=32",
            "final_eval_rollouts=1", "eval_rollouts=1", "collector_steps=400", f"data_dir={tmp_path / 'data'}"]
    cmd = [sys.executable, str(HERE / "studies" / "compare_methods.py"), "main", "--envs", "point-robot",
           "--variants", "macaw", "meta-bc", "--seeds", "1", "--steps", "100000", "--eval-every", "20", "--jobs", "2",
           "--out", str(tmp_path / "runs"), "--results", str(tmp_path), "--set", *tiny]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [tmp_path / "runs" / f"point-robot-{v}-seed1" for v in ("macaw", "meta-bc")]
    deadline = time.time() + 300
    while not all((r / "checkpoint.pt").exists() for r in runs) and time.time() < deadline:
        time.sleep(0.5)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) >= 2  # the two runs' processes (and spawn's resource tracker)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "the same command continues them" in output, output[-2000:]
    time.sleep(1)
    def running(pid):  # (a zombie has ended; only its exit status waits for the init process to read it)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    assert not [pid for pid in workers if running(pid)]
    steps = [torch.load(r / "checkpoint.pt", weights_only=False)["step"] for r in runs]
    assert all(0 < s < 100000 for s in steps)


def test_test_time_studies_run_on_every_method_at_a_tiny_size(tmp_path, monkeypatch):
    sys.path.insert(0, str(HERE / "studies"))
    import adaptation_probe
    runs = []
    for method in macaw.METHODS:
        result = run_cli(*TINY, "--method", method, "--steps", "2", "--eval-every", "2", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs.append(str(tmp_path / "runs" / macaw.default_run_name(macaw.Config(env="point-robot", method=method))))
    adaptation_probe.main([*runs, "--adaptations", "1", "--steps", "1", "3", "--batch-sizes", "32", "64", "--rule", "adam",
                           "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path), "--name", "probe"])
    probe = json.loads((tmp_path / "probe_point-robot.json").read_text())
    out = probe["runs"]
    assert len(out) == 3 and all(len(recs) == 5 * 4 * 2 * 2 for recs in out.values())  # tasks x sources x sizes x steps
    assert sorted(probe["variants"].values()) == sorted(macaw.METHODS) and len(probe["table"]) == 3 * 4 * 2 * 2
    (tmp_path / "probe_point-robot.png").unlink()
    adaptation_probe.main(["--replot", str(tmp_path / "probe_point-robot.json")])
    assert (tmp_path / "probe_point-robot.png").stat().st_size > 0
    assert all(len(r["returns"]) == 1 for recs in out.values() for r in recs.values())
    for part in runs[::-1]:  # the same study in three parts, one run each: the same returns and table
        adaptation_probe.main([part, "--adaptations", "1", "--steps", "1", "3", "--batch-sizes", "32", "64", "--rule",
                               "adam", "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path), "--name", "parts"])
    parts = json.loads((tmp_path / "parts_point-robot.json").read_text())
    assert parts["runs"] == out and parts["variants"] == {run: probe["variants"][run] for run in runs[::-1]}
    assert list(parts["variants"].values()) == list(macaw.METHODS)  # MACAW first, whatever order the parts ran in
    assert parts["table"] == probe["table"]
    import online_finetune
    online_finetune.main([*runs, "--episodes", "2", "--repeats", "1", "--rule", "repeat", "--data-dir",
                          str(tmp_path / "data"), "--results", str(tmp_path)])
    out = json.loads((tmp_path / "online_finetune_point-robot.json").read_text())["runs"]
    for res in out.values():
        for (steps, returns), in res["curves"].values():
            assert len(returns) == 3 and steps[0] == 0 and steps[2] > steps[1] > 0  # 2 episodes of up to 20 steps
    assert (tmp_path / "online_finetune_point-robot.png").stat().st_size > 0
    online_finetune.main([runs[0], runs[2], "--episodes", "1", "--repeats", "1", "--targets", "mc", "0.9", "--name", "td",
                          "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path)])
    td = json.loads((tmp_path / "td_point-robot.json").read_text())["runs"]
    assert sorted(online_finetune.method_returns(td)) == ["macaw", "macaw, TD(λ = 0.9)", "mt-awr", "mt-awr, TD(λ = 0.9)"]
    for part in (runs[2], runs[0]):  # the same study in two parts, one run each: the same file as in one command
        online_finetune.main([part, "--episodes", "1", "--repeats", "1", "--targets", "mc", "0.9", "--name", "td_parts",
                              "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path)])
    parts = json.loads((tmp_path / "td_parts_point-robot.json").read_text())["runs"]
    assert sorted(parts) == sorted(td) and all(parts[k]["curves"] == td[k]["curves"] for k in td)
    import td_lambda  # its table and figure, from this study's output
    monkeypatch.setattr(td_lambda, "ENVS", ("point-robot",))
    monkeypatch.setattr(td_lambda, "META_TRAINING_ENVS", ("point-robot",))  # (no td-lambda runs kept there)
    monkeypatch.setattr(td_lambda, "RESULTS", tmp_path / "td_results")
    (tmp_path / "td_results" / "studies").mkdir(parents=True)
    (tmp_path / "td_results" / "studies" / "td_lambda_online_point-robot.json").write_text(
        (tmp_path / "td_point-robot.json").read_text())
    rows = td_lambda.online_rows()
    assert [(r[1], r[2], r[3], r[8] != "") for r in rows] == [
        ("macaw", "Monte-Carlo", 1, False), ("macaw", "TD(λ = 0.9)", 1, True),
        ("mt-awr", "Monte-Carlo", 1, False), ("mt-awr", "TD(λ = 0.9)", 1, True)]
    assert td_lambda.figure_bytes().startswith(b"\x89PNG") and td_lambda.meta_training_rows() == []
    with pytest.raises(SystemExit, match="meta-bc"):
        online_finetune.main([runs[1], "--targets", "0.9", "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path)])
    import tables
    folder = tmp_path / "tables" / "studies"
    folder.mkdir(parents=True)
    for name in ("consistency", "data_quality"):  # the probe's output, under each study's name
        (folder / f"{name}_point-robot.json").write_text((tmp_path / "probe_point-robot.json").read_text())
    (folder / "online_finetune_point-robot.json").write_text((tmp_path / "online_finetune_point-robot.json").read_text())
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "tables")
    printed = "\n".join(f("point-robot") for f in (tables.consistency_table, tables.data_quality_table,
                                                      tables.online_table))
    assert printed.count("| meta-bc |") == 2 + 2 + 1  # consistency: 2 sizes; data quality: 2 step counts; online


@pytest.mark.parametrize("method", ["macaw", "meta-bc"])
def test_adam_continuation_starts_with_the_inner_step_and_lowers_the_plain_objective(method):
    """studies' --rule adam: the first test-time step is the method's own inner step, later ones Adam
    steps on its plain objective (MACAW: value regression + AWR; Meta-BC: cloning), which they lower."""
    sys.path.insert(0, str(HERE / "studies"))
    from adaptation_probe import adapt_steps
    torch.manual_seed(0)
    cfg = small_config(method=method, adv_head=method == "macaw")
    model = macaw.MACAW(5, 2, cfg)
    batch = random_batch(32)
    repeat, adam = (adapt_steps(model, model.params(), batch, 1, cfg, rule) for rule in ("repeat", "adam"))
    for a, b in zip(repeat, adam):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def objective(params):
        if method == "meta-bc":
            return macaw.bc_loss(model.policy, params[1], batch, cfg).item()
        return sum(macaw.multitask_losses(model, params[0], params[1], batch, cfg).values()).item()
    assert objective(adapt_steps(model, model.params(), batch, 6, cfg, "adam")) < objective(adam)


def test_ant_progress_separates_walking_from_standing_in_stored_episodes():
    sys.path.insert(0, str(HERE / "studies"))
    import ant_progress
    # Two 3-step episodes: actions of norm^2 2 (control cost 1 per step), so progress = reward - 1 + 1.
    rewards = np.array([1.0, 2.0, 3.0, 0.5, 0.5, 0.5])
    data = dict(rewards=rewards, actions=np.ones((6, 2)), terminations=np.zeros(6, bool),
                truncations=np.array([0, 0, 1, 0, 0, 1], bool))
    assert ant_progress.data_progress(data, 1) == (pytest.approx(1.5), pytest.approx(1.5))  # the last episode
    assert ant_progress.data_progress(data, 2) == (pytest.approx(3.75), pytest.approx(3.75))  # (6 + 1.5) / 2


@pytest.mark.parametrize("kw", [{}, dict(weight_transform=False), dict(method="meta-bc")],
                         ids=["merged", "no-weight-transform", "meta-bc"])
def test_compiled_meta_gradient_path_matches_backward(kw):
    """--compile differentiates J as one pure function (torch.func.grad), with each T's gradient from its probes
    as on the default path (merged), or, with no T to merge, from torch.func.grad itself; checked here with the 'eager' backend (the
    same traced function without code generation, to keep the test fast)."""
    torch.manual_seed(0)
    cfg = small_config(**kw)
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(2)]
    models = [macaw.MACAW(5, 2, cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    stats = [macaw.fast_meta_train_step(m, macaw.make_optimizers(m, cfg), batches, 3, cfg, True, gradient)
             for m, gradient in ((models[0], None), (models[1], macaw.compiled_meta_gradient(models[1], 3, cfg, "eager")))]
    assert stats[0] == pytest.approx(stats[1], rel=1e-5)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        expected = torch.zeros_like(a) if a.grad is None else a.grad  # Meta-BC never uses the value function
        torch.testing.assert_close(expected, b.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_every_table_in_the_docs_is_what_results_gives():
    """README.md and docs/*.md hold no number typed by hand: each marked table equals what studies/tables.py
    prints from results/ (run `python studies/tables.py` after changing a result)."""
    sys.path.insert(0, str(HERE / "studies"))
    import tables
    assert tables.main(["--check"]) == 0


# ------------------------------------------------------------------------------------------------
# Offline PEARL (pearl.py), the paper's main prior method, as a baseline.
# ------------------------------------------------------------------------------------------------
def tiny_pearl(**kw):
    import pearl
    cfg = pearl.PearlConfig(**dict(dict(latent_size=3, pearl_width=16, encoder_width=8), **kw))
    torch.manual_seed(0)
    return pearl, cfg, pearl.Pearl(5, 2, cfg)


def test_pearl_posterior_ignores_the_order_of_the_context_and_narrows_with_more_of_it():
    pearl, cfg, model = tiny_pearl()
    context = torch.randn(3, 40, 5 + 2 + 1)  # (tasks, transitions, obs + act + reward)
    mean, var = model.posterior(context)
    shuffled = model.posterior(context[:, torch.randperm(40)])
    torch.testing.assert_close(shuffled[0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled[1], var, rtol=1e-5, atol=1e-7)
    fewer = model.posterior(context[:, :10])[1]
    assert (var < fewer).all() and mean.shape == var.shape == (3, cfg.latent_size)  # more transitions: narrower


def test_pearl_step_moves_every_network_and_the_encoder_learns_only_from_the_critics_and_the_kl():
    import copy
    pearl, cfg, model = tiny_pearl()
    g = torch.Generator().manual_seed(1)
    batch = dict(obs=torch.randn(2, 16, 5, generator=g), actions=torch.rand(2, 16, 2, generator=g) * 2 - 1,
                 rewards=torch.randn(2, 16, generator=g), next_obs=torch.randn(2, 16, 5, generator=g),
                 terminations=torch.zeros(2, 16))
    context = pearl.as_context(batch)[:, :8]
    before, reference = copy.deepcopy(model), copy.deepcopy(model)
    rng = torch.get_rng_state()
    stats = pearl.train_step(model, pearl.make_optimizers(model, cfg), context, batch, cfg)
    assert all(np.isfinite(v) for v in stats.values())
    for net in ("encoder", "policy", "q1", "q2", "value", "target_value"):  # every network takes its step
        for (name, p), q in zip(getattr(model, net).named_parameters(), getattr(before, net).parameters()):
            assert not torch.equal(p, q), (net, name)
    for p, v, q in zip(model.target_value.parameters(), model.value.parameters(), before.target_value.parameters()):
        torch.testing.assert_close(p, q + cfg.target_tau * (v - q), rtol=1e-5, atol=1e-7)  # soft update
    # The encoder's gradient is that of the critics' loss and the KL alone (the policy and value losses use z
    # detached): recompute both with the same random draw and compare.
    torch.set_rng_state(rng)
    mean, var = reference.posterior(context)
    z = (mean + var.sqrt() * torch.randn_like(mean))[:, None].expand(2, 16, -1)
    with torch.no_grad():
        target_v = reference.target_value(torch.cat([batch["next_obs"], z], -1)).squeeze(-1)
        q_target = cfg.reward_scale * batch["rewards"] + cfg.discount * target_v
    q_in = torch.cat([batch["obs"], batch["actions"], z], -1)
    loss = cfg.kl_weight * pearl.kl_to_prior(mean, var) + sum((q(q_in).squeeze(-1) - q_target).pow(2).mean()
                                                             for q in (reference.q1, reference.q2))
    expected = torch.autograd.grad(loss, list(reference.encoder.parameters()))
    for p, e in zip(model.encoder.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)


def test_pearl_runs_through_its_command_line_and_resumes(tmp_path):
    flags = ["--env", "point-robot", "--eval-every", "2", "--pearl-width", "16", "--encoder-width", "8",
             "--latent-size", "3", "--pearl-meta-batch", "3", "--rl-batch", "16", "--context-batch", "8",
             "--eval-batch", "32", "--eval-rollouts", "1", "--final-eval-rollouts", "2", "--collector-steps", "400",
             "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    run = lambda *extra: subprocess.run([sys.executable, str(HERE / "pearl.py"), *flags, *extra], cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=600)
    first = run("--steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "runs" / "point-robot-pearl-seed1"
    assert {"config.json", "log.jsonl", "checkpoint.pt", "curves.png", "summary.json"} <= {p.name for p in folder.iterdir()}
    more = subprocess.run([sys.executable, str(HERE / "pearl.py"), "--resume", str(folder), "--steps", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "pearl" and summary["steps"] == 4 and summary["command"].startswith("python pearl.py")
    assert all(len(t["post_returns"]) == 2 for t in summary["tasks"].values())
    assert [r["step"] for r in macaw.read_log(folder / "log.jsonl", 4)] == [2, 4]


# ------------------------------------------------------------------------------------------------
# torchrun: one run over several processes (section 9).
# ------------------------------------------------------------------------------------------------
def torchrun(*args, cwd, nproc=2, **popen):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


ONE_STEP = """
import sys, torch, macaw
from test_macaw import small_config, random_batch
torch.set_default_dtype(torch.float64)  # so that float rounding (the order of the sum) is far below the check
rank, world = macaw.process_share()
for form in ("default", "plain"):
    cfg = small_config(plain=form == "plain")
    macaw.join_processes(cfg)
    torch.manual_seed(0)
    model = macaw.MACAW(5, 2, cfg)
    optimizers, meta_step = macaw.meta_step_over_processes(model, 8, cfg)
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(5)]
    meta_step(batches[rank::world])
    torch.save(dict(params={k: p.detach() for k, p in model.named_parameters()},
                    grads={k: p.grad for k, p in model.named_parameters() if p.grad is not None}),
               f"{sys.argv[1]}/{form}-rank{rank}.pt")
"""


def test_two_processes_take_the_same_meta_step_as_one(tmp_path):
    """2 gloo processes, each with its share of a meta-batch's 5 tasks, end the step (default and --plain) with
    the meta-gradient and the parameters of one process over all 5 (in float64: float32 rounding moves Adam's
    first step by ~1e-6 where a gradient is near its eps)."""
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(HERE)), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    result = torchrun(str(script), str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for form in ("default", "plain"):
        one = torch.load(tmp_path / "one" / f"{form}-rank0.pt")
        for rank in (0, 1):
            shared = torch.load(tmp_path / f"{form}-rank{rank}.pt")
            assert shared["grads"].keys() == one["grads"].keys()
            for name, g in one["grads"].items():
                assert (shared["grads"][name] - g).abs().max().item() <= 1e-6 * max(1.0, g.abs().max().item()), name
            for name, p in one["params"].items():
                assert (shared["params"][name] - p).abs().max().item() <= 1e-6, (form, name)


def test_a_tiny_torchrun_run_writes_one_set_of_files(tmp_path):
    result = torchrun(str(HERE / "macaw.py"), *TINY, "--steps", "4", "--eval-every", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "point-robot-seed1"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".lock", "checkpoint.pt", "checkpoint.prev.pt", "config.json", "curves.png", "log.jsonl", "summary.json",
         "versions.json"])
    assert [r["step"] for r in read_log_without_timing(run / "log.jsonl")] == [2, 4]
    assert result.stdout.count("Wrote ") == 1 and "(2 processes)" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["tasks"], key=int) == ["20", "21", "22", "23", "24"]  # every test task, from both processes
    assert len(list((tmp_path / "data" / "point-robot").glob("task*.npz"))) == 25  # each task's data made once
    single = macaw.Config(env="point-robot", collector_steps=400, data_dir=str(tmp_path / "single-data"))
    macaw.ensure_data(single.resolve(macaw.BENCHMARKS["point-robot"]), macaw.BENCHMARKS["point-robot"])
    for k in (0, 24):  # the same data as one process makes
        with np.load(tmp_path / "data" / "point-robot" / f"task{k}.npz") as a, \
                np.load(tmp_path / "single-data" / "point-robot" / f"task{k}.npz") as b:
            assert np.array_equal(a["observations"], b["observations"])


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads the process table from /proc")
def test_killing_one_process_stops_the_others_with_one_line(tmp_path):
    import signal
    import time
    proc = torchrun(str(HERE / "macaw.py"), *TINY, "--steps", "100000", "--eval-every", "50", cwd=tmp_path,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def rank_one():
            for environ in Path("/proc").glob("[0-9]*/environ"):
                try:
                    if b"\0RANK=1\0" in b"\0" + environ.read_bytes() and b"macaw.py" in (
                            environ.parent / "cmdline").read_bytes():
                        return int(environ.parent.name)
                except OSError:
                    continue
        wait_for(lambda: rank_one() and (tmp_path / "runs" / "point-robot-seed1" / "log.jsonl").exists())
        os.kill(rank_one(), signal.SIGKILL)
        start = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.time() - start < 60
    ours = [line for line in err.splitlines() if line.startswith(("error:", "stopped:"))]
    assert len(ours) == 1 and "Traceback" not in err.split("torch/distributed/elastic")[0], err[-3000:]  # (torchrun's own report follows)


# ------------------------------------------------------------------------------------------------
# --value-target td-lambda: lambda-returns in the outer value loss.
# ------------------------------------------------------------------------------------------------
def hand_made_episodes():
    """Two stored episodes: 5 steps ending at a time limit, then 4 ending in a fall; V of each next state."""
    rng = np.random.default_rng(0)
    rewards, next_values = rng.normal(size=9), rng.normal(size=9) * 10
    ends = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1], bool)
    end_discounts = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0], float)  # the second episode fell
    return rewards, next_values, ends, end_discounts


def brute_force_lambda_return(rewards, next_values, ends, end_discounts, gamma, lam):
    """The forward view: G^lambda_t = (1 - lam) sum_n lam^(n-1) G^(n)_t + lam^(H-t-1) G^(H-t)_t, with the n-step
    returns G^(n)_t = r_t + ... + gamma^(n-1) r_(t+n-1) + gamma^n V(s_(t+n)) (at the episode's end: d V(s_H))."""
    out = []
    for t in range(len(rewards)):
        last = next(h for h in range(t, len(rewards)) if ends[h])
        def n_step(n):
            ret = sum(gamma ** i * rewards[t + i] for i in range(n))
            end = t + n - 1
            return ret + gamma ** n * next_values[end] * (end_discounts[end] if end == last else 1.0)
        steps = last - t + 1
        out.append(sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, steps)) + lam ** (steps - 1) * n_step(steps))
    return np.array(out)


@pytest.mark.parametrize("lam", [0.0, 0.7, 0.95, 1.0])
def test_lambda_returns_match_the_forward_view_and_the_ends(lam):
    episodes = hand_made_episodes()
    np.testing.assert_allclose(macaw.lambda_returns(*episodes, 0.99, lam),
                               brute_force_lambda_return(*episodes, 0.99, lam), rtol=1e-12, atol=1e-12)


def test_lambda_one_is_the_bootstrapped_monte_carlo_target_and_zero_is_one_step_td():
    rewards, next_values, ends, end_discounts = hand_made_episodes()
    gamma = 0.99
    mc, _, terminal_discount = macaw.monte_carlo_targets(rewards, np.zeros((9, 1)), ends, gamma, terminations=1 - end_discounts)
    v_end = np.array([next_values[4]] * 5 + [next_values[8]] * 4)  # V(s_H) of each step's episode
    np.testing.assert_allclose(macaw.lambda_returns(rewards, next_values, ends, end_discounts, gamma, 1.0),
                               mc + terminal_discount * v_end, rtol=1e-6)  # (5)'s target, to float32 rounding
    np.testing.assert_allclose(macaw.lambda_returns(rewards, next_values, ends, end_discounts, gamma, 0.0),
                               rewards + gamma * np.where(ends, end_discounts, 1.0) * next_values, rtol=1e-12)
    assert macaw.lambda_returns(rewards, next_values, ends, end_discounts, gamma, 0.0)[8] == rewards[8]  # a fall


def test_td_lambda_takes_the_outer_value_target_in_every_form_and_mc_is_unchanged(tmp_path):
    batches = [(random_batch(32, seed=2 * t), random_batch(32, seed=2 * t + 1)) for t in range(3)]
    for _, outer in batches:
        outer["lambda_return"] = torch.randn(32) * 10
    plain, _ = meta_gradient(macaw.meta_losses, small_config(value_target="td-lambda"), batches)
    fast, _ = meta_gradient(macaw.fast_meta_losses, small_config(value_target="td-lambda"), batches)
    mc, _ = meta_gradient(macaw.meta_losses, small_config(), batches)
    for name, g in plain.items():
        assert ((fast[name] - g).norm() / g.norm()).item() < 1e-4, name
    assert not torch.equal(plain["value.seq.fc_0.fc.bias"], mc["value.seq.fc_0.fc.bias"])
    # a tiny run: td-lambda refreshes and trains; mc with td-lambda's flags set is the default run exactly
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--steps", "4", "--eval-every", "2"]
    assert macaw.main([*TINY, *places, "--run-name", "default"]) == 0
    assert macaw.main([*TINY, *places, "--run-name", "mc", "--value-target", "mc", "--td-lambda", "0.3",
                       "--td-refresh", "3"]) == 0
    assert macaw.main([*TINY, *places, "--run-name", "td", "--value-target", "td-lambda", "--td-refresh", "3"]) == 0
    logs = {n: read_log_without_timing(tmp_path / "runs" / n / "log.jsonl") for n in ("default", "mc", "td")}
    assert logs["mc"] == logs["default"] and logs["td"] != logs["default"]
    # resumed between two refreshes (checkpoint at step 2, refreshes at 0 and 3), it continues exactly
    assert macaw.main([*TINY, *places[:4], "--steps", "2", "--eval-every", "2", "--run-name", "td-resumed",
                       "--value-target", "td-lambda", "--td-refresh", "3"]) == 0
    assert macaw.main(["--resume", str(tmp_path / "runs" / "td-resumed"), "--steps", "4"]) == 0
    assert read_log_without_timing(tmp_path / "runs" / "td-resumed" / "log.jsonl") == logs["td"]
    assert macaw.main([*TINY, *places, "--value-target", "td-lambda", "--method", "meta-bc"]) == 2


def test_online_fine_tuning_td_targets_are_lambda_returns_of_each_online_episode():
    """studies/online_finetune.py with --targets LAMBDA: the online rows' value targets are lambda_returns over
    their own episodes from the current V (lambda = 1: (5)'s bootstrapped target, lambda = 0: one-step TD, no
    bootstrap after a fall), the offline rows keep (5)'s target, and the Adam steps regress V onto them."""
    sys.path.insert(0, str(HERE / "studies"))
    import online_finetune
    rng = np.random.default_rng(0)
    def episode(n, fell):
        return dict(observations=rng.normal(size=(n, 5)).astype(np.float32), actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                    rewards=rng.normal(size=n).astype(np.float32), next_observations=rng.normal(size=(n, 5)).astype(np.float32),
                    terminations=np.arange(n) == n - 1 if fell else np.zeros(n, bool),
                    truncations=np.zeros(n, bool) if fell else np.arange(n) == n - 1)
    episodes, offline = [episode(6, fell=False), episode(4, fell=True)], random_batch(8)
    torch.manual_seed(0)
    model = macaw.MACAW(5, 2, small_config())
    vparams = model.params()[0]
    V = lambda obs: torch.func.functional_call(model.value, vparams, (torch.as_tensor(obs),)).detach()
    mc = online_finetune.adaptation_data(model, vparams, offline, episodes, small_config(), None)
    assert "lambda_return" not in mc and len(mc["obs"]) == 8 + 10
    one, zero = (online_finetune.adaptation_data(model, vparams, offline, episodes,
                                                 small_config(value_target="td-lambda", td_lambda=lam), None)
                 for lam in (1.0, 0.0))
    bootstrapped = mc["mc_return"] + mc["terminal_discount"] * V(mc["terminal_obs"])
    torch.testing.assert_close(one["lambda_return"], bootstrapped)  # offline rows and both online episodes
    rewards, next_obs = (np.concatenate([e[k] for e in episodes]) for k in ("rewards", "next_observations"))
    not_fallen = torch.tensor([1.0] * 9 + [0.0])
    torch.testing.assert_close(zero["lambda_return"][8:], torch.as_tensor(rewards) + 0.99 * not_fallen * V(next_obs))
    torch.testing.assert_close(zero["lambda_return"][:8], bootstrapped[:8])
    cfg = small_config(value_target="td-lambda", finetune_steps=1)
    moved = macaw.finetune(model, zero, cfg)[0]
    loss = lambda vp: macaw.value_loss(model.value, vp, zero, zero["lambda_return"]).item()
    assert loss(moved) < loss(vparams)


# ------------------------------------------------------------------------------------------------
# Minari: --export-minari and --data-source minari (optional: pip install -r requirements-optional.txt).
# ------------------------------------------------------------------------------------------------
def test_minari_round_trip_gives_the_same_data_and_batches(tmp_path, monkeypatch):
    pytest.importorskip("minari", reason="Minari is optional: pip install -r requirements-optional.txt")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    args = ["--env", "point-robot", "--collector-steps", "400", "--data-dir", str(tmp_path / "data")]
    assert macaw.main([*args, "--export-minari"]) == 0
    cfg = {source: macaw.parse_config([*args, "--data-source", source, "--eval-batch", "32", "--inner-batch", "32",
                                       "--outer-batch", "32"]).resolve(macaw.BENCHMARKS["point-robot"])
           for source in ("npz", "minari")}
    bench = macaw.BENCHMARKS["point-robot"]
    for k in (0, 24):
        npz, mini = (macaw.load_task_data(macaw.task_data_path(cfg[s], k), bench, k, cfg[s]) for s in ("npz", "minari"))
        assert npz.keys() == mini.keys()
        for key in npz:
            assert np.array_equal(npz[key], mini[key]) and np.asarray(npz[key]).dtype == np.asarray(mini[key]).dtype, key
    data = {s: macaw.load_benchmark_data(cfg[s], bench) for s in cfg}
    batches = {s: macaw.sample_meta_batch(data[s], bench.train_ids, cfg[s], torch.Generator().manual_seed(0)) for s in cfg}
    for (npz_in, npz_out), (mini_in, mini_out) in zip(batches["npz"], batches["minari"]):
        for key in npz_in:
            assert torch.equal(npz_in[key], mini_in[key]) and torch.equal(npz_out[key], mini_out[key]), key


def test_minari_missing_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari now raises ImportError
    assert macaw.main(["--env", "point-robot", "--export-minari", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -r requirements-optional.txt" in err[0]
    assert macaw.main(["--env", "point-robot", "--data-source", "minari", "--out", str(tmp_path)]) == 2
    assert "requirements-optional.txt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Meta-World ML45 (optional: pip install --no-deps -r requirements-ml45.txt; CI installs it).
# ------------------------------------------------------------------------------------------------
def metaworld_or_skip():
    return pytest.importorskip("metaworld", reason="Meta-World is optional: pip install --no-deps -r requirements-ml45.txt")


def test_the_metaworld_weld_shim_still_matches_metaworld():
    """reset_mocap_welds_mujoco4 replaces Meta-World 3.1.1's reset_mocap_welds. If Meta-World changes it (or its
    version), this fails: compare the new original with the shim before trusting ml45 results."""
    metaworld_or_skip()
    from importlib.metadata import version
    original = inspect.getsource(__import__("metaworld.sawyer_xyz_env").sawyer_xyz_env.SawyerMocapBase.reset_mocap_welds)
    assert version("metaworld") == "3.1.1" and "[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0]" in \
        " ".join(original.split()).replace("[ ", "[").replace(" ]", "]"), (
        "Meta-World's reset_mocap_welds is not the one macaw.reset_mocap_welds_mujoco4 replaces: compare them "
        "(or pin metaworld==3.1.1)")
    macaw.import_metaworld()
    original = __import__("metaworld.sawyer_xyz_env").sawyer_xyz_env.SawyerMocapBase.reset_mocap_welds
    assert original is macaw.reset_mocap_welds_mujoco4
    env = macaw.make_task_env(macaw.BENCHMARKS["ml45"], 0)  # builds (it did not on MuJoCo 4 before the shim) ...
    weld = env.env.model.eq_type == mujoco.mjtEq.mjEQ_WELD
    assert weld.any() and np.allclose(env.env.model.eq_data[weld, :11], [0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 5])


def test_ml45_classes_are_metaworlds_and_held_out_classes_never_reach_meta_training():
    metaworld = metaworld_or_skip()
    macaw.import_metaworld()
    bench = macaw.BENCHMARKS["ml45"]
    ml45 = metaworld.env_dict.ML45_V3
    assert [macaw.ML45_CLASSES[k] for k in bench.train_ids] == list(ml45["train"])
    assert [macaw.ML45_CLASSES[k] for k in bench.test_ids] == list(ml45["test"])
    # meta-batches come from the training ids only (task_data holds every task, as in a run)
    data = {k: SimpleNamespace(contiguous_batch=lambda n, gen, k=k: k, random_batch=lambda n, gen, k=k: k)
            for k in bench.tasks}
    cfg, gen = small_config(), torch.Generator().manual_seed(0)
    drawn = {k for _ in range(300) for k, _ in macaw.sample_meta_batch(data, bench.train_ids, cfg, gen)}
    assert drawn == set(bench.train_ids)


def test_an_ml45_task_switch_changes_the_class_and_the_data_are_what_the_env_returns():
    metaworld_or_skip()
    bench = macaw.BENCHMARKS["ml45"]
    env = bench.make_env()
    first = {}
    for k in (0, 45, 0):
        env.set_task(k)
        assert type(env.env) is type(macaw.make_task_env(bench, k).env) and env.env.max_path_length == 150
        first.setdefault(k, env.reset()[0])
        assert np.array_equal(env.reset()[0], first[k])  # one goal per class, one start
    assert type(macaw.make_task_env(bench, 0).env).__name__ != type(macaw.make_task_env(bench, 45).env).__name__
    assert not np.allclose(first[0], first[45]) and np.any(first[45][-3:] != 0)  # the goal is in the observation
    returned, step, reset = [], env.step, env.reset  # what the env hands the collector, recorded as it goes
    env.step = lambda a: returned.append((a, *step(a))) or returned[-1][1:]
    env.reset = lambda **kw: returned.append((None, *reset(**kw))) or returned[-1][1:]
    data = macaw.collect_scripted(env, 300, seed=0)  # two 150-step episodes
    assert data["truncations"].nonzero()[0].tolist() == [149, 299] and not data["terminations"].any()
    steps = [r for r in returned if r[0] is not None][:300]
    starts = [r[1] for r in returned if r[0] is None]
    f32 = lambda x: np.asarray(x, np.float32)
    assert np.array_equal(data["observations"][[0, 150]], f32(starts[:2]))
    assert np.array_equal(data["actions"], f32([a for a, *_ in steps]))
    assert np.array_equal(data["next_observations"], f32([o for _, o, *_ in steps]))
    assert np.array_equal(data["observations"][1:150], data["next_observations"][:149])
    assert np.array_equal(data["rewards"], f32([r for _, _, r, *_ in steps]))
    assert len(env.successes) >= 2  # (the two episodes, then the collector's and the random policy's)


def test_a_tiny_ml45_run_reports_success_rates(tmp_path, monkeypatch, capsys):
    """Through the CLI, on 2 training classes and 1 held-out one (the full benchmark makes 50 classes' data)."""
    metaworld_or_skip()
    bench = macaw.BENCHMARKS["ml45"]
    monkeypatch.setitem(macaw.BENCHMARKS, "ml45", dataclasses.replace(bench, tasks=(0, 1, 45), train_ids=(0, 1),
                                                                       test_ids=(2,)))
    assert macaw.main(["--env", "ml45", "--steps", "4", "--eval-every", "2", "--collector-steps", "300",
                       "--inner-batch", "32", "--outer-batch", "32", "--eval-batch", "32", "--net-width", "16",
                       "--latent-dim", "4", "--eval-rollouts", "1", "--final-eval-rollouts", "2",
                       "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]) == 0
    summary = json.loads((tmp_path / "runs" / "ml45-seed1" / "summary.json").read_text())
    task = summary["tasks"]["2"]
    assert task["name"] == "bin-picking-v3" and len(task["post_successes"]) == 2
    assert 0 <= summary["pre_success"] <= 1 and 0 <= summary["post_success"] <= 1
    assert "success rate" in capsys.readouterr().out


def test_every_ml45_class_builds_resets_and_steps():
    """All 50 classes on MuJoCo 4 (through the shim), each with its goal drawn and visible, in 150-step episodes."""
    metaworld_or_skip()
    bench = macaw.BENCHMARKS["ml45"]
    env = bench.make_env()
    for k in bench.tasks:
        env.set_task(k)
        obs = env.reset()[0]
        assert obs.shape == (39,) and np.any(obs[-3:] != 0), macaw.ML45_CLASSES[k]
        assert env.step(env.action_space.sample())[0].shape == (39,)
