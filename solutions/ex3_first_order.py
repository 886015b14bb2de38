"""Exercise 3 (tutorial.ipynb, section 8): first-order MACAW.

The edit to macaw.py: in `adapt`, detach the inner gradients before `sgd_step`, so the meta-gradient
no longer flows through them (no second-order terms). Shown here as a flag on a copy of `adapt`,
installed by assignment. Compare the meta-gradients of one meta-batch with the full second-order ones.
Run it with the plain form of the inner step (cfg.plain_inner_step): "first order" means treating the
inner gradients as constants, and in the fast form a part of dL/dT = G z^T is rewritten through z
(the bias shift a_T (z . z') G), so detaching there would keep a path through z that the plain form
does not have: the two first-order approximations differ, while the full second-order forms agree.
"""
from common import macaw, parse_args, point_robot, torch


def adapt(model, vparams, pparams, inner, cfg, probes=(None, None), first_order=False):
    """macaw.adapt with the edit of this exercise (marked); probes as in macaw.adapt."""
    step = macaw.sgd_step if cfg.plain_inner_step else macaw.fast_sgd_step

    def value_step_loss(p):
        loss = macaw.value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()
    v_grads, inner_v = macaw.inner_gradients(value_step_loss, vparams, cfg)
    if first_order:  # the edit: no gradient through the inner gradient
        v_grads = {k: g.detach() for k, g in v_grads.items()}
    adapted_v = step(vparams, v_grads, model.raw_value_lrs, probes=probes[0])
    target_v = {k: p.detach() for k, p in step(vparams, v_grads, model.raw_value_lrs, 1 - cfg.target_vf_alpha).items()}
    adv = macaw.advantages(model.value, adapted_v, inner)

    def policy_step_loss(p):
        loss, head = macaw.inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())
    p_grads, (inner_pi, head) = macaw.inner_gradients(policy_step_loss, pparams, cfg)
    if first_order:
        p_grads = {k: g.detach() for k, g in p_grads.items()}
    adapted_p = step(pparams, p_grads, model.raw_policy_lrs, probes=probes[1])
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


def meta_gradients(cfg, batches, first_order):
    torch.manual_seed(0)
    model = macaw.MACAW(2, 2, cfg)
    original = macaw.adapt
    macaw.adapt = lambda *a: adapt(*a, first_order=first_order)
    try:
        losses = macaw.meta_losses(model, batches, cfg)
    finally:
        macaw.adapt = original
    ((losses["outer_value"].sum() + losses["outer_policy"].sum()) / len(batches)).backward()
    groups = {"value weights phi": list(model.value.parameters()),
              "policy weights theta": list(model.policy.parameters()),
              "value step sizes l_V": [model.raw_value_lrs], "policy step sizes l_pi": [model.raw_policy_lrs],
              "head weight lambda": [model.raw_adv_coef]}
    return {name: torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
            for name, params in groups.items()}  # no .grad at all = no path from the outer loss


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    cfg, bench, data = point_robot(args.data_dir, plain_inner_step=True)
    batches = macaw.sample_meta_batch(data, bench.train_ids, cfg, torch.Generator().manual_seed(0))
    full, first = meta_gradients(cfg, batches, False), meta_gradients(cfg, batches, True)
    print(f"{'meta-parameters':>24} {'|full grad|':>12} {'|first-order|':>14} {'cosine':>8}")
    for name in full:
        cos = torch.nn.functional.cosine_similarity(full[name], first[name], dim=0).item()
        print(f"{name:>24} {full[name].norm().item():12.4g} {first[name].norm().item():14.4g} {cos:8.3f}")
    assert first["head weight lambda"].abs().item() == 0.0  # lambda acts only through the inner gradient
