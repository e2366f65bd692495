"""Ours against the authors' code (github.com/AIRI-Institute/SPOWL), quantity by quantity, on the same parameters.

`golden/authors.npz` holds the authors' parameters, inputs and outputs at a tiny size, recorded once by
`golden/record_authors.py` (its docstring gives their commit and the command, and says how their randomness was
taken out).  Here ours is built from the same parameters (`convert`) and each quantity is checked against the file;
the authors' code is not needed.  `python test_fidelity.py` prints the table of docs/fidelity.md.
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import planner
import spowl
from buffer import Batch
from golden import record_authors as rec
from policy import Lagrangian, deterministic_action, sample_action
from world_model import (decode, encode, ensemble_apply, head_values, next_latent, td_targets, world_model_loss,
                         WorldModel)

GOLDEN = rec.load(os.environ.get("FIDELITY_GOLDEN", rec.GOLDEN))  # or another recording (docs/fidelity.md)
SIZE = {name: int(GOLDEN["size/" + name]) for name in rec.SIZES["tiny"]}
ARGS = spowl.Args(latent_dim=SIZE["latent_dim"], mlp_dim=SIZE["mlp_dim"], enc_dim=SIZE["enc_dim"],
                  num_bins=SIZE["num_bins"], num_q=rec.WORLD_MODEL["num_q"], num_cost_heads=rec.WORLD_MODEL["num_c"],
                  dropout=0.0, cost_dropout=0.0, q_subsample=rec.WORLD_MODEL["num_q"],
                  cost_subsample=rec.WORLD_MODEL["c_random_agg"],
                  batch_size=rec.BATCH, horizon=rec.HORIZON, num_samples=rec.PLAN["num_samples"],
                  num_pi_trajs=rec.PLAN["num_pi_trajs"], num_elites=rec.PLAN["num_elites"], iterations=1,
                  ci_resamples=rec.PLAN["bootstrap_samples"])
KEY = jax.random.PRNGKey(0)  # under the setup of record_authors.py no result depends on the key
TOLERANCE = {  # max |ours - authors'|, float32 arithmetic in another order (our mish and LayerNorm, our Adam flattened)
    "heads": 1e-5, "td": 1e-4, "loss": 1e-5, "update": 1e-5, "params": 1e-6, "estimates": 1e-4,
    "iteration": 1e-4, "iterations": 1e-4, "switch": 1e-4}


def mlp_from(arrays, name, like):
    """Our MLP `like`, with the parameters of the authors' `Sequential` `name` (NormedLinear layers and a last Linear
    or NormedLinear; eqx's Linear stores weights (out, in), ours (in, out))."""
    layers = [f"{name}.layers[{i}]" for i in range(len(like.weights))]
    linear = [p + ".linear" if p + ".linear.weight" in arrays else p for p in layers]
    normed = [p + ".ln" for p in layers if p + ".ln.weight" in arrays]
    get = lambda suffix, paths: [jnp.asarray(arrays[p + suffix]) for p in paths]  # noqa: E731
    return dataclasses.replace(like, weights=[jnp.swapaxes(w, -1, -2) for w in get(".weight", linear)],
                               biases=get(".bias", linear), norm_scales=get(".weight", normed),
                               norm_offsets=get(".bias", normed))


def convert(arrays, prefix, agent):
    """An agent of ours with the authors' parameters stored under `prefix` ('params/', 'after/', 'after2/'): their
    `WorldModel` holds the world model, the targets, the policy and lambda, mu in one module."""
    names = {"encoder": "_encoder", "dynamics": "_dynamics", "reward": "_reward", "cost": "_cost", "q": "_Qs",
             "cost_value": "_Cs"}
    model = WorldModel(**{ours: mlp_from(arrays, f"{prefix}.{theirs}", getattr(agent.model, ours))
                          for ours, theirs in names.items()})
    target = (mlp_from(arrays, f"{prefix}._target_Qs", agent.target[0]),
              mlp_from(arrays, f"{prefix}._target_Cs", agent.target[1]))
    return agent._replace(model=model, target=target, policy=mlp_from(arrays, f"{prefix}._pi", agent.policy),
                          lagrangian=Lagrangian(jnp.asarray(arrays[f"{prefix}.lagrange_multiplier"]),
                                                jnp.asarray(arrays[f"{prefix}.penalty_multiplier"])))


