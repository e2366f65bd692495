"""Tests of SPOWL the algorithm: the math, the components against the paper's equations and algorithms, the replay
buffer, and learning on the pure-JAX test-bed.  The run machinery around it is tested in test_driver.py, and the
shared fixtures are in conftest.py.

    pytest -q -m "not slow" -n 2 --dist loadgroup test_spowl.py   # unit tests on both cores: the development loop
    XLA_FLAGS=--xla_backend_optimization_level=1 pytest -q -m slow test_spowl.py   # whole runs, one at a time
    pytest -q test_spowl.py -k learn                              # only the learning test on the pure-JAX env

Each equation is checked against a hand computation or a plain implementation, on inputs where a mistake shows:
ensembles whose heads disagree, nonzero costs, terminal steps, gamma != gamma_c.
"""

import csv
import dataclasses
import functools
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import benchmark
import buffer as replay
import jax_env
import planner
import policy
import spowl
import world_model
from conftest import (ACTION_DIM, HAND_POLICY_ACTION, OBS_DIM, REPO_DIR, heads, hand_built_model, perturbed_model,
                      pinned_policy, random_batch, read_rows, spowl_start)
from planner import act, bootstrap_interval, estimate_value, plan, refit, select_cce, select_elites
from policy import Lagrangian, augmented_lagrangian, init_policy, policy_loss, update_lagrangian
from world_model import (aggregate, decode, encode, ensemble_apply, for_acting, init_world_model, layer_norm, matmul,
                         mish, next_latent, simnorm, symexp, symlog, td_targets, two_hot, targets, world_model_loss)


# ---------------------------------------------------------------------------------------------------------------------
# Math helpers


def test_one_exponential_mish_is_jax_mish():
    """The MLPs' cheaper Mish against the plain x tanh(softplus(x)), values and gradients, within 1e-5."""
    x = jnp.linspace(-40.0, 40.0, 100_001)
    np.testing.assert_allclose(mish(x), jax.nn.mish(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(jax.grad(mish))(x), jax.vmap(jax.grad(jax.nn.mish))(x), rtol=1e-5, atol=1e-5)
    assert np.isfinite(jax.vmap(jax.grad(mish))(jnp.array([-1e4, 1e4, 0.0]))).all()


def at_level_1(fn):
    """`fn` jitted and compiled at optimisation level 1, as the runs compile it: its float rounding is a run's (level 0
    computes the LayerNorm's products with other roundings, up to 2e-5 apart on the inputs below)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 1})


@pytest.mark.parametrize("by_products", [True, False], ids=["products", "reductions"])
def test_layer_norm_both_ways_is_the_plain_layer_norm(by_products):
    """The MLPs' LayerNorm, with averages as products with a column of 1/n (CPU, updates) or as reductions (acting on
    a GPU), against plain mean / variance reductions, values and gradients, within 1e-5, on inputs with a large common
    offset."""

    def plain(x, scale, offset, eps=1e-5):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + offset

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = 3 * jax.random.normal(keys[0], (4, 256, 128)) + jnp.array([0.0, 1.0, -20.0, 100.0])[:, None, None]
    scale, offset = 1 + 0.1 * jax.random.normal(keys[1], (128,)), 0.1 * jax.random.normal(keys[2], (128,))
    loss = lambda norm: lambda *a: (jnp.sin(norm(*a)) * jnp.arange(128)).sum()  # noqa: E731
    ours = functools.partial(layer_norm, by_products=by_products)
    np.testing.assert_allclose(at_level_1(ours)(x, scale, offset), plain(x, scale, offset), rtol=1e-5, atol=1e-5)
    for grad, reference in zip(at_level_1(jax.grad(loss(ours), (0, 1, 2)))(x, scale, offset),
                               jax.grad(loss(plain), (0, 1, 2))(x, scale, offset)):
        np.testing.assert_allclose(grad, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_a_world_models_heads_are_the_same_with_either_layer_norm(tiny):
    """A world model's heads give the same values with LayerNorm's averages as products (updates) and as reductions
    (acting on a GPU), within 1e-5."""
    model = init_world_model(jax.random.PRNGKey(1), tiny, OBS_DIM, ACTION_DIM)
    last = jax.random.normal(jax.random.PRNGKey(2), model.q.weights[-1].shape)  # not the zeros that predict 0
    model = eqx.tree_at(lambda m: m.q.weights[-1], model, last)
    obs, action = jax.random.normal(jax.random.PRNGKey(3), (64, OBS_DIM)), jnp.full((64, ACTION_DIM), 0.3)
    logits = [at_level_1(lambda m: ensemble_apply(m.q, jnp.concatenate([encode(m, obs), action], -1)))(m)
              for m in (model, for_acting(model, "float32", False))]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5 * np.abs(logits[0]).max())


def test_simnorm_is_a_softmax_over_each_group():
    """SimNorm against a plain per-group softmax in float64, on inputs whose groups differ in scale and offset."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64)) * jnp.repeat(jnp.arange(1.0, 9.0), 8) + 2.0
    groups = np.asarray(x, np.float64).reshape(3, 8, 8)
    plain = np.exp(groups - groups.max(-1, keepdims=True))
    plain = (plain / plain.sum(-1, keepdims=True)).reshape(3, 64)
    np.testing.assert_allclose(simnorm(x, 8), plain, rtol=1e-5, atol=1e-7)
    assert np.ptp(plain) > 0.5  # far from uniform


