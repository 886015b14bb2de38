"""Exercise 3 (tutorial.ipynb, section 8): first-order MACAW.

The edit to macaw.py: in `adapt`, detach the inner gradients before `sgd_step`, so the meta-gradient
no longer flows through them (no second-order terms). Shown here as a flag on a copy of `adapt`,
swapped in while the meta-gradient is taken. Compare the meta-gradients of one meta-batch with the
full second-order ones. The outer losses never read the advantage head, so everything that reaches
the outer loss only through the inner policy gradient loses its meta-gradient under first order: the
head's loss weight lambda AND the head's own weights (in the full second-order gradient the head
shapes the trunk's inner gradient through h, the last hidden layer it reads, and that is how it is
meta-trained).
"""
from common import macaw, np, parse_args, point_robot, replaced, torch
from torch.func import grad


def adapt(model, vparams, pparams, inner, cfg, first_order=False):
    """macaw.adapt with the edit of this exercise (marked)."""
    def value_step_loss(p):
        loss = macaw.value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()
    v_grads, inner_v = grad(value_step_loss, has_aux=True)(vparams)
    if first_order:  # the edit: no gradient through the inner gradient
        v_grads = {k: g.detach() for k, g in v_grads.items()}
    adapted_v = macaw.sgd_step(vparams, v_grads, model.raw_value_lrs)
    target_v = {k: p.detach() for k, p in macaw.sgd_step(vparams, v_grads, model.raw_value_lrs,
                                                         1 - cfg.target_vf_alpha).items()}
    adv = macaw.advantages(model.value, adapted_v, inner)

    def policy_step_loss(p):
        loss, head = macaw.inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())
    p_grads, (inner_pi, head) = grad(policy_step_loss, has_aux=True)(pparams)
    if first_order:
        p_grads = {k: g.detach() for k, g in p_grads.items()}
    adapted_p = macaw.sgd_step(pparams, p_grads, model.raw_policy_lrs)
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


def meta_gradients(cfg, bench, batches, first_order, seed):
    """The gradient of J (macaw.meta_objective) of one meta-batch at the initialisation of `seed`, by group."""
    torch.manual_seed(seed)
    model = macaw.MACAW(2, 2, cfg)
    with replaced(adapt=lambda *a: adapt(*a, first_order=first_order)):
        total, _ = macaw.meta_objective(model, batches, len(bench.train_ids), cfg)
    total.backward()
    policy = dict(model.policy.named_parameters())
    groups = {"value weights phi": list(model.value.parameters()),
              "policy trunk weights": [p for n, p in policy.items() if not n.startswith("head_seq")],
              "advantage head weights": [p for n, p in policy.items() if n.startswith("head_seq")],
              "value step sizes l_V": [model.raw_value_lrs], "policy step sizes l_pi": [model.raw_policy_lrs],
              "lambda (head loss weight, raw)": [model.raw_adv_coef]}
    return {name: torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
            for name, params in groups.items()}  # no .grad at all = no path from the outer loss


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    cfg, bench, data = point_robot(args.data_dir)
    seeds = [0] if args.quick else [0, 1, 2]
    rows = {}  # group -> per seed (|full|, |first-order|, cosine)
    for seed in seeds:  # each seed: its own initialisation and its own meta-batch
        batches = macaw.sample_meta_batch(data, bench.train_ids, cfg, torch.Generator().manual_seed(seed))
        full, first = (meta_gradients(cfg, bench, batches, order, seed) for order in (False, True))
        for name in full:
            cos = torch.nn.functional.cosine_similarity(full[name], first[name], dim=0).item()
            rows.setdefault(name, []).append((full[name].norm().item(), first[name].norm().item(), cos))
        # lambda and the head's weights act on the outer loss only through the inner policy gradient
        assert first["lambda (head loss weight, raw)"].abs().item() == 0.0
        assert first["advantage head weights"].abs().max().item() == 0.0
        assert full["advantage head weights"].abs().max().item() > 0.0  # meta-trained through the second-order path
    print(f"point-robot, width 32, {len(seeds)} seed(s) (initialisation and meta-batch): mean +- std over seeds")
    print(f"{'meta-parameters':>30} {'|full grad|':>22} {'|first-order grad|':>22} {'cosine':>14}")
    for name, values in rows.items():
        full_n, first_n, cos = (np.array(v) for v in zip(*values))
        print(f"{name:>30} {full_n.mean():11.3g} +- {full_n.std():7.2g} {first_n.mean():11.3g} +- {first_n.std():7.2g} "
              f"{cos.mean():6.2f} +- {cos.std():4.2f}")
