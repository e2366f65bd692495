"""The authors' SPOWL on one tiny case: the golden file `authors.npz` that `test_fidelity.py` checks ours against.

Recorded once from a fresh copy of github.com/AIRI-Institute/SPOWL, run as it is (no patch to their files), on the
project's stack with omegaconf added (hydra-core too, which their train.py needs and this script does not):

    git clone https://github.com/AIRI-Institute/SPOWL /tmp/authors && git -C /tmp/authors checkout COMMIT
    python3.12 -m venv /tmp/authors-venv && /tmp/authors-venv/bin/pip install --no-deps -r requirements.txt
    /tmp/authors-venv/bin/pip install hydra-core omegaconf
    PYTHONPATH=/tmp/authors /tmp/authors-venv/bin/python golden/record_authors.py /tmp/authors   # 2 minutes on 2 cores

(COMMIT below; `... record_authors.py /tmp/authors paper OUT.npz` records the same at the paper's layer widths into
OUT.npz, docs/fidelity.md.)  It builds their world model at a tiny size (SIZES), moves every parameter off its
initial value (zero last layers would make every head predict 0), and records, on one batch and one latent state:
- the parameters, in their module layout (`test_fidelity.convert` maps them onto ours);
- the encoder, dynamics, reward, cost, Q and cost-value heads' raw outputs, and Eq. 6's TD targets (`_td_target`);
- one whole update (`make_step`): every world-model loss term, the policy loss, Psi, the scale S, lambda and mu, and
  every parameter after it;
- the planner (`plan`, `_constrained_estimate_value`, `get_action_stats`) on the same candidate sequences.

Their randomness is taken out of the comparison, each part its own way:
- dropout: off (`dropout`, `cm_dropout` 0);
- head subsets: every head is drawn (`num_q` 2, so "2 of 2"; `c_random_agg` = `num_c`), so min / avg do not depend
  on the draw;
- Gaussian draws (`jax.random.normal`): replaced, on both sides, by `fixed_normal`: the MPPI noise by the recorded
  table NOISE, every other draw (the policy's) by one fixed vector over the action dimensions;
- the bootstrap draws of the switch's bounds: the same keys on both sides (`jax.random.choice` draws the same
  resamples from the same key); the keys are those `get_action_stats` derives, recorded here;
- the planner's draw of the executed elite: a high temperature in the `plan_*` cases puts all the weight on one
  elite, so the draw is moot.
"""

import pathlib
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN = pathlib.Path(__file__).with_name("authors.npz")
ACTION_DIM, HORIZON, BATCH = 2, 3, 4
SIZES = {  # the observation size and layer widths: tiny for the golden file, or the paper's (a Point task's 60 obs)
    "tiny": dict(obs_dim=6, enc_dim=16, latent_dim=16, mlp_dim=16, num_bins=21),
    "paper": dict(obs_dim=60, enc_dim=256, latent_dim=512, mlp_dim=512, num_bins=101)}
WORLD_MODEL = dict(num_enc_layers=2, simnorm_dim=8, num_c=3, cm_dropout=0.0, num_q=2, dropout=0.0, log_std_min=-10.0,
                   log_std_max=2.0, lagrange_multiplier_init=1e-6, penalty_multiplier_init=5e-9, vmin=-10.0, vmax=10.0,
                   c_random_agg=3, use_cost=True, use_decoder=False)
OPT = dict(lr=3e-4, enc_lr_scale=0.3, grad_clip_norm=20.0)
UPD = dict(cost_discount=0.997, cvalue_target="avg", entropy_coef=1e-4, minimal_cost=0, cost_imb_weight=10, rho=0.5,
           tau=0.01, use_lagrange=True, lag_cost_type="avg", cost_limit=0.1, lagrange_max=10, penalty_rate=5e-6,
           loss_coefs=dict(consistency_loss=20, reward_loss=0.1, cost_loss=0.1, value_loss=0.1, cvalue_loss=0.1,
                           decoder_loss=0.0))
GAMMA, SCALE_TAU = 0.975, 0.01
# lambda, mu and S before the update: Psi on its active branch (lambda + mu Delta > 0), lambda unclipped after it
MULTIPLIER, PENALTY, SCALE = 0.5, 0.1, 1.7
PLAN = dict(horizon=HORIZON, num_pi_trajs=4, num_samples=16, min_std=0.05, max_std=2.0, plan_method="adaptive",
            num_elites=4, temperature=0.5, momentum=0.0, iterations=1, threshold=0.1, use_local_cost=True,
            bootstrap_samples=100, bootstrap_ci=95, use_ci_thresholds=False, restrict_elites=True,
            restrict_action=False, use_cm=False, use_cost=True)