@functools.cache
def authors_agent():
    """Our agent with the authors' parameters, lambda, mu and S before the update, and fresh optimiser states."""
    layout = jax.eval_shape(lambda: spowl.init_agent(KEY, ARGS, SIZE["obs_dim"], rec.ACTION_DIM))
    agent = convert(GOLDEN, "params/", layout)
    model_opt, policy_opt = spowl.optimisers(ARGS, agent.model)
    return agent._replace(model_opt=model_opt.init(agent.model), policy_opt=policy_opt.init(agent.policy),
                          scale=jnp.float32(rec.SCALE))


def batch(episode_end=True):
    """The golden batch as ours ((H, B) scalars, `valid` = not done), with or without its episode end."""
    done = GOLDEN["done"][..., 0] & episode_end
    return Batch(obs=jnp.asarray(GOLDEN["obs"]), action=jnp.asarray(GOLDEN["action"]),
                 reward=jnp.asarray(GOLDEN["reward"][..., 0]), cost=jnp.asarray(GOLDEN["cost"][..., 0]),
                 terminated=jnp.asarray(GOLDEN["term"][..., 0]), valid=jnp.asarray(~done[:-1]))


@pytest.fixture(autouse=True)
def authors_draws(monkeypatch):
    """The Gaussian draws of record_authors.py: the MPPI noise table, and one fixed vector for the policy's."""
    monkeypatch.setattr(jax.random, "normal", rec.fixed_normal(GOLDEN["noise"]))


# ---------------------------------------------------------------------------------------------------------------------
# The quantities: each function returns {name: (ours, authors')}


def heads():
    """Encoder, dynamics and every head's raw outputs on the batch's first step (theirs: batch axis before heads)."""
    agent, data = authors_agent(), batch()
    z = encode(agent.model, data.obs[0])
    za = jnp.concatenate([z, data.action[0]], -1)
    heads_first = lambda x: np.swapaxes(x, 0, 1)  # noqa: E731
    return {"encoder h": (z, GOLDEN["head/encoder"]),
            "dynamics f": (next_latent(agent.model, z, data.action[0]), GOLDEN["head/dynamics"]),
            "reward R": (agent.model.reward(za), GOLDEN["head/reward"]),
            "cost heads C_j": (ensemble_apply(agent.model.cost, za), heads_first(GOLDEN["head/cost"])),
            "Q heads": (ensemble_apply(agent.model.q, za), heads_first(GOLDEN["head/q"])),
            "cost-value heads Q^c_j": (ensemble_apply(agent.model.cost_value, za),
                                       heads_first(GOLDEN["head/cost_value"])),
            "target Q heads": (ensemble_apply(agent.target[0], za), heads_first(GOLDEN["head/target_q"]))}


def eq6_targets(agent, data):
    z_next = encode(agent.model, data.obs[1:])
    action_next, _ = sample_action(agent.policy, z_next, KEY, ARGS)
    return z_next, td_targets(agent.target, z_next, action_next, data.reward, data.cost, data.terminated, KEY, ARGS)


def td():
    """Eq. 6's TD targets on every step of the batch (its terminal transition included)."""
    _, (q, cost_value) = eq6_targets(authors_agent(), batch())
    return {"TD target Q (Eq. 6)": (q, GOLDEN["td/q"]), "TD target Q^c (Eq. 6)": (cost_value, GOLDEN["td/cost_value"])}


def authors_consistency(model, data, latents, z_next):
    """The authors' consistency term: their masked mean over (batch, latent) entries subtracts one entry per masked
    row from the count, not L (`_mean` in their `make_step`), so a step with an episode end averages over
    B L - n entries instead of (B - n) L.  (Our term divides by (B - n) L.)"""
    valid = data.valid.astype(jnp.float32)
    z_pred = next_latent(model, latents[:-1], data.action)
    squares = (((z_pred - z_next) ** 2).sum(-1) * valid).sum(-1)
    count = valid.shape[1] * z_next.shape[-1] - (1 - valid).sum(-1)  # B L - n
    return (ARGS.rho ** jnp.arange(data.action.shape[0]) * squares / count).mean()


