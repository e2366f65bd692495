"""SPOWL's safe improvement planner and action switch (Sec. 4.3-4.4; Eq. 11-12; Alg. 1-2).

Each step, for every env: roll the policy prior and Gaussian action sequences through the latent dynamics, score
each by its value J and cost value J_c (Eq. 11), keep the elites that beat the policy prior in *both* (Alg. 1,
adaptive thresholds of Eq. 12), refit the sampling distribution to them (MPPI), and finally execute the plan's first
action only if its Q is not lower and its cost-Q not higher than the policy action's (Alg. 2, the switch).

The comparison planners are other elite rules of the same planner (`args.planner`, `ELITE_RULES`): `tdmpc2` (top-k
by J, no cost) and `cce` (a fixed threshold on J_c, Sec. 5.1).  Acting modes (`args.act`): `switch` (SPOWL), `plan`,
`policy`.
Everything is fixed-shape, so `act` is one jittable function batched over envs; horizon and iterations are scans.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from policy import deterministic_action, sample_action
from world_model import aggregate, decode, encode, for_acting, head_values, next_latent

def estimate_value(model, policy, z, actions, key, args):
    """J^M and J_c^M of Eq. 11 for N action sequences (H, N, A) from one latent z (L,): -> (N,), (N,).

    J = sum_i gamma^i r_i + gamma^H Q_avg(z_H, pi(z_H)), Q_avg the mean of 2 random heads (authors' choice).
    J_c = sum_i gamma_c^i c_i + gamma_c^H Q^c_avg(z_H, pi(z_H)), c_i the immediate cost aggregated over the cost
    ensemble (`plan_cost_agg`: mean as the authors' code, max as the paper).  CCE's `local` estimate is instead the
    undiscounted sum of max-over-ensemble immediate costs with no bootstrap (Sec. 5.1); `tdmpc2` has no J_c.
    """
    horizon = actions.shape[0]
    with_cost = uses_cost(args)

    def step(z, action):
        reward = decode(model.reward(jnp.concatenate([z, action], -1)), args)
        cost = head_values(model.cost, z, action, args) if with_cost else jnp.zeros((1, *reward.shape))
        return next_latent(model, z, action), (reward, cost)

    # The horizon is short: unrolled, the rollout is H copies of the step, with no loop to run (docs/compiling.md).
    z_last, (rewards, costs) = jax.lax.scan(step, jnp.broadcast_to(z, (actions.shape[1], z.shape[-1])), actions,
                                            unroll=True)
    keys = jax.random.split(key, 3)
    action_last, _ = sample_action(policy, z_last, keys[0], args)
    q = aggregate(head_values(model.q, z_last, action_last, args), keys[1], args.q_subsample, "avg")
    value = args.gamma ** jnp.arange(horizon) @ rewards + args.gamma**horizon * q
    if not with_cost:
        return value, jnp.zeros_like(value)
    if args.planner == "cce" and args.cce_estimate == "local":
        return value, costs.max(1).sum(0)
    immediate = costs.max(1) if args.plan_cost_agg == "max" else costs.mean(1)  # (H, N)
    cost_value = aggregate(head_values(model.cost_value, z_last, action_last, args), keys[2], args.cost_subsample,
                           "avg")
    return value, args.cost_gamma ** jnp.arange(horizon) @ immediate + args.cost_gamma**horizon * cost_value


def top_k_mask(scores, k):
    """Boolean mask of the k highest scores."""
    return jnp.zeros(scores.shape, bool).at[jax.lax.top_k(scores, k)[1]].set(True)


def select_elites(value, cost_value, d_reward, d_cost, is_prior, num_elites, restrict=True):
    """SelectElites (Alg. 1): the sequences that beat both thresholds, capped to the top-k by J.

    Improvement set = {J >= d_R and J_c <= d_c}; if it is empty the elites are the policy prior, if it has at most
    k members all of them, else the k best by J (`restrict=False` drops the cap).  Returns (elite mask, MPPI score,
    whether the set was empty): the flag tells the fallback apart from an improvement set as large as the prior.
    """
    improvement = (value >= d_reward) & (cost_value <= d_cost)
    elites = improvement & top_k_mask(jnp.where(improvement, value, -jnp.inf), num_elites) if restrict else improvement
    empty = ~improvement.any()
    return jnp.where(empty, is_prior, elites), value, empty


def select_top_k(value, num_elites):
    """TD-MPC2's elite rule: the k best sequences by J, costs ignored."""
    return top_k_mask(value, num_elites), value


def select_cce(value, cost_value, d_plan, num_elites):
    """Constrained cross-entropy (Sec. 3.2 Eq. 4, Sec. 5.1): the top-k by J among {J_c < d_plan} when there are k
    feasible sequences, else the k lowest J_c, scored by -J_c so MPPI weighs them toward low cost."""
    feasible = cost_value < d_plan
    enough = feasible.sum() >= num_elites
    elites = jnp.where(enough, top_k_mask(jnp.where(feasible, value, -jnp.inf), num_elites),
                       top_k_mask(-cost_value, num_elites))
    return elites, jnp.where(enough, value, -cost_value)


def spowl_elites(value, cost_value, is_prior, policy_bounds, args):
    """SPOWL's elite rule: Alg. 1 with the adaptive thresholds of Eq. 12, the prior's mean J and J_c (Fig. 2's caption),
    or with --ci-thresholds the policy action's bootstrap bounds (the authors' `use_ci_thresholds`)."""
    num_prior = args.num_pi_trajs
    prior_means = (value[:num_prior].mean(), cost_value[:num_prior].mean())
    d_reward, d_cost = policy_bounds if args.ci_thresholds else prior_means
    elites, score, empty = select_elites(value, cost_value, d_reward, d_cost, is_prior, args.num_elites,
                                         args.restrict_elites)
    return elites, score, {"no_improvement": empty, "d_reward": d_reward, "d_cost": d_cost}


class EliteRule(NamedTuple):
    select: Callable  # (value (N,), cost_value (N,), is_prior (N,), policy_bounds, args) -> elites, score, diagnostics
    uses_cost: bool  # whether the planner scores J_c and the policy trains under the Augmented Lagrangian


# The elite rules `--planner` chooses from; a new rule is a function with `select`'s signature, declared here.
ELITE_RULES = {
    "spowl": EliteRule(spowl_elites, uses_cost=True),
    "tdmpc2": EliteRule(lambda value, cost_value, is_prior, bounds, args: (*select_top_k(value, args.num_elites), {}),
                        uses_cost=False),
    "cce": EliteRule(lambda value, cost_value, is_prior, bounds, args: (
        *select_cce(value, cost_value, args.cce_threshold, args.num_elites), {}), uses_cost=True),
}


def elite_rule(args):
    """The rule --planner names; an unknown name raises ValueError."""
    if args.planner not in ELITE_RULES:
        raise ValueError(f"--planner {args.planner}: no such elite rule (planner.ELITE_RULES: "
                         f"{', '.join(ELITE_RULES)})")
    return ELITE_RULES[args.planner]


def uses_cost(args):
    return elite_rule(args).uses_cost


def refit(actions, score, elites, args):
    """MPPI refit of the sampling distribution to the elites: weights w ~ exp(temperature (score - max score)) over
    the elites (zero elsewhere), and their weighted mean and std of the actions (H, N, A), the std clipped to
    [min_std, max_std].  Returns mean (H, A), std (H, A) and the weights (N,)."""
    weights = jax.nn.softmax(jnp.where(elites, args.temperature * score, -jnp.inf))
    mean = jnp.einsum("n,hna->ha", weights, actions)
    std = jnp.sqrt(jnp.einsum("n,hna->ha", weights, (actions - mean[:, None]) ** 2))
    return mean, jnp.clip(std, args.min_std, args.max_std), weights


def plan(model, policy, z, prev_mean, policy_value, policy_cost_value, key, args, eval_mode=False):
    """Safe improvement planning for one env (Sec. 4.3; the planning loop of Alg. 2).

    z (L,): the encoded observation; prev_mean (H, A): last step's plan mean (zeros at an episode start), shifted
    one step as the warm start.  policy_value / policy_cost_value are the switch's bounds for the policy action,
    used as d_R / d_c only when `args.ci_thresholds` is set (the authors' `use_ci_thresholds`, off by default).
    Returns the plan action (A,) -- one elite drawn with its MPPI weight, plus std[0] noise in training -- the
    new plan mean (H, A) and the last iteration's diagnostics: `elites` (their number) and, for SPOWL's rule only,
    `no_improvement` (the improvement set was empty, so the elites are the policy prior) and the thresholds
    `d_reward`, `d_cost`.
    """
    horizon, num_prior, num_samples = args.horizon, args.num_pi_trajs, args.num_samples
    action_dim = prev_mean.shape[-1]
    key_prior, key_iterations, key_pick, key_noise = jax.random.split(key, 4)
    select = elite_rule(args).select

    def prior_step(z, key):
        action, _ = sample_action(policy, z, key, args)
        return next_latent(model, z, action), action

    z_prior = jnp.broadcast_to(z, (num_prior, z.shape[-1]))
    _, prior = jax.lax.scan(prior_step, z_prior, jax.random.split(key_prior, horizon), unroll=True)  # (H, P, A)
    is_prior = jnp.arange(num_samples) < num_prior

    def iteration(carry, key):
        mean, std, _, _ = carry
        key_sample, key_value = jax.random.split(key)
        noise = jax.random.normal(key_sample, (horizon, num_samples - num_prior, action_dim))
        actions = jnp.concatenate([prior, jnp.clip(mean[:, None] + std[:, None] * noise, -1, 1)], 1)  # (H, N, A)
        value, cost_value = map(jnp.nan_to_num, estimate_value(model, policy, z, actions, key_value, args))
        elites, score, diagnostics = select(value, cost_value, is_prior, (policy_value, policy_cost_value), args)
        mean, std, weights = refit(actions, score, elites, args)
        return (mean, std, actions, weights), {"elites": elites.sum(), **diagnostics}

    warm_start = jnp.concatenate([prev_mean[1:], jnp.zeros((1, action_dim))])
    init = (warm_start, jnp.full((horizon, action_dim), args.max_std), jnp.zeros((horizon, num_samples, action_dim)),
            jnp.zeros(num_samples))
    (mean, std, actions, weights), per_iteration = jax.lax.scan(
        iteration, init, jax.random.split(key_iterations, args.iterations))
    action = actions[0, jax.random.categorical(key_pick, jnp.log(weights))]
    if not eval_mode:
        action = action + std[0] * jax.random.normal(key_noise, (action_dim,))
    return jnp.clip(action, -1, 1), mean, jax.tree.map(lambda x: x[-1], per_iteration)


def bootstrap_interval(values, key, args):
    """95 % bootstrap confidence interval of the mean of an ensemble's values (n,): -> (low, high).

    As the authors' `get_action_stats` in `spowl/spowl/policies.py`."""
    resampled = jax.random.choice(key, values, (args.ci_resamples, values.shape[0])).mean(-1)
    return jnp.percentile(resampled, 2.5), jnp.percentile(resampled, 97.5)


def act(model, policy, obs, prev_mean, key, args, eval_mode=False):
    """SPOWL model predictive control for a batch of envs (Alg. 2): plan, then switch between plan and policy.

    obs (E, O), prev_mean (E, H, A).  The switch (`act='switch'`) executes the plan action iff its Q_avg is at
    least the policy action's bound and its Q^c_avg at most the policy action's bound: by default the bootstrap
    interval of the policy action's ensemble (low end for Q, high end for Q^c), as `restrict_action` in the authors'
    `plan` (`spowl/spowl/policies.py`); with `switch_rule='mean'` the paper's plain averages.  In eval mode the
    policy action is tanh(mean) and the plan action carries no exploration noise.

    Returns (action (E, A), next plan mean (E, H, A), info), info a dict of (E,) arrays: `used_plan` marks executed
    plan actions (the paper's Balance); unless `act='policy'`, the planner's diagnostics (see `plan`); with
    `act='switch'`, the bounds it compared against, `q_low` and `qc_high`.  The networks' products run at
    `plan_precision`, and LayerNorm takes its averages as products on a CPU, as reductions elsewhere (`layer_norm`).
    """
    model, policy = for_acting((model, policy), args.plan_precision, jax.default_backend() == "cpu")
    num_envs = obs.shape[0]
    key_pi, key_bound, key_plan, key_switch = jax.random.split(key, 4)
    z = encode(model, obs)
    if eval_mode:
        policy_action = deterministic_action(policy, z)
    else:
        policy_action, _ = sample_action(policy, z, key_pi, args)
    if args.act == "policy":
        return policy_action, prev_mean, {"used_plan": jnp.zeros(num_envs, bool)}

    def q_avg(action, key):  # (E,) values and cost values of one action per env, averaged as in Eq. 11
        key_q, key_c = jax.random.split(key)
        return (aggregate(head_values(model.q, z, action, args), key_q, args.q_subsample, "avg"),
                aggregate(head_values(model.cost_value, z, action, args), key_c, args.cost_subsample, "avg"))

    if args.switch_rule == "ci":
        keys = jax.random.split(key_bound, (2, num_envs))
        interval = jax.vmap(bootstrap_interval, in_axes=(1, 0, None))
        policy_value = interval(head_values(model.q, z, policy_action, args), keys[0], args)[0]
        policy_cost_value = interval(head_values(model.cost_value, z, policy_action, args), keys[1], args)[1]
    else:
        policy_value, policy_cost_value = q_avg(policy_action, key_bound)

    plan_one = lambda *inputs: plan(model, policy, *inputs, args, eval_mode)  # noqa: E731
    plan_action, mean, plan_info = jax.vmap(plan_one)(z, prev_mean, policy_value, policy_cost_value,
                                                      jax.random.split(key_plan, num_envs))
    if args.act == "plan":
        return plan_action, mean, {"used_plan": jnp.ones(num_envs, bool), **plan_info}
    plan_value, plan_cost_value = q_avg(plan_action, key_switch)
    use_plan = (plan_value >= policy_value) & (plan_cost_value <= policy_cost_value)
    info = {"used_plan": use_plan, **plan_info, "q_low": policy_value, "qc_high": policy_cost_value}
    return jnp.where(use_plan[:, None], plan_action, policy_action), mean, info