NOISE_SHAPE = (HORIZON, PLAN["num_samples"] - PLAN["num_pi_trajs"], ACTION_DIM)
POLICY_NOISE = np.linspace(-1.2, 0.8, ACTION_DIM, dtype=np.float32)  # every policy draw, on both sides


def fixed_normal(noise):
    """A stand-in for `jax.random.normal`: the table `noise` for the MPPI draw (its shape), else POLICY_NOISE."""

    def normal(key, shape=(), dtype=jnp.float32):
        if tuple(shape) == noise.shape:
            return jnp.asarray(noise, dtype)
        return jnp.broadcast_to(jnp.asarray(POLICY_NOISE, dtype), shape)

    return normal


def case(obs_dim, seed=0):
    """The inputs: a batch (H+1 observations, H transitions, one episode end inside), a latent state, a warm start
    and the MPPI noise table."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    done = np.zeros((HORIZON + 1, BATCH, 1), bool)
    done[1, 2] = True  # window 2 ends an episode at its second observation
    term = np.zeros((HORIZON, BATCH, 1), np.float32)
    term[2, 0] = 1.0  # window 0's last transition is terminal
    cost = (rng.random((HORIZON, BATCH, 1)) < 0.4).astype(np.float32) * f32(rng.uniform(0.5, 2, (HORIZON, BATCH, 1)))
    return dict(obs=f32(rng.normal(size=(HORIZON + 1, BATCH, obs_dim))),
                action=f32(rng.uniform(-1, 1, (HORIZON, BATCH, ACTION_DIM))),
                reward=f32(rng.normal(0, 2, (HORIZON, BATCH, 1))), cost=cost, term=term, done=done,
                plan_obs=f32(rng.normal(size=obs_dim)), prev_mean=f32(rng.uniform(-0.5, 0.5, (HORIZON, ACTION_DIM))),
                noise=f32(rng.normal(size=NOISE_SHAPE)))


def perturb(model, key):
    """Every parameter moved off its initial value: Linear weights ~ N(0, 1/fan_in), all else + N(0, 0.1^2)."""
    import equinox as eqx

    leaves, treedef = jax.tree.flatten(model)
    keys = iter(jax.random.split(key, len(leaves)))
    model = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(next(keys), x.shape)
                                         if eqx.is_inexact_array(x) and x.ndim > 0 else x for x in leaves])
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)  # noqa: E731
    weights = lambda m: [x.weight for x in jax.tree.leaves(m, is_leaf=is_linear) if is_linear(x)]  # noqa: E731
    old = weights(model)
    new = [jax.random.normal(k, w.shape) / np.sqrt(w.shape[-1]) for k, w in zip(jax.random.split(key, len(old)), old)]
    return eqx.tree_at(weights, model, new)


def flat(tree, prefix):
    """The arrays of a pytree by their path: {'prefix/_Qs.layers[0].linear.weight': array, ...}."""
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)}


def record(authors, size):
    import equinox as eqx
    from omegaconf import OmegaConf
    from spowl.spowl import policies, update
    from spowl.spowl.scale import RunningScale
    from spowl.spowl.world_model import make_world_model

    sizes = SIZES[size]
    obs_dim = sizes["obs_dim"]
    inputs = case(obs_dim)
    cfg = OmegaConf.create(UPD)
    model, (filter_spec, optim, opt_state), (pi_spec, pi_optim, pi_opt_state) = make_world_model(
        0, obs_dim, ACTION_DIM, SimpleNamespace(**WORLD_MODEL, **{k: v for k, v in sizes.items() if k != "obs_dim"}),
        SimpleNamespace(**OPT))
    model = perturb(model, jax.random.key(1))
    model = eqx.tree_at(lambda m: (m.lagrange_multiplier, m.penalty_multiplier), model,
                        (jnp.float32(MULTIPLIER), jnp.float32(PENALTY)))
    jax.random.normal = fixed_normal(inputs["noise"])  # from here on, both sides' Gaussian draws (docstring)
    scale = eqx.tree_at(lambda s: s._value, RunningScale(SCALE_TAU), jnp.full(1, SCALE, jnp.float32))
    out = {"commit": subprocess.check_output(["git", "-C", authors, "rev-parse", "HEAD"], text=True).strip()}
    out |= {"size/" + k: v for k, v in sizes.items()} | inputs
    out |= flat(model, "params/")

    # Heads on the batch's first step, and the TD targets of Eq. 6 on every step.
    key = jax.random.key(2)
    obs, action = jnp.asarray(inputs["obs"]), jnp.asarray(inputs["action"])
    z = jax.vmap(model.encode)(obs[0], jax.random.split(key, BATCH))
    out["head/encoder"] = z
    out["head/dynamics"] = jax.vmap(model.next)(z, action[0])
    out["head/reward"] = jax.vmap(model.reward)(z, action[0])
    out["head/cost"] = jax.vmap(model.cost)(jax.random.split(key, BATCH), z, action[0])
    out["head/q"] = jax.vmap(model.Q)(jax.random.split(key, BATCH), z, action[0])
    out["head/cost_value"] = jax.vmap(model.C)(jax.random.split(key, BATCH), z, action[0])
    out["head/target_q"] = jax.vmap(lambda k, z, a: model.Q(k, z, a, target=True))(jax.random.split(key, BATCH), z,
                                                                                    action[0])
    flat_next = jax.vmap(model.encode)(obs[1:].reshape(-1, obs_dim), jax.random.split(key, HORIZON * BATCH))
    td = jax.vmap(update._td_target, in_axes=(None, 0, 0, 0, 0, 0, None, None, None))(
        model, jax.random.split(key, HORIZON * BATCH), flat_next, inputs["reward"].reshape(-1, 1),
        inputs["cost"].reshape(-1, 1), inputs["term"].reshape(-1, 1), GAMMA, cfg.cost_discount, cfg.cvalue_target)
    out["td/q"], out["td/cost_value"] = (x.reshape(HORIZON, BATCH) for x in td)

    # One whole update on the batch, and on the batch without its episode end: there, every parameter after one
    # update and after a second one on the same batch (Adam's first step is nearly sign(gradient); its second is not).
    data = tuple(jnp.asarray(inputs[k]) for k in ("obs", "action", "reward", "cost", "term", "done"))
    step = lambda model, data, opt_state, scale, pi_opt_state: update.make_step(  # noqa: E731
        cfg, key, model, data, GAMMA, filter_spec, pi_spec, optim, opt_state, scale, pi_optim, pi_opt_state)
    mets = step(model, data, opt_state, scale, pi_opt_state)[0]
    out |= {"update/" + k: np.asarray(v) for k, v in mets.items()}
    no_end = (*data[:-1], jnp.zeros_like(data[-1]))
    mets, after, *states = step(model, no_end, opt_state, scale, pi_opt_state)
    out |= {"update_no_end/" + k: np.asarray(v) for k, v in mets.items()} | flat(after, "after/")
    out |= flat(step(after, no_end, *states)[1], "after2/")

    # The planner on one latent state: J and J_c of given candidates, then whole `plan` calls.
    z = model.encode(jnp.asarray(inputs["plan_obs"]), key)
    out["plan/z"] = z
    candidates = jnp.concatenate([jnp.zeros((HORIZON, PLAN["num_pi_trajs"], ACTION_DIM)),
                                  jnp.clip(jnp.asarray(inputs["noise"]), -1, 1)], 1)
    out["plan/candidates"] = candidates
    latent = {"reward": jnp.repeat(z[None], PLAN["num_samples"], 0)}
    value, cost_value, _ = policies._constrained_estimate_value(model, None, key, latent, candidates, GAMMA,
                                                                cfg.cost_discount, False, True)
    out["plan/value"], out["plan/cost_value"] = value, cost_value
    for name, params in {"iteration": {}, "iterations2": dict(iterations=2),
                         "switch": dict(temperature=50.0, iterations=2, restrict_action=True),
                         "no_switch": dict(temperature=50.0, iterations=2)}.items():
        a, mean, metrics = policies.plan(model, None, key, {"reward": z, "cost": z}, jnp.asarray(inputs["prev_mean"]),
                                         GAMMA, cfg.cost_discount, True, **(PLAN | params))  # eval mode
        out |= {f"plan_{name}_eval/{k}": v for k, v in ({"action": a, "mean": mean} | metrics).items()}
    # The keys `plan` hands its bootstrap draws (`get_action_stats`): cost values' third split, values' fourth.
    stats_key = jax.random.split(jax.random.split(key)[0])[1]
    for name in ("q", "cost", "cost_boot", "q_boot"):
        stats_key, sub = jax.random.split(stats_key)
        if name.endswith("_boot"):
            out[f"plan/key_{name}"] = jax.random.key_data(sub)
    return {k: np.asarray(v) for k, v in out.items()}


def load(path=GOLDEN):
    with np.load(path) as f:
        return dict(f)


if __name__ == "__main__":
    authors = sys.argv[1]  # the authors' checkout; then optionally a size of SIZES and an output file
    size = sys.argv[2] if len(sys.argv) > 2 else "tiny"
    path = sys.argv[3] if len(sys.argv) > 3 else GOLDEN
    golden = record(authors, size)
    np.savez_compressed(path, **golden)
    print(f"{path}: {len(golden)} arrays, authors' commit {golden['commit']}")