def loss_terms():
    """Every world-model loss term of Eq. 5 and the total, on the batch with an episode end, and the targets' means.
    The consistency term is compared with the authors' count (`authors_consistency`), a documented difference."""
    agent, data = authors_agent(), batch()
    z_next, (q_target, cost_value_target) = eq6_targets(agent, data)
    total, (terms, latents) = world_model_loss(agent.model, data, z_next, q_target, cost_value_target, KEY, ARGS)
    theirs = authors_consistency(agent.model, data, latents, z_next)
    ours_as_theirs = total + ARGS.consistency_coef * (theirs - terms["consistency"])
    g = lambda name: GOLDEN["update/" + name]  # noqa: E731
    return {"consistency (their count)": (theirs, g("consistency_loss")),
            "reward loss": (terms["reward"], g("reward_loss")), "value loss": (terms["value"], g("value_loss")),
            "cost loss": (terms["cost"], g("cost_loss")), "cost-value loss": (terms["cost_value"], g("cvalue_loss")),
            "total (their consistency)": (ours_as_theirs, g("total_loss")),
            "mean TD target Q": (q_target.mean(), g("value_targets")),
            "mean TD target Q^c": (cost_value_target.mean(), g("cvalue_targets"))}


updated = jax.jit(lambda agent, data: spowl.update(agent, data, KEY, ARGS))


def update_outputs():
    """One whole update (`spowl.update`) on the batch without its episode end: its world-model loss terms and TD
    targets, the policy loss of Eq. 7-10 and its parts, and lambda and mu after it.  The authors report the loss, Psi
    and S; their reward part is loss - Psi, and Delta comes from their multiplier step, lambda' = lambda + mu Delta
    (unclipped here)."""
    agent = authors_agent()
    after, info = updated(agent, batch(episode_end=False))
    g = lambda name: GOLDEN["update_no_end/" + name]  # noqa: E731
    delta = (GOLDEN["after/.lagrange_multiplier"] - rec.MULTIPLIER) / np.float32(rec.PENALTY)
    world_model = {f"update: {ours}": (info[ours], g(theirs)) for ours, theirs in (
        ("model_loss", "total_loss"), ("consistency", "consistency_loss"), ("reward", "reward_loss"),
        ("value", "value_loss"), ("cost", "cost_loss"), ("cost_value", "cvalue_loss"), ("q_target", "value_targets"),
        ("cost_value_target", "cvalue_targets"))}
    return world_model | {
        "policy loss": (info["policy_loss"], g("pi_loss")),
        "reward part": (info["reward_loss"], g("pi_loss") - g("psi")),
        "Psi (Eq. 10)": (info["psi"], g("psi")), "Delta": (info["delta"], delta), "S": (after.scale, g("pi_scale")[0]),
        "lambda after": (after.lagrangian.multiplier, GOLDEN["after/.lagrange_multiplier"]),
        "mu after": (after.lagrangian.penalty, GOLDEN["after/.penalty_multiplier"])}


def parameters(updates):
    """Every parameter (world model, targets, policy) after one or two whole updates on the batch without its episode
    end: gradient clip, Adam, the encoder's learning-rate scale, target EMA."""
    agent = authors_agent()
    data = batch(episode_end=False)
    for _ in range(updates):
        agent, _ = updated(agent, data)
    theirs = convert(GOLDEN, {1: "after/", 2: "after2/"}[updates], agent)
    flat = lambda a: jax.tree_util.tree_leaves_with_path((a.model, a.target, a.policy))  # noqa: E731
    return {f"after {updates} update(s): {jax.tree_util.keystr(path)}": (ours, authors)
            for (path, ours), (_, authors) in zip(flat(agent), flat(theirs))}


def plan_inputs(**changes):
    agent = authors_agent()
    z = encode(agent.model, jnp.asarray(GOLDEN["plan_obs"]))
    return agent, z, dataclasses.replace(ARGS, **changes)


def estimates():
    """J and J_c (Eq. 11) of given candidate sequences from one latent state."""
    agent, z, args = plan_inputs()
    value, cost_value = jax.jit(lambda z, candidates: planner.estimate_value(agent.model, agent.policy, z, candidates,
                                                                             KEY, args))(
        z, jnp.asarray(GOLDEN["plan/candidates"]))
    return {"latent z": (z, GOLDEN["plan/z"]), "J (Eq. 11)": (value, GOLDEN["plan/value"]),
            "J_c (Eq. 11)": (cost_value, GOLDEN["plan/cost_value"])}