def test_symlog_symexp_are_the_signed_log1p_and_expm1():
    """symlog(x) = sign(x) log(1 + |x|) and symexp its inverse, against hand values and numpy."""
    e = np.e
    np.testing.assert_allclose(symlog(jnp.array([e - 1, -(e**2 - 1), 0.0])), [1.0, -2.0, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(symexp(jnp.array([1.0, -2.0, 0.0])), [e - 1, -(e**2 - 1), 0.0], rtol=1e-6, atol=1e-7)
    x = jnp.array([-1e4, -3.7, -1e-3, 0.0, 2e-4, 1.0, 42.0, 1e4])
    np.testing.assert_allclose(symlog(x), np.sign(x) * np.log1p(np.abs(x)), rtol=1e-6)
    np.testing.assert_allclose(symexp(symlog(x)), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(symlog(symexp(x[2:-1])), x[2:-1], rtol=1e-5, atol=1e-6)


def test_two_hot_round_trip_and_clipping(tiny):
    x = jnp.array([-500.0, -7.3, -0.05, 0.0, 0.31, 1.0, 12.5, 9000.0])
    encoded = two_hot(x, tiny)
    np.testing.assert_allclose(encoded.sum(-1), 1.0, rtol=1e-6)
    assert ((encoded > 0).sum(-1) <= 2).all()
    np.testing.assert_allclose(decode(jnp.log(encoded + 1e-30), tiny), x, rtol=1e-3, atol=1e-5)
    # Beyond the support the encoding saturates at the outermost bins.
    edge = two_hot(jnp.array([1e9, -1e9]), tiny)
    assert edge[0, -1] == 1.0 and edge[1, 0] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# World model and update


@pytest.mark.slow
def test_world_model_loss_drops_on_a_fixed_batch(tiny):
    args = tiny
    agent = spowl.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    batch = random_batch(jax.random.PRNGKey(1), args)
    # 150 updates run 3 times faster compiled at optimisation level 1 (16 s to compile, against 6 s at level 0).
    update = jax.jit(spowl.update, static_argnums=3, compiler_options={"xla_backend_optimization_level": 1})
    losses = []
    for i in range(150):  # measured: the last 10 losses at 0.35 x the first (0.49 x after 100, 0.22 x after 300)
        agent, info = update(agent, batch, jax.random.PRNGKey(i), args)
        losses.append(float(info["model_loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) <= 0.5 * losses[0], (losses[0], losses[-10:])


def test_cost_dropout_is_active_in_the_world_model_loss(tiny, batch):
    """--cost-dropout acts where the authors' `make_step` runs the cost heads in training mode: the world-model loss."""
    h, b = batch.reward.shape
    z_next = jax.random.uniform(jax.random.PRNGKey(2), (h, b, tiny.latent_dim))

    model = perturbed_model(tiny)  # the dropout rate is a static field of the cost heads, the rest as tiny's

    def cost_loss(rate, key):
        args = dataclasses.replace(tiny, cost_dropout=rate)
        with_rate = eqx.tree_at(lambda m: m.cost, model, dataclasses.replace(model.cost, dropout=rate))
        _, (terms, _) = world_model_loss(with_rate, batch, z_next, jnp.ones((h, b)), jnp.ones((h, b)),
                                         jax.random.PRNGKey(key), args)
        return float(terms["cost"])

    assert abs(cost_loss(0.5, 0) - cost_loss(0.5, 1)) > 1e-4
    assert cost_loss(0.0, 0) == cost_loss(0.0, 1)


def test_one_encoder_layer_keeps_a_hidden_layer(tiny):
    """As in the authors' `WorldModel.__init__`: max(num_enc_layers - 1, 1) hidden layers."""
    def shapes(num_enc_layers):
        args = dataclasses.replace(tiny, num_enc_layers=num_enc_layers)
        return [w.shape for w in init_world_model(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM).encoder.weights]

    hidden_layer = [(OBS_DIM, tiny.enc_dim), (tiny.enc_dim, tiny.latent_dim)]
    assert shapes(1) == shapes(2) == hidden_layer
    assert len(shapes(3)) == 3


def test_no_loss_term_spans_an_episode_boundary(tiny, batch):
    """Whatever lies across a boundary (valid=False) -- action, reward, cost, targets -- changes no loss term."""
    args = tiny
    model = perturbed_model(args)
    valid = jnp.ones_like(batch.valid).at[1, :5].set(False).at[0, 7].set(False)
    batch = batch._replace(valid=valid)
    h, b = batch.reward.shape
    z_next = jax.random.uniform(jax.random.PRNGKey(2), (h, b, args.latent_dim))
    q, qc = jnp.ones((h, b)), jnp.ones((h, b))

    def loss(batch, q, qc):
        total, (terms, _) = world_model_loss(model, batch, z_next, q, qc, jax.random.PRNGKey(3), args)
        return total, terms

    base_total, base_terms = loss(batch, q, qc)
    crossed = ~valid
    garbage = batch._replace(action=jnp.where(crossed[..., None], 0.9, batch.action),
                             reward=jnp.where(crossed, 1e3, batch.reward), cost=jnp.where(crossed, 5.0, batch.cost))
    total, terms = loss(garbage, jnp.where(crossed, -1e3, q), jnp.where(crossed, 1e3, qc))
    for name in base_terms:
        np.testing.assert_allclose(terms[name], base_terms[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(total, base_total, rtol=1e-6)
    # ...while the same change on valid steps does change the loss.
    changed, _ = loss(batch._replace(reward=batch.reward + 3.0), q, qc)
    assert abs(float(changed) - float(base_total)) > 1e-4


@pytest.mark.parametrize("agg, bootstrap", [("avg", 4.0), ("min", 2.0), ("max", 6.0)])
def test_td_targets_are_eq_6_with_the_terminal_mask(hand, agg, bootstrap):
    """Eq. 6 against hand values: Q_t = r_t + gamma (1 - term_t) min(2 distinct target Q heads), Q^c_t = c_t + gamma_c
    (1 - term_t) agg(all target Q^c heads).  Target Q head j predicts j + 1, so the min of two distinct heads is 1-4
    (1 in 4 of 10 draws); Q^c head j predicts 2 + j: mean 4, min 2, max 6."""
    cfg = dataclasses.replace(hand, q_subsample=2)  # gamma 0.9, gamma_c 0.6
    target = (heads(lambda z, a, j, p: j + 1 + 0 * a[..., 0], cfg),
              heads(lambda z, a, j, p: 2 + j + 0 * a[..., 0], cfg))
    h, b = 3, 2000
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    z_next, action_next = jnp.zeros((h, b, cfg.latent_dim)), jax.random.uniform(keys[0], (h, b, 1))
    reward, cost = jax.random.normal(keys[1], (h, b)), jax.random.uniform(keys[2], (h, b))
    terminated = (jnp.arange(b) % 4 == 0) * jnp.ones((h, 1))
    alive = np.asarray(terminated) == 0
    q, qc = td_targets(target, z_next, action_next, reward, cost, terminated, keys[3],
                       dataclasses.replace(cfg, cost_target_agg=agg))
    np.testing.assert_allclose(qc, cost + 0.6 * bootstrap * alive, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(q)[~alive], np.asarray(reward)[~alive], rtol=1e-5, atol=1e-5)
    low = np.round((np.asarray(q - reward)[alive]) / 0.9, 3)
    np.testing.assert_allclose([np.mean(low == v) for v in range(1, 6)], [0.4, 0.3, 0.2, 0.1, 0.0], atol=0.02)


@pytest.mark.xdist_group("update")  # one compile of jit_update per config for this group's tests under `pytest -n`
@pytest.mark.parametrize("terminal", [0.0, 1.0], ids=["alive", "terminal"])
def test_update_passes_the_batchs_terminations_to_the_td_targets(tiny, agent, batch, jit_update, terminal):
    """With every step terminal, the targets of `update` are the rewards and costs themselves; with none, not."""
    perturbed = perturbed_model(tiny)
    agent = agent._replace(target=(perturbed.q, perturbed.cost_value))  # nonzero targets
    _, info = jit_update(agent, batch._replace(terminated=jnp.full_like(batch.reward, terminal)),
                         jax.random.PRNGKey(2), tiny)
    ended = np.isclose([info["q_target"], info["cost_value_target"]], [batch.reward.mean(), batch.cost.mean()],
                       rtol=1e-5, atol=1e-6)
    assert ended.all() == bool(terminal), (terminal, info["q_target"], info["cost_value_target"])


@pytest.mark.xdist_group("update")  # one compile of jit_update per config for this group's tests under `pytest -n`
def test_update_and_planner_do_not_retrace(tiny, agent, jit_update, jit_act):
    """The jitted update and planning call trace once: new values every call, and a fresh but equal config."""
    args = tiny

    def traces():  # how often each was traced (one compiled program per trace), by this test or others before it
        return {"update": jit_update._cache_size(), "act": jit_act._cache_size()}

    mean = jnp.zeros((2, args.horizon, ACTION_DIM))
    for i in range(3):  # new values every call (the agent the update returned), and a fresh but equal config
        cfg = dataclasses.replace(args)
        agent, _ = jit_update(agent, random_batch(jax.random.PRNGKey(i), args), jax.random.PRNGKey(i), cfg)
        obs = jax.random.normal(jax.random.PRNGKey(10 + i), (2, OBS_DIM))
        _, mean, _ = jit_act(agent.model, agent.policy, obs, mean, jax.random.PRNGKey(i), cfg, False)
        if i == 0:
            traced = traces()
    assert traces() == traced and traced["update"] >= 1 and traced["act"] >= 1


@pytest.mark.parametrize("network", ["world_model", "policy"])
def test_flat_optimisers_step_as_the_plain_optimisers_on_each_parameter_array(tiny, agent, network):
    """Clip and Adam on each network's parameters as one flat vector (`spowl.optimisers`) agree within 1e-5 with the
    plain optax chains on the parameter arrays, held here: over steps where the global-norm clip binds and where it
    does not, the encoder's learning-rate scale included; and they are a fraction of the plain chains' operations."""
    args = tiny
    encoder_only = eqx.tree_at(lambda m: m.encoder, jax.tree.map(lambda _: False, agent.model),
                               jax.tree.map(lambda _: True, agent.model.encoder))
    clip = optax.clip_by_global_norm(args.grad_clip_norm)
    plain_chains = (optax.chain(clip, optax.adam(args.lr), optax.masked(optax.scale(args.enc_lr_scale), encoder_only)),
                    optax.chain(clip, optax.adam(args.lr, eps=args.policy_adam_eps)))
    i = ["world_model", "policy"].index(network)
    params, flat, plain = (agent.model, agent.policy)[i], spowl.optimisers(args, agent.model)[i], plain_chains[i]
    flat_state, plain_state = flat.init(params), plain.init(params)
    leaves, tree = jax.tree.flatten(params)
    clipped = []
    for step, size in enumerate([1.0, 1e-4, 1e-2, 3.0]):
        keys = jax.random.split(jax.random.PRNGKey(step), len(leaves))
        grads = jax.tree.unflatten(tree, [size * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        clipped.append(float(optax.tree.norm(grads)) > args.grad_clip_norm)
        flat_updates, flat_state = flat.update(grads, flat_state, params)
        plain_updates, plain_state = plain.update(grads, plain_state, params)
        for a, b in zip(jax.tree.leaves(flat_updates), jax.tree.leaves(plain_updates)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert any(clipped) and not all(clipped)
    flat_size, plain_size = (benchmark.operations(jax.make_jaxpr(opt.update)(grads, state, params).jaxpr)
                             for opt, state in [(flat, flat_state), (plain, plain_state)])
    assert flat_size < plain_size / 3  # the point: a few operations for all the arrays, not a few per array


def test_bfloat16_planning_rounds_the_planners_products_and_nothing_else(tiny, jit_act):
    """--plan-precision bfloat16: the planning call's network products take bfloat16 inputs (all its matmul FLOPs but
    LayerNorm's averages and the decoding), the update's none; and at float32 a product is the plain x @ w, bit for
    bit."""
    args = dataclasses.replace(tiny, plan_precision="bfloat16")
    agent = spowl.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    obs = jax.random.normal(jax.random.PRNGKey(1), (2, OBS_DIM))
    mean = jnp.zeros((2, args.horizon, ACTION_DIM))
    planning = jax.make_jaxpr(lambda a, k: act(a.model, a.policy, obs, mean, k, args))(agent, jax.random.PRNGKey(2))
    assert benchmark.matmul_flops(planning.jaxpr, jnp.bfloat16) >= 0.95 * benchmark.matmul_flops(planning.jaxpr)
    update = jax.make_jaxpr(lambda a, k: spowl.update(a, random_batch(k, args), k, args))(agent, jax.random.PRNGKey(2))
    assert benchmark.matmul_flops(update.jaxpr, jnp.bfloat16) == 0 < benchmark.matmul_flops(update.jaxpr)
    action, _, _ = jit_act(agent.model, agent.policy, obs, mean, jax.random.PRNGKey(3), args, False)
    assert action.dtype == jnp.float32 and np.isfinite(action).all()
    x, w = jax.random.normal(jax.random.PRNGKey(4), (8, 16)), jax.random.normal(jax.random.PRNGKey(5), (16, 4))
    assert np.array_equal(matmul(x, w, "float32"), x @ w)


@pytest.mark.parametrize("network", ["encoder", "dynamics", "policy"])
def test_bfloat16_networks_agree_with_float32_to_bfloat16s_rounding(tiny, network):
    """--plan-precision bfloat16: the networks the planner runs agree with float32 to bfloat16's rounding, and differ
    from it."""
    args = dataclasses.replace(tiny, plan_precision="bfloat16")
    agent = spowl.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    obs = jax.random.normal(jax.random.PRNGKey(1), (2, OBS_DIM))
    low = for_acting(agent.model, "bfloat16", True)
    z = encode(agent.model, obs)
    a = jnp.full((2, ACTION_DIM), 0.5)
    exact, rounded = {"encoder": lambda: (z, encode(low, obs)),
                      "dynamics": lambda: (next_latent(agent.model, z, a), next_latent(low, z, a)),
                      "policy": lambda: (agent.policy(z), for_acting(agent.policy, "bfloat16", True)(z))}[network]()
    assert rounded.dtype == jnp.float32 and not np.array_equal(exact, rounded)
    np.testing.assert_allclose(rounded, exact, rtol=0.05, atol=0.01 * np.abs(exact).max())


# ---------------------------------------------------------------------------------------------------------------------
# Safe policy: Augmented Lagrangian (Eq. 10)


def test_augmented_lagrangian_matches_hand_computed_values(tiny):
    cfg = dataclasses.replace(tiny, penalty_growth=0.5, lagrange_max=10.0, penalty_max=1.0)
    # Active branch: lambda + mu Delta = 0.5 + 0.2 * 2 = 0.9 > 0 -> lambda Delta + mu/2 Delta^2 = 1 + 0.4.
    np.testing.assert_allclose(augmented_lagrangian(2.0, Lagrangian(0.5, 0.2)), 1.4, rtol=1e-6)
    multiplier, penalty = update_lagrangian(Lagrangian(0.5, 0.2), 2.0, cfg)
    np.testing.assert_allclose([multiplier, penalty], [0.9, 0.3], rtol=1e-6)
    # Inactive branch: 0.5 + 0.2 * (-5) = -0.5 <= 0 -> -lambda^2 / (2 mu) = -0.625, and lambda clips to 0.
    np.testing.assert_allclose(augmented_lagrangian(-5.0, Lagrangian(0.5, 0.2)), -0.625, rtol=1e-6)
    multiplier, penalty = update_lagrangian(Lagrangian(0.5, 0.2), -5.0, cfg)
    np.testing.assert_allclose([multiplier, penalty], [0.0, 0.3], rtol=1e-6)
    # Bounds: lambda <= lagrange_max, mu <= penalty_max.
    multiplier, penalty = update_lagrangian(Lagrangian(9.0, 0.9), 100.0, cfg)
    np.testing.assert_allclose([multiplier, penalty], [10.0, 1.0], rtol=1e-6)


def test_policy_loss_adds_psi_whose_gradient_reaches_the_policy_through_its_actions(tiny):
    """Eq. 7-10's wiring in the policy loss: the loss is the reward part plus Psi(Delta), and with lambda = 1 (mu
    tiny) its gradient is the reward part's plus the gradient of Delta, which flows through the sampled actions into
    pi (the cost-value heads depend on the action)."""
    model, policy = perturbed_model(tiny), init_policy(jax.random.PRNGKey(1), tiny, ACTION_DIM)
    latents = jax.random.uniform(jax.random.PRNGKey(2), (tiny.horizon + 1, tiny.batch_size, tiny.latent_dim))

    def loss(policy, multiplier, safe=True):
        lagrangian = Lagrangian(multiplier, 1e-8)
        return policy_loss(policy, model, latents, lagrangian, 1.0, jax.random.PRNGKey(3), tiny, safe)

    (total, info), with_psi = jax.value_and_grad(loss, has_aux=True)(policy, 1.0)
    np.testing.assert_allclose(info["psi"], augmented_lagrangian(info["delta"], Lagrangian(1.0, 1e-8)), rtol=1e-6)
    np.testing.assert_allclose(total, info["reward_loss"] + info["psi"], rtol=1e-6)
    assert abs(float(info["psi"])) > 1e-3
    (unsafe_total, _), without = jax.value_and_grad(loss, has_aux=True)(policy, 1.0, False)
    np.testing.assert_allclose(unsafe_total, info["reward_loss"], rtol=1e-6)
    delta_grad = jax.grad(lambda p: loss(p, 1.0)[1]["delta"])(policy)
    difference = jax.tree.map(lambda a, b: a - b, with_psi, without)
    size = float(optax.tree.norm(delta_grad))
    assert size > 1e-4  # Delta depends on the policy
    for a, b in zip(jax.tree.leaves(difference), jax.tree.leaves(delta_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * size)


@pytest.fixture(scope="module")
def multiplier_agent(tiny, agent):
    """The tiny agent with a perturbed world model, lambda 0.5 and mu 0.2."""
    return agent._replace(model=perturbed_model(tiny), lagrangian=Lagrangian(jnp.float32(0.5), jnp.float32(0.2)))


@pytest.mark.xdist_group("update")  # one compile of jit_update per config for this group's tests under `pytest -n`
@pytest.mark.parametrize("planner", ["tdmpc2", "spowl"])
def test_update_steps_the_multipliers_and_only_for_safe_planners(tiny, multiplier_agent, batch, jit_update, planner):
    """Eq. 10 inside `update`: after the policy step, lambda <- clip(lambda + mu Delta, 0, lambda_max) with the Delta
    of that step, and mu <- min(mu (1 + nu), mu_max) (that lambda takes the old mu is pinned by the test above); the
    policy loss carries Psi of the old lambda and mu.  SPOWL does this; the unsafe TD-MPC2 baseline keeps
    lambda and mu and has no Psi.  (CCE takes SPOWL's path: `update` tells only TD-MPC2 apart.)  With --diagnostics,
    the gradient norms it logs."""
    agent = multiplier_agent
    new, info = jit_update(agent, batch, jax.random.PRNGKey(2), dataclasses.replace(tiny, planner=planner,
                                                                                     diagnostics=True))
    delta = float(info["delta"])
    assert abs(delta) > 0.05, delta  # the multiplier moves by 0.2 Delta: a dropped or flipped step shows
    if planner == "tdmpc2":
        assert tuple(map(float, new.lagrangian)) == (0.5, np.float32(0.2)) and info["psi"] == 0
        assert float(info["psi_grad_norm"]) == 0 and float(info["delta_grad_norm"]) > 0
        np.testing.assert_allclose(info["policy_loss"], info["reward_loss"], rtol=1e-6)
        return
    multiplier = np.clip(0.5 + 0.2 * delta, 0, tiny.lagrange_max)
    np.testing.assert_allclose(new.lagrangian.multiplier, multiplier, rtol=1e-6)
    assert float(new.lagrangian.penalty) == np.float32(np.float32(0.2) * np.float32(1 + tiny.penalty_growth)) != 0.2
    np.testing.assert_allclose(info["psi"], augmented_lagrangian(delta, Lagrangian(0.5, 0.2)), rtol=1e-5)
    np.testing.assert_allclose(info["policy_loss"], info["reward_loss"] + info["psi"], rtol=1e-5)
    # The logged gradient norms: Psi's gradient is (lambda + mu Delta) times Delta's (active Psi, chain rule).
    assert float(info["reward_grad_norm"]) > 1e-4 and float(info["delta_grad_norm"]) > 1e-4
    np.testing.assert_allclose(info["psi_grad_norm"], (0.5 + 0.2 * delta) * info["delta_grad_norm"], rtol=1e-3)
    assert float(info["psi_grad_norm"]) > 0  # and zero without Psi, under TD-MPC2


@pytest.mark.xdist_group("update")  # one compile of jit_update per config for this group's tests under `pytest -n`
def test_update_without_diagnostics_is_the_same_update_bit_for_bit(tiny, multiplier_agent, batch, jit_update):
    """Without --diagnostics, `update` leaves out the gradient norms and makes the same update, bit for bit."""
    agent = multiplier_agent
    new, info = jit_update(agent, batch, jax.random.PRNGKey(2), dataclasses.replace(tiny, planner="spowl",
                                                                                     diagnostics=True))
    plain, plain_info = jit_update(agent, batch, jax.random.PRNGKey(2), tiny)
    assert set(info) - set(plain_info) == {"reward_grad_norm", "psi_grad_norm", "delta_grad_norm"}
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cost_tau", [None, 0.5])
def test_target_ensembles_move_at_tau_and_the_cost_values_at_cost_tau(tiny, cost_tau):
    """Q-bar <- Q-bar + tau (Q - Q-bar); the cost-value target the same, at --cost-tau when it is set (not the
    paper's), else at tau."""
    assert tiny.tau != 0.5
    expected = tiny.tau if cost_tau is None else cost_tau
    old, new = targets(perturbed_model(tiny)), init_world_model(jax.random.PRNGKey(9), tiny, OBS_DIM, ACTION_DIM)
    q, cost_value = world_model.update_targets(old, new, dataclasses.replace(tiny, cost_tau=cost_tau))
    for rate, moved, before, after in [(tiny.tau, q, old[0], new.q), (expected, cost_value, old[1], new.cost_value)]:
        for m, b, a in zip(*(jax.tree.leaves(eqx.filter(t, eqx.is_array)) for t in (moved, before, after))):
            np.testing.assert_allclose(m, b + rate * (a - b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cost, expected", [(40.0, 0.65), (0.0, 0.25), (-1000.0, 0.0), (2000.0, None)])
def test_measured_cost_multiplier_steps_lambda_by_the_episode_cost_over_the_limit(tiny, cost, expected):
    """--episode-cost-limit (not the paper's): lambda <- clip(lambda + lr (C - limit), 0, lambda_max) from the measured
    cost per episode C, mu on its schedule, Delta unused."""
    cfg = dataclasses.replace(tiny, episode_cost_limit=25.0, multiplier_lr=0.01, penalty_growth=0.5)
    expected = tiny.lagrange_max if expected is None else expected  # None: clipped at lambda_max
    multiplier, penalty = update_lagrangian(Lagrangian(0.5, 0.2), 123.0, cfg, cost)
    np.testing.assert_allclose([multiplier, penalty], [expected, 0.3], rtol=1e-6)


def test_lagrange_max_0_holds_lambda_at_0_while_mu_grows(tiny):
    """`--lagrange-init 0 --lagrange-max 0` is a valid config, and lambda stays 0 whatever Delta; mu keeps its
    schedule.  (An initial lambda above its bound is refused: test_driver's bad-input cases.)"""
    args = spowl.check(dataclasses.replace(tiny, lagrange_init=0.0, lagrange_max=0.0, penalty_growth=0.5))
    lagrangian = policy.init_lagrangian(args)
    for delta in (5.0, -5.0, 1e6):
        penalty = float(lagrangian.penalty)
        lagrangian = update_lagrangian(lagrangian, delta, args)
        assert float(lagrangian.multiplier) == 0.0
        np.testing.assert_allclose(lagrangian.penalty, min(1.5 * penalty, tiny.penalty_max), rtol=1e-6)


def test_cost_per_episode_is_a_rounds_cost_per_agent_step_times_the_episodes_steps():
    """The measured cost per episode C of --episode-cost-limit: a round's cost per agent step times the episode's
    steps, over the steps the actor made."""
    k, n, e = 4, 2, 3
    cost = jnp.arange(k * n * e, dtype=jnp.float32).reshape(k, n, e)
    acted = spowl.Rollout((None, None, None, cost, None, None), jnp.array([True, True, True, False]), None, None)
    expected = cost[:3].mean((0, 2)) * 200  # the inactive last step left out
    np.testing.assert_allclose(spowl.cost_per_episode(acted.transitions[3], acted.active, 200), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Planner: SelectElites (Alg. 1), safe planning and the switch (Alg. 2)


def test_select_elites_follows_algorithm_1():
    is_prior = jnp.arange(8) < 2
    value = jnp.array([1.0, 1.0, 0.0, 5.0, 3.0, 4.0, 2.0, 6.0])
    cost = jnp.array([1.0, 1.0, 9.0, 0.5, 0.0, 2.0, 1.0, 0.9])
    # Empty improvement set -> the policy prior, flagged as the fallback.
    elites, score, empty = select_elites(value, cost, 10.0, 1.0, is_prior, 3)
    assert elites.tolist() == is_prior.tolist() and empty
    np.testing.assert_array_equal(score, value)
    # J >= 5 and J_c <= 1 holds for {3, 7}: as many as the prior, but an improvement, not the fallback.
    elites, _, empty = select_elites(value, cost, 5.0, 1.0, is_prior, 3)
    assert np.flatnonzero(elites).tolist() == [3, 7] and not empty
    # J >= 1 and J_c <= 1 holds for {0, 1, 3, 4, 6, 7}: more than k=3 -> the top 3 by J: {3, 4, 7}.
    elites, _, _ = select_elites(value, cost, 1.0, 1.0, is_prior, 3)
    assert np.flatnonzero(elites).tolist() == [3, 4, 7]
    # At most k -> all of them.
    elites, _, _ = select_elites(value, cost, 1.0, 1.0, is_prior, 6)
    assert np.flatnonzero(elites).tolist() == [0, 1, 3, 4, 6, 7]
    # Without the cap, all six even for k=3.
    elites, _, _ = select_elites(value, cost, 1.0, 1.0, is_prior, 3, restrict=False)
    assert np.flatnonzero(elites).tolist() == [0, 1, 3, 4, 6, 7]


# Eq. 11 by hand, for the model of `hand_ensembles` (conftest.py) from z_0 = 0 (so z_i[0] = i) and a policy pinned
# at 0.4 (also the action at z_H):
# J = sum_i g^i (a_i + 0.1 i) + g^H mean_j Q_j(z_H, 0.4),   Q_j = z[0] + j + a    -> at z_H: 3 + 2 + 0.4 = 5.4
# J_c = sum_i gc^i agg_j C_j(a_i) + gc^H mean_j Q^c_j(z_H, 0.4),   C_j = (j + 1)(1 - a) / 10: mean 0.3 (1 - a),
#   max 0.5 (1 - a);   Q^c_j = 0.5 z[0] + 0.2 j + 0.5 a   -> at z_H: 1.5 + 0.4 + 0.2 = 2.1
# with gamma 0.9 and gamma_c 0.6 (unequal, so a swap shows: the `hand` config), and every Q head averaged
# (q_subsample = 5).


def hand_estimates(actions, cost_agg="mean", terminal_action=HAND_POLICY_ACTION):
    """J, J_c of Eq. 11 for the model of `hand_ensembles` by hand, in float64: actions (H, N) -> (N,), (N,)."""
    a = np.asarray(actions, np.float64)
    i = np.arange(a.shape[0])[:, None]
    immediate_cost = {"mean": 0.3, "max": 0.5}[cost_agg] * (1 - a)
    horizon = a.shape[0]
    return ((0.9**i * (a + 0.1 * i)).sum(0) + 0.9**horizon * (3 + 2 + terminal_action),
            (0.6**i * immediate_cost).sum(0) + 0.6**horizon * (1.5 + 0.4 + 0.5 * terminal_action))


@pytest.mark.parametrize("fields, expected_cost", [({}, "mean"), ({"plan_cost_agg": "max"}, "max"),
                                                   ({"planner": "cce"}, "local"),
                                                   ({"planner": "cce", "cce_estimate": "global"}, "mean"),
                                                   ({"planner": "tdmpc2"}, "none")],
                         ids=["spowl", "spowl-max", "cce", "cce-global", "tdmpc2"])
def test_estimate_value_is_eq_11_by_hand(hand, hand_ensembles, fields, expected_cost):
    """J and J_c (Eq. 11) against the hand computation above: rewards that change along the horizon, cost heads that
    disagree (their mean, as the authors' code, and their max, as the paper), gamma for J and gamma_c for J_c, and the
    bootstrap from the value heads at z_H with the policy's action there; CCE's local estimate is the undiscounted sum
    of max-over-heads immediate costs with no bootstrap, its global one SPOWL's J_c, and TD-MPC2 has no J_c."""
    actions = jax.random.uniform(jax.random.PRNGKey(0), (hand.horizon, 6, 1), minval=-1, maxval=1)
    policy, model, z = pinned_policy(hand, HAND_POLICY_ACTION), hand_ensembles(hand), jnp.zeros(hand.latent_dim)
    value, mean_cost = hand_estimates(actions[..., 0])
    _, max_cost = hand_estimates(actions[..., 0], "max")
    local_cost = (0.5 * (1 - np.asarray(actions[..., 0], np.float64))).sum(0)
    cost_value = {"mean": mean_cost, "max": max_cost, "local": local_cost, "none": 0 * value}[expected_cost]
    cfg = dataclasses.replace(hand, **fields)
    ours = jax.jit(estimate_value, static_argnums=5)(model, policy, z, actions, jax.random.PRNGKey(1), cfg)
    np.testing.assert_allclose(ours[0], value, rtol=1e-4, atol=1e-4, err_msg=str(fields))
    np.testing.assert_allclose(ours[1], cost_value, rtol=1e-4, atol=1e-4, err_msg=str(fields))


def test_value_heads_are_drawn_without_replacement_for_every_sample():
    """`aggregate`: `num` distinct heads drawn afresh for every sample, then their min, max or mean; all heads when
    `num` is the ensemble size.  Head j's value is j + 1, so the min of 2 distinct heads is 1-4 with probabilities
    4, 3, 2, 1 in 10, and the mean of 2 is the mean of a pair."""
    values = jnp.broadcast_to(jnp.arange(1.0, 6.0)[:, None], (5, 20_000))
    key = jax.random.PRNGKey(0)
    low = np.asarray(aggregate(values, key, 2, "min"))
    np.testing.assert_allclose([np.mean(low == v) for v in range(1, 6)], [0.4, 0.3, 0.2, 0.1, 0.0], atol=0.015)
    pair_means = {(i + j) / 2 for i in range(1, 6) for j in range(i + 1, 6)}
    average = np.asarray(aggregate(values, key, 2, "avg"))
    assert set(np.unique(average)) == pair_means
    high = np.asarray(aggregate(values, key, 3, "max"))
    np.testing.assert_allclose([np.mean(high == v) for v in range(1, 6)], [0, 0, 0.1, 0.3, 0.6], atol=0.015)


@pytest.mark.parametrize("how, expected", [("min", 1.0), ("max", 5.0), ("avg", 3.0)])
def test_value_heads_aggregate_all_heads_when_num_is_the_ensemble_size(how, expected):
    """`aggregate` over all 5 heads (j + 1) is their min, max or mean, for every sample."""
    values = jnp.broadcast_to(jnp.arange(1.0, 6.0)[:, None], (5, 20_000))
    np.testing.assert_array_equal(aggregate(values, jax.random.PRNGKey(0), 5, how), expected)


def exact_bootstrap_interval(values):
    """The 2.5 and 97.5 percentiles of the means of all len(values)^len(values) resamples with replacement."""
    n = len(values)
    return np.percentile(np.stack(np.meshgrid(*[values] * n, indexing="ij"), -1).reshape(-1, n).mean(-1), [2.5, 97.5])


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_ensemble_means(tiny):
    """The switch's bounds: the 2.5 and 97.5 percentiles of the means of resamples with replacement of the ensemble's
    values, against the exact distribution of such means (all 5^5 equally likely resamples)."""
    values = np.array([0.3, 1.7, 2.2, 5.9, 8.1])
    exact = exact_bootstrap_interval(values)
    cfg = dataclasses.replace(tiny, ci_resamples=20_000)
    low, high = bootstrap_interval(jnp.asarray(values, jnp.float32), jax.random.PRNGKey(0), cfg)
    np.testing.assert_allclose([low, high], exact, atol=0.1)  # the 5 / 95 percentiles lie 0.4 inside


def test_mppi_refit_is_the_weighted_mean_and_clipped_std_of_the_elites(tiny):
    """MPPI's refit against a plain computation: weights exp(temperature (score - max)) over the elites only,
    normalised; the weighted mean and standard deviation of their actions, the std clipped to [min_std, max_std]."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    actions = jax.random.uniform(keys[0], (3, 10, 2), minval=-1, maxval=1)
    actions = actions * jnp.array([1.0, 0.02, 1.0])[:, None, None]  # spreads above, below and inside [0.05, 0.5]
    score = jax.random.normal(keys[1], (10,))
    elites = jnp.arange(10) % 3 != 1
    cfg = dataclasses.replace(tiny, temperature=0.7, min_std=0.05, max_std=0.5)
    mean, std, weights = refit(actions, score, elites, cfg)

    a, s, e = (np.asarray(x, np.float64) for x in (actions, score, elites))
    w = np.where(e, np.exp(0.7 * (s - s[e > 0].max())), 0.0)
    w /= w.sum()
    plain_mean = np.einsum("n,hna->ha", w, a)
    plain_std = np.sqrt(np.einsum("n,hna->ha", w, (a - plain_mean[:, None]) ** 2))
    assert (plain_std < 0.05).any() and (plain_std > 0.5).any() and ((plain_std > 0.05) & (plain_std < 0.5)).any()
    np.testing.assert_allclose(weights, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mean, plain_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, np.clip(plain_std, 0.05, 0.5), rtol=1e-5, atol=1e-6)


def test_planner_warm_starts_from_last_steps_mean_shifted_one_step(tiny):
    """The first iteration samples around last step's plan mean shifted by one step, a zero appended.  With a tiny
    sampling std and TD-MPC2's top-k keeping exactly the sampled sequences (the policy prior, pinned at -0.9, scores
    lowest), the plan mean and the executed first action stay at the warm start."""
    cfg = dataclasses.replace(tiny, planner="tdmpc2", act="plan", min_std=0.01, max_std=0.01, iterations=2,
                              num_elites=tiny.num_samples - tiny.num_pi_trajs)
    model = hand_built_model(cfg, reward=lambda a: a, cost=lambda a: 0 * a, q=lambda a, j: 0 * a,
                             cost_value=lambda a, j: 0 * a)
    previous = jnp.array([[0.3], [0.5], [0.7]])
    action, mean, _ = plan(model, pinned_policy(cfg, -0.9), jnp.zeros(cfg.latent_dim), previous, 0.0, 0.0,
                           jax.random.PRNGKey(0), cfg, eval_mode=True)
    np.testing.assert_allclose(mean[:, 0], [0.5, 0.7, 0.0], atol=0.02)
    np.testing.assert_allclose(action, [0.5], atol=0.05)


def test_cce_keeps_the_feasible_top_k_or_falls_back_to_the_k_lowest_cost_value():
    """CCE (Sec. 5.1): with at least k sequences of J_c strictly below d_plan, the top-k by J among them, scored by J;
    with fewer, the k lowest J_c, scored by -J_c."""
    value = jnp.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    cost_value = jnp.array([0.5, 0.1, 0.05, 0.0, 0.3, 0.02])
    elites, score = select_cce(value, cost_value, 0.1, 3)  # feasible: {2, 3, 5} (J_c = 0.1 is not below 0.1)
    assert np.flatnonzero(elites).tolist() == [2, 3, 5]
    np.testing.assert_array_equal(score, value)
    elites, score = select_cce(value, cost_value, 0.1, 2)  # the top 2 by J of the three
    assert np.flatnonzero(elites).tolist() == [2, 3]
    elites, score = select_cce(value, cost_value, 0.04, 3)  # feasible: {3, 5}, fewer than 3
    assert np.flatnonzero(elites).tolist() == [2, 3, 5]  # the three lowest J_c: 0.0, 0.02, 0.05
    np.testing.assert_array_equal(score, -cost_value)


def test_safe_planner_avoids_a_high_reward_high_cost_action_that_tdmpc2_takes(tiny, plan_actions):
    # Reward grows with the action; the same actions beyond 0.5 cost 1 per step. Values are flat.
    model = hand_built_model(tiny, reward=lambda a: 2 * a, cost=lambda a: (a > 0.5) * 1.0,
                             q=lambda a, j: 0 * a, cost_value=lambda a, j: 0 * a)
    args = dataclasses.replace(tiny, num_samples=128, num_pi_trajs=8, num_elites=16, iterations=4, act="plan")
    safe, _ = plan_actions(model, dataclasses.replace(args, planner="spowl"))
    unsafe, info = plan_actions(model, dataclasses.replace(args, planner="tdmpc2"))
    # TD-MPC2's top-k has neither thresholds nor a fallback, and acting on the plan alone there are no bounds.
    assert set(info) == {"used_plan", "elites"} and (info["elites"] == args.num_elites).all()
    assert (safe <= 0.5).all() and (safe > 0.05).mean() > 0.5, safe  # improves on the prior, stays cost-free
    assert (unsafe > 0.5).all(), unsafe
    cce, _ = plan_actions(model, dataclasses.replace(args, planner="cce", cce_threshold=0.1))
    assert (cce <= 0.5).all(), cce


def linear_in_action(z, a, j, slope):
    return slope * a[..., 0] + (j - 2.0)


@pytest.fixture(scope="session")  # not "module": under `pytest -n` a worker may run other files' tests in between
def switch_setup(tiny):
    """The config and the hand-built model (reward = a, no cost, flat values) of the switch's cases: one model for all,
    so that the cases share their compiled planning calls."""
    args = dataclasses.replace(tiny, num_samples=64, num_elites=8, iterations=3, q_subsample=5, act="switch")
    plain = hand_built_model(args, reward=lambda a: a, cost=lambda a: 0 * a, q=lambda a, j: 0 * a,
                             cost_value=lambda a, j: 0 * a)
    return args, plain


@pytest.mark.xdist_group("switch")  # the cases share two compiled planning calls, under `pytest -n`
@pytest.mark.parametrize("q_slope, c_slope, rule, plan", [
    (0.5, -0.5, "ci", True),  # better value, lower cost: the plan
    (-3.0, 0.0, "ci", False),  # Q below the policy's lower bound: the policy
    (0.0, 3.0, "ci", False),  # Q^c above the policy's upper bound: the policy
    # Slightly worse than the policy's averages but inside its interval: the authors' rule keeps the plan,
    # the paper's plain comparison (Alg. 2) does not.
    (-0.2, 0.2, "ci", True),
    (-0.2, 0.0, "mean", False),
    (0.0, 0.2, "mean", False),
    (0.2, -0.2, "mean", True),
])
def test_switch_rejects_plans_worse_than_the_policy_action(switch_setup, plan_actions, q_slope, c_slope, rule, plan):
    """Head j of Q / Q^c is slope * a + offset_j, offsets (-2..2): the policy action (~0) has ensemble mean 0 and a
    bootstrap interval of about +-1.2; the planner (reward = a) proposes a ~ 1."""
    args, plain = switch_setup
    model = eqx.tree_at(lambda m: (m.q, m.cost_value), plain,
                        (heads(linear_in_action, args, q_slope), heads(linear_in_action, args, c_slope)))
    action, info = plan_actions(model, dataclasses.replace(args, switch_rule=rule))
    used = info["used_plan"]
    assert (action[used] > 0.2).all() and (np.abs(action[~used]) < 0.1).all(), action  # plan or policy action
    if plan:
        assert used.all(), used
    else:
        assert not used.any(), used


def test_planner_reports_its_thresholds_last_iteration_and_the_switch_bounds(hand, hand_ensembles, plan_actions):
    """The diagnostics behind plan/* and switch/*, per env, on the hand-built ensembles of `hand_ensembles` (heads
    that disagree, nonzero costs, a policy prior pinned at 0.4): the thresholds of Eq. 12 are the prior's mean J and
    J_c by hand; the switch's bounds are the bootstrap interval's ends for the policy action's heads; and with
    --ci-thresholds the thresholds are those bounds."""
    args = dataclasses.replace(hand, num_samples=64, num_elites=8, iterations=3, act="switch", ci_resamples=4000)
    policy = pinned_policy(args, HAND_POLICY_ACTION)
    # J grows with the action and J_c falls: sequences beat the prior in both, more than k of them.
    _, info = plan_actions(hand_ensembles(args), args, policy=policy)
    assert set(info) == {"used_plan", "elites", "no_improvement", "d_reward", "d_cost", "q_low", "qc_high"}
    assert not info["no_improvement"].any() and (info["elites"] == args.num_elites).all()
    d_reward, d_cost = hand_estimates(np.full((args.horizon, 1), HAND_POLICY_ACTION))
    np.testing.assert_allclose(info["d_reward"], d_reward[0], rtol=1e-4)
    np.testing.assert_allclose(info["d_cost"], d_cost[0], rtol=1e-4)
    # At z = 0 and the policy's eval action 0.4: Q heads j + 0.4, Q^c heads 0.2 j + 0.2.
    q_low, _ = exact_bootstrap_interval(np.arange(5) + 0.4)
    _, qc_high = exact_bootstrap_interval(0.2 * np.arange(5) + 0.2)
    np.testing.assert_allclose(info["q_low"], q_low, atol=0.21)  # resampled means lie 0.2 apart
    np.testing.assert_allclose(info["qc_high"], qc_high, atol=0.05)  # and these 0.04
    assert (info["q_low"] < 2.4 - 0.5).all() and (info["qc_high"] > 0.6 + 0.1).all()
    # A prior of 32 sequences that differ (policy std 0.3): the thresholds are their mean J and J_c, which is J and J_c
    # of the mean action E[tanh(atanh(0.4) + 0.3 eps)] (J and J_c are linear in the actions), not their best.
    log_std = np.arctanh((np.log(0.3) - args.log_std_min) / (0.5 * (args.log_std_max - args.log_std_min)) - 1)
    spread = eqx.tree_at(lambda p: p.biases[-1], policy, jnp.array([np.arctanh(HAND_POLICY_ACTION), log_std]))
    _, info = plan_actions(hand_ensembles(args), dataclasses.replace(args, num_pi_trajs=32), policy=spread)
    eps, weights = np.polynomial.hermite_e.hermegauss(40)
    mean_action = (weights * np.tanh(np.arctanh(HAND_POLICY_ACTION) + 0.3 * eps)).sum() / weights.sum()
    d_reward, d_cost = hand_estimates(np.full((args.horizon, 1), mean_action), terminal_action=mean_action)
    np.testing.assert_allclose(info["d_reward"], d_reward[0], atol=0.3)  # 4 sd of the mean of 32; the best: +0.9
    np.testing.assert_allclose(info["d_cost"], d_cost[0], atol=0.06)  # 4 sd; the lowest: -0.19
    _, info = plan_actions(hand_ensembles(args), dataclasses.replace(args, ci_thresholds=True), policy=policy)
    np.testing.assert_array_equal(info["d_reward"], info["q_low"])
    np.testing.assert_array_equal(info["d_cost"], info["qc_high"])

    # Every reward 100 lower: no sequence reaches the policy action's value bound (--ci-thresholds), so the elites are
    # the policy prior (the fallback).
    hopeless = eqx.tree_at(lambda m: m.reward.p, hand_ensembles(args), jnp.float32(-100.0))
    _, info = plan_actions(hopeless, dataclasses.replace(args, ci_thresholds=True), policy=policy)
    assert info["no_improvement"].all() and (info["elites"] == args.num_pi_trajs).all()


def test_an_unknown_elite_rule_raises_and_each_rule_declares_whether_it_uses_cost(tiny):
    """`planner.ELITE_RULES` is the one list of elite rules: a name not in it raises, in `spowl.check` (before a run
    starts) and in the planner itself, instead of falling back to another rule; `uses_cost` comes from the rule."""
    assert {name: rule.uses_cost for name, rule in planner.ELITE_RULES.items()} == {"spowl": True, "tdmpc2": False,
                                                                                   "cce": True}
    unknown = dataclasses.replace(tiny, planner="ppo")
    with pytest.raises(ValueError, match="--planner ppo: no such elite rule"):
        spowl.check(unknown)
    model = init_world_model(jax.random.PRNGKey(0), tiny, OBS_DIM, ACTION_DIM)
    policy = init_policy(jax.random.PRNGKey(1), tiny, ACTION_DIM)
    with pytest.raises(ValueError, match="no such elite rule"):
        jax.eval_shape(lambda: act(model, policy, jnp.zeros((2, OBS_DIM)), jnp.zeros((2, tiny.horizon, ACTION_DIM)),
                                   jax.random.PRNGKey(2), unknown))


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffer


def fill(buffer, steps, episode_length):
    """Entries numbered by time; every `episode_length`-th is truncated."""
    e = buffer.obs.shape[0]
    for t in range(steps):
        value = jnp.full((e,), float(t))
        buffer = replay.add(buffer, jnp.broadcast_to(value[:, None], buffer.obs.shape[::2]), jnp.zeros((e, 1)),
                            value, value, jnp.zeros(e, bool), jnp.full(e, t % episode_length == episode_length - 1))
    return buffer


def test_buffer_windows_are_consecutive_and_mask_episode_ends():
    buffer = fill(replay.init(2, 50, 1, 1), 37, episode_length=7)
    batch = replay.sample(buffer, jax.random.PRNGKey(0), 512, 3)
    t = np.asarray(batch.obs[..., 0])  # (H+1, B) entry numbers
    np.testing.assert_array_equal(np.diff(t, axis=0), 1)
    assert t.min() >= 0 and t.max() <= 36
    np.testing.assert_array_equal(batch.reward, t[1:])  # reward t leads to obs t+1
    np.testing.assert_array_equal(batch.valid, (t[:-1] % 7) != 6)  # step t crosses when entry t ended
    assert not batch.valid.all()


def test_episode_rests_are_the_discounted_costs_to_each_episodes_end():
    """The Monte-Carlo check of the cost-value heads: from a start, the discounted costs of the steps left in its
    episode, how many, and the episode's last observation and whether it was terminal."""
    buffer = replay.init(1, 12, 1, 1)
    ends = {4: "truncated", 9: "terminated"}
    for i in range(12):  # entry i: obs i, the action and cost i that led to it
        flags = [[ends.get(i) == "terminated"], [ends.get(i) == "truncated"]]
        buffer = replay.add(buffer, jnp.full((1, 1), float(i)), jnp.full((1, 1), i / 100), jnp.zeros(1),
                            jnp.full(1, float(i)), *jnp.array(flags))
    gamma = 0.9
    rest = replay.episode_rests(buffer, jax.random.PRNGKey(0), 300, 5, gamma)
    starts = rest.obs[:, 0].astype(int)
    assert set(starts.tolist()) == set(range(7))  # at least `length` entries behind the write pointer
    for i, start in enumerate(starts.tolist()):
        last = 4 if start <= 4 else 9
        costs = np.arange(start + 1, last + 1)
        np.testing.assert_allclose(rest.cost_return[i], (gamma ** np.arange(len(costs)) * costs).sum(), rtol=1e-6)
        assert rest.steps[i] == last - start and rest.last_obs[i, 0] == last
        assert bool(rest.terminated[i]) == (last == 9)
        np.testing.assert_allclose(rest.action[i, 0], (start + 1) / 100, rtol=1e-6)


def test_buffer_is_fifo_and_windows_never_straddle_the_write_pointer():
    buffer = fill(replay.init(1, 20, 1, 1), 53, episode_length=1000)  # holds entries 33..52
    assert int(buffer.size) == 20
    t = np.asarray(replay.sample(buffer, jax.random.PRNGKey(1), 2048, 3).obs[..., 0])
    assert t.min() == 33 and t.max() == 52
    np.testing.assert_array_equal(np.diff(t, axis=0), 1)


# ---------------------------------------------------------------------------------------------------------------------
# Learning on the pure-JAX test-bed: SPOWL's multiplier schedule raises lambda, and SPOWL earns a return at a low cost

# A small model, 12,000 raw steps (about 2,750 gradient updates per seed), 3 seeds vmapped in one process, 32 eval
# episodes per seed.  The defaults are tuned for 5M-step runs; these changes make values, and so safety, learnable in
# this one:
#   - the multiplier schedule of Eq. 10 from lambda = 0 with mu = 1e-4 growing 0.05 % per update (to about 4e-4 at the
#     end): the authors' schedule (lambda 1e-6, mu 5e-9, nu 5e-6) barely moves in a few thousand updates
#     (docs/differences.md); with this one lambda passes 0.1 between steps 6,000 and 8,300 and ends at 0.44-0.73;
#   - cost discount 0.975, the reward discount: with 0.997 (a ~330-step horizon) the cost value is still far from
#     its fixed point, so Delta, and with it the safety gradient, stays tiny;
#   - learning rate 1e-3 and target rate tau 0.05 (defaults 3e-4, 0.01): with the defaults the Q targets are still
#     below 0.1 at the end of the run, against true values of 2-4, so the policy's reward term is negligible.
LEARN_SEEDS = 3
LEARN_STEPS = "12000"
LEARN_FLAGS = ["--env-id", jax_env.ENV_ID, "--num-seeds", str(LEARN_SEEDS), "--total-timesteps", LEARN_STEPS,
               "--learning-starts", "1000", "--num-envs", "16", "--utd-ratio", "0.25", "--buffer-size", LEARN_STEPS,
               "--cost-gamma", "0.975", "--lr", "1e-3", "--tau", "0.05", "--log-every", LEARN_STEPS,
               "--eval-every", LEARN_STEPS, "--checkpoint-every", LEARN_STEPS, "--eval-episodes", "32",
               "--latent-dim", "32", "--mlp-dim", "64", "--enc-dim", "64", "--num-samples", "32", "--num-pi-trajs", "4",
               "--num-elites", "8", "--iterations", "2", "--batch-size", "32", "--ci-resamples", "200",
               "--no-progress-bar"]
# SPOWL's own multiplier schedule, and a log row every 2,000 steps to follow lambda and Delta (the rows change only
# logging, never training: the draws below were made with these flags).
SCHEDULE_FLAGS = ["--lagrange-init", "0", "--penalty-init", "1e-4", "--penalty-growth", "5e-4", "--log-every", "2000"]
# Bars on the mean over the 3 seeds of the last evaluation, and on every seed's lambda at the end; chosen from the
# separation between the recorded SPOWL draws and the regressions in LEARN_DRAWS (`test_learning_draws_...` below).
RETURN_BAR, COST_BAR, LAMBDA_BAR = 6.0, 13.0, 0.1
# Recorded runs of the test's flags: SPOWL (seeds 1-33, 3 per run), the regressions and the planner-only contrast
# (seeds 1-3 or 4-6), one row per seed: run, first_seed (the run's --seed), seed, eval_return, eval_cost,
# final_lambda, lambda_rose (1 where the test's check on lambda's rise holds), wall_s (of the run), commit.
LEARN_DRAWS = os.path.join(REPO_DIR, "learning_draws.csv")


def random_policy_eval(num_episodes=256, key=0):
    """Mean return and cost of uniform random actions over full JaxPointGoal1 episodes."""

    def episode(key):
        key_reset, key_act = jax.random.split(key)
        state, _ = jax_env.reset(key_reset)

        def env_step(state, key):
            state, _, reward, cost, _, _ = jax_env.step(state, jax.random.uniform(key, (jax_env.ACT_DIM,), minval=-1))
            return state, (reward, cost)

        _, (rewards, costs) = jax.lax.scan(env_step, state, jax.random.split(key_act, jax_env.EPISODE_LENGTH))
        return rewards.sum(), costs.sum()

    returns, costs = jax.jit(jax.vmap(episode))(jax.random.split(jax.random.PRNGKey(key), num_episodes))
    return float(returns.mean()), float(costs.mean())


def final_eval(run_dir):
    """Eval return and cost at the last step, averaged over the seeds of a multi-seed run."""
    rows = [r for r in read_rows(run_dir) if "eval/return_mean" in r]
    last = max(r["global_step"] for r in rows)
    rows = [r for r in rows if r["global_step"] == last]
    assert len(rows) == LEARN_SEEDS
    return np.mean([r["eval/return_mean"] for r in rows]), np.mean([r["eval/cost_mean"] for r in rows])


def lagrange_trajectories(run_dir):
    """Per seed, the (step, lambda, Delta) of the log rows after learning starts, in step order (Delta is the mean over
    the updates since the row before, lambda its value at the row's step)."""
    rows = [r for r in read_rows(run_dir) if "lagrange/delta" in r]
    return {seed: sorted((r["global_step"], r["lagrange/lambda"], r["lagrange/delta"]) for r in rows
                         if r["seed"] == seed) for seed in sorted({r["seed"] for r in rows})}


def read_learning_draws(path=LEARN_DRAWS):
    """LEARN_DRAWS as {run: list of row dicts, numbers as floats}."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    draws = {}
    for r in rows:
        draws.setdefault(r["run"], []).append({k: v if k in ("run", "commit") else float(v) for k, v in r.items()})
    return draws


def fails_the_bars(returns, costs, lambdas):
    """Whether a 3-seed run with these per-seed eval returns, costs and final lambdas fails the learning test."""
    return np.mean(returns) < RETURN_BAR or np.mean(costs) > COST_BAR or np.min(lambdas) < LAMBDA_BAR


def false_failure_rate(draws, seeds=LEARN_SEEDS, resamples=200_000, key=0):
    """The chance that the 3-seed test fails SPOWL, from recorded seed-runs `draws` (dicts with eval_return,
    eval_cost and final_lambda), two ways that do not take the spread seen as exact:
    - bootstrap: draw `seeds` seed-runs with replacement, many times; the fraction whose mean return is under
      RETURN_BAR, mean cost over COST_BAR, or some lambda under LAMBDA_BAR;
    - t-predictive: the mean of `seeds` new seed-runs, for return and cost alike, is xbar + s sqrt(1/seeds + 1/n) T
      with T Student-t with n - 1 degrees of freedom (normal seed-runs of unknown mean and spread, flat prior); the
      chance of the return bar plus that of the cost bar (an upper bound on either; lambda is left to the bootstrap).
    Returns (bootstrap rate, t-predictive rate)."""
    returns, costs, lambdas = (np.array([d[k] for d in draws]) for k in ("eval_return", "eval_cost", "final_lambda"))
    n = len(draws)
    pick = np.random.default_rng(key).integers(n, size=(resamples, seeds))
    fails = ((returns[pick].mean(1) < RETURN_BAR) | (costs[pick].mean(1) > COST_BAR)
             | (lambdas[pick].min(1) < LAMBDA_BAR))
    scale = np.sqrt(1 / seeds + 1 / n)
    t_return = stats.t.cdf((RETURN_BAR - returns.mean()) / (returns.std(ddof=1) * scale), n - 1)
    t_cost = stats.t.sf((COST_BAR - costs.mean()) / (costs.std(ddof=1) * scale), n - 1)
    return float(fails.mean()), float(t_return + t_cost)


def test_learning_draws_give_the_learning_test_a_low_false_failure_rate_and_catch_the_regressions():
    """The recorded draws of the learning test (LEARN_DRAWS) against its bars: SPOWL's 3-seed test fails with a chance
    of at most 2 % (`false_failure_rate`, both ways); the recorded runs of the regressions it must catch fail it, and
    that of the cost-blind planner, which it does not catch, passes (as its docstring says)."""
    draws = read_learning_draws()
    spowl_draws = draws["spowl"]
    assert len(spowl_draws) >= 20
    bootstrap, t_predictive = false_failure_rate(spowl_draws)
    assert bootstrap <= 0.02 and t_predictive <= 0.02, (bootstrap, t_predictive)
    # each regression's recorded run (seeds 1-3) fails: the unsafe baseline and lambda held at 0 on the cost bar (and
    # on lambda, which neither moves), random actions on the return bar
    for run in ("tdmpc2", "lambda0"):
        rows = draws[run]
        assert np.mean([r["eval_cost"] for r in rows]) > COST_BAR and max(r["final_lambda"] for r in rows) < LAMBDA_BAR
        assert not any(r["lambda_rose"] for r in rows)
    assert all(r["lambda_rose"] and r["final_lambda"] >= LAMBDA_BAR for r in spowl_draws)
    (random,) = draws["random"]
    assert random["eval_return"] < RETURN_BAR
    # the cost-blind planner is not caught: the policy's Lagrangian and the switch keep it as safe as SPOWL (the
    # docstring of the learning test says what covers the planner's cost terms instead)
    cce = draws["cce-blind"]
    assert not fails_the_bars(*([r[k] for r in cce] for k in ("eval_return", "eval_cost", "final_lambda")))


@pytest.mark.slow
def test_learn_spowl_raises_lambda_while_delta_is_positive_and_earns_a_return_at_a_low_cost(tmp_path):
    """SPOWL from scratch with its own multiplier schedule, 3 seeds vmapped: Eq. 10 from lambda = 0 (SCHEDULE_FLAGS)
    must raise lambda over every logged stretch of updates whose mean Delta is clearly positive (over 0.05) and end at
    LAMBDA_BAR (0.1) or more in every seed; the mean over seeds of the last eval return must be at least RETURN_BAR (6)
    and of the eval cost at most COST_BAR (13).

    Recorded draws (LEARN_DRAWS, learning_draws.csv: one row per seed, commit 1b0d3ca, this project's 2-core CPU;
    this test's run of seeds 1-3 at 5ec142a, after issue 37's refactor, gave the same values and lambdas):
    - SPOWL, exactly these flags, seeds 1-33 in 11 runs of 3: return 12.3 +- 2.7 per seed (3-seed means 9.2-15.2);
      cost skewed, median 2.1, 30 of 33 seeds at 0-7.1 and 3 at 13.0, 15.4 and 21.5 (3-seed means 0.6-8.6); lambda
      passes 0.1 between steps 6,000 and 8,300 and ends at 0.44-0.73, with Delta still 0.7-1.2 at the end.  One
      run took 80-515 s on the shared CPU, depending on its load.
    - What the test must catch, one run each of seeds 1-3 with these flags plus the change, mean over seeds:
      the unsafe TD-MPC2 baseline (`--planner tdmpc2`): return 23.5, cost 16.0 (seeds 14.9-17.4), lambda 0;
      lambda held at 0 (`--lagrange-max 1e-30`, recorded when 0 was refused; mu's schedule, the planner and the switch
      unchanged): return 23.1, cost 16.8 (15.7-18.6), lambda 1e-30: both fail the cost bar and the lambda bar;
      random actions (`random_policy_eval`): return -0.06, cost 8.9: fails the return bar.
    - Not caught here: a cost-blind planner (`--planner cce --cce-threshold 1e9`, every sequence feasible): return
      12.9, cost 2.1, lambda 0.44-0.62, as the policy's Lagrangian and the switch carry the safety.  Planning alone
      (`--act plan`, lambda held at 0), SPOWL's elite rule against the cost-blind one costs 12.5 against 18.7 (seeds
      1-3) and 15.4 against 22.3 (seeds 4-6): the planner's cost terms lower the cost, but two draws per arm set no
      bar.  A unit test catches it instead: `test_safe_planner_avoids_a_high_reward_high_cost_action_that_tdmpc2_takes`
      fails with SPOWL's elite rule made cost-blind, either way (d_c ignored, or J_c zero).  Psi and the multiplier
      step are pinned by `test_policy_loss_adds_psi_whose_gradient_reaches_the_policy_through_its_actions` and
      `test_update_steps_the_multipliers_and_only_for_safe_planners`.
    The bars: lambda 0.1 (SPOWL's lowest 0.44, the regressions' 0); return 6, well clear of random actions, and
    6.3 under SPOWL's mean return, four sd (1.6) of a 3-seed mean; cost 13, chosen on the first 24 SPOWL
    seed-runs as the lowest whole number whose false-failure rate (below) was at most 2 % (12 gave 2.1 %), and
    still 3.0 and 3.8 under the two regressions' means, whose seeds spread 1.2-1.6.  The false-failure rate,
    `false_failure_rate` over all 33 SPOWL seed-runs in the CSV (recomputed by
    `test_learning_draws_give_the_learning_test_a_low_false_failure_rate_and_catch_the_regressions`): 0.6 % by a
    bootstrap of 3 seed-runs, 0.1 % t-predictive, all of it the cost's tail (two of the three costly seeds, or one
    twice, in one draw); the bootstrap sees no tail beyond the recorded seeds and the cost is far from normal, so
    both are estimates (on the first 24 seed-runs: 1.1 % and 0.7 %).  A run is deterministic on one CPU model: a
    change that moves the update's floats by ~1e-7, or another CPU model, is another draw from these distributions.
    """
    # Compiling takes a large share of this short run; XLA's CPU backend at optimisation level 1 compiles in about
    # half the time of the default level and, measured at this size, trains just as fast.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=1"}
    process = spowl_start(*LEARN_FLAGS, *SCHEDULE_FLAGS, "--log-dir", str(tmp_path / "spowl"), env=env)
    random_return, random_cost = random_policy_eval()
    _, stderr = process.communicate(timeout=1800)
    assert process.returncode == 0, stderr[-3000:]
    safe_return, safe_cost = final_eval(tmp_path / "spowl")
    trajectories = lagrange_trajectories(tmp_path / "spowl")
    final_lambdas = [rows[-1][1] for rows in trajectories.values()]
    summary = (f"SPOWL return {safe_return:.1f} (bar {RETURN_BAR}) cost {safe_cost:.1f} (bar {COST_BAR}) final lambda "
               f"{', '.join(f'{x:.3f}' for x in final_lambdas)} (bar {LAMBDA_BAR}); random actions return "
               f"{random_return:.2f} cost {random_cost:.1f}")
    print(summary)  # shown with `pytest -rP`
    assert len(trajectories) == LEARN_SEEDS and all(len(rows) >= 5 for rows in trajectories.values()), summary
    for rows in trajectories.values():
        # lambda <- clip(lambda + mu Delta, 0, .) with mu > 0: it rises over every stretch of updates whose mean Delta
        # is clearly positive, and ends well above its start at 0
        for (_, before, _), (step, after, delta) in zip(rows, rows[1:]):
            assert delta <= 0.05 or after > before, (step, before, after, delta, summary)
    assert min(final_lambdas) >= LAMBDA_BAR, summary
    assert random_return < 2.0 < RETURN_BAR / 2, summary  # the return bar is well clear of what random actions get
    assert safe_return >= RETURN_BAR, summary
    assert safe_cost <= COST_BAR, summary