def plans(cases):
    """`plan` in eval mode for each of `cases`: "iteration" (one MPPI iteration), "iterations2" (two: the second draws
    its samples with the first's std), "no_switch" (two at a high temperature, where one elite takes all the weight):
    the thresholds d_R, d_c (Eq. 12) and the number of elites of the last iteration, the new mean, and in the last
    case the plan's action."""
    agent, z, _ = plan_inputs()
    out = {}
    prev_mean = jnp.asarray(GOLDEN["prev_mean"])
    changes_of = {"iteration": {}, "iterations2": dict(iterations=2), "no_switch": dict(temperature=50.0, iterations=2)}
    for name in cases:
        g = lambda k: GOLDEN[f"plan_{name}_eval/{k}"]  # noqa: E731,B023
        args = dataclasses.replace(ARGS, **changes_of[name])
        # (the switch's bounds, 0.0 here, are the planner's thresholds only under --ci-thresholds)
        action, mean, info = jax.jit(lambda z: planner.plan(agent.model, agent.policy, z, prev_mean, 0.0, 0.0, KEY,
                                                            args, eval_mode=True))(z)  # noqa: B023
        out |= {f"{name}: mean": (mean, g("mean")), f"{name}: d_R (Eq. 12)": (info["d_reward"], g("value_threshold")),
                f"{name}: d_c (Eq. 12)": (info["d_cost"], g("safe_threshold")),
                f"{name}: elites": (info["elites"], g("improvement")),
                f"{name}: no improvement": (info["no_improvement"], g("no_improvement"))}
        if name == "no_switch":
            out[f"{name}: plan action"] = (action, g("action"))
    return out


def switch(agent, rule="ci"):
    """The switch of `act` (eval mode, a high temperature), its bootstrap draws made with the keys the authors'
    `get_action_stats` used (the first interval is the Q heads', the second the cost-value heads'): its bounds, its
    decision and the executed action."""
    keys = iter(jnp.asarray(GOLDEN[f"plan/key_{name}"]) for name in ("q_boot", "cost_boot"))
    interval = planner.bootstrap_interval
    with_their_key = lambda values, key, cfg: interval(values, next(keys), cfg)  # noqa: E731
    args = dataclasses.replace(ARGS, temperature=50.0, iterations=2, switch_rule=rule)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "bootstrap_interval", with_their_key)
        action, _, info = jax.jit(lambda obs, prev_mean: planner.act(agent.model, agent.policy, obs, prev_mean, KEY,
                                                                     args, eval_mode=True))(
            jnp.asarray(GOLDEN["plan_obs"])[None], jnp.asarray(GOLDEN["prev_mean"])[None])
    g = lambda k: GOLDEN["plan_switch_eval/" + k]  # noqa: E731
    return {"switch bound Q low": (info["q_low"][0], g("reward_value_CI_low")),
            "switch bound Q^c high": (info["qc_high"][0], g("cost_value_CI_high")),
            "switch uses plan": (info["used_plan"][0], g("improve_action")),
            "executed action": (action[0], g("action"))}


GROUPS = {"heads": heads, "td": td, "loss": loss_terms, "update": update_outputs,
          "params": lambda: parameters(1) | parameters(2), "estimates": estimates,
          "iteration": lambda: plans(["iteration"]), "iterations": lambda: plans(["iterations2", "no_switch"]),
          "switch": lambda: switch(authors_agent())}


def worst(pairs):
    return {name: float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
            for name, (ours, theirs) in pairs.items()}


def check(group):
    differences = worst(GROUPS[group]())
    failed = {name: d for name, d in differences.items() if not d <= TOLERANCE[group]}
    assert not failed, f"differs from the authors' beyond {TOLERANCE[group]}: {failed}"


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_heads_match_the_authors():
    check("heads")


def test_td_targets_match_the_authors():
    check("td")


def test_world_model_loss_terms_match_the_authors():
    check("loss")


def test_our_consistency_term_counts_latent_entries_of_valid_rows_only():
    """The documented difference: ours averages the consistency term over the (B - n) L entries of the rows that
    stay in their episode; without an episode end the two counts agree (checked by the whole update's parameters)."""
    agent, data = authors_agent(), batch()
    z_next, (q_target, cost_value_target) = eq6_targets(agent, data)
    _, (terms, latents) = world_model_loss(agent.model, data, z_next, q_target, cost_value_target, KEY, ARGS)
    z_pred = next_latent(agent.model, latents[:-1], data.action)
    per_row = ((z_pred - z_next) ** 2).mean(-1)
    valid = data.valid.astype(jnp.float32)
    per_step = (per_row * valid).sum(-1) / valid.sum(-1)
    ours = (ARGS.rho ** jnp.arange(data.action.shape[0]) * per_step).mean()
    assert abs(float(terms["consistency"] - ours)) <= 1e-7
    assert float(terms["consistency"]) > float(GOLDEN["update/consistency_loss"]) + 1e-4  # their count is larger


def test_update_losses_policy_loss_and_multipliers_match_the_authors():
    check("update")


def test_all_parameters_after_whole_updates_match_the_authors():
    check("params")


def test_planner_estimates_match_the_authors():
    check("estimates")


def test_one_planner_iteration_matches_the_authors():
    check("iteration")


def test_two_planner_iterations_and_the_plan_action_match_the_authors():
    check("iterations")


def test_switch_matches_the_authors():
    check("switch")


def test_plan_cost_agg_max_differs_from_the_authors_as_documented():
    """`--plan-cost-agg max` (the paper's Eq. 11) adds sum_t gamma_c^t (max_j - mean_j) c_j(z_t, a_t) to the authors'
    J_c."""
    agent, z, args = plan_inputs(plan_cost_agg="max")

    @jax.jit
    def estimate_and_gap(z, candidates):  # J_c, and the cost heads' max - mean along each sequence's latents
        def step(z, action):
            return next_latent(agent.model, z, action), head_values(agent.model.cost, z, action, args)

        _, costs = jax.lax.scan(step, jnp.broadcast_to(z, (candidates.shape[1], z.shape[-1])), candidates)
        gap = args.cost_gamma ** jnp.arange(args.horizon) @ (costs.max(1) - costs.mean(1))
        return planner.estimate_value(agent.model, agent.policy, z, candidates, KEY, args)[1], gap

    cost_value, gap = estimate_and_gap(z, jnp.asarray(GOLDEN["plan/candidates"]))
    assert float(gap.min()) > 1e-3
    np.testing.assert_allclose(cost_value, GOLDEN["plan/cost_value"] + gap, atol=TOLERANCE["estimates"])


def test_switch_rule_mean_differs_from_the_authors_as_documented():
    """`--switch-rule mean` (the paper's Alg. 2) bounds by the policy action's head means, which lie inside the
    authors' bootstrap intervals."""
    agent, z, args = plan_inputs()
    info = switch(agent, rule="mean")
    policy_action = deterministic_action(agent.policy, z)
    q_mean = decode(ensemble_apply(agent.model.q, jnp.concatenate([z, policy_action])), args).mean()
    qc_mean = decode(ensemble_apply(agent.model.cost_value, jnp.concatenate([z, policy_action])), args).mean()
    np.testing.assert_allclose([info["switch bound Q low"][0], info["switch bound Q^c high"][0]], [q_mean, qc_mean],
                               atol=1e-5)
    assert GOLDEN["plan_switch_eval/reward_value_CI_low"] <= q_mean <= GOLDEN["plan_switch_eval/reward_value_CI_high"]
    assert GOLDEN["plan_switch_eval/cost_value_CI_low"] <= qc_mean <= GOLDEN["plan_switch_eval/cost_value_CI_high"]


if __name__ == "__main__":  # the table of docs/fidelity.md
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.random, "normal", rec.fixed_normal(GOLDEN["noise"]))
        for group in sys.argv[1:] or GROUPS:
            differences = worst(GROUPS[group]())
            if group == "params":
                differences = {f"all {len(differences) // 2} parameter arrays, after 1 and after 2 updates":
                               max(differences.values())}
            for name, d in differences.items():
                print(f"| {name} | {d:.1e} | {TOLERANCE[group]:.0e} |")
