"""SPOWL's implicit world model (Fig. 1; Eq. 5-6), after TD-MPC2.

Encoder h, SimNorm latent dynamics f, reward head R, and three ensembles -- values Q_j, immediate costs C_j and cost
values Q^c_j -- all small MLPs on a latent z.  Rewards, costs and values are learned by discrete regression: a
two-hot target over bins in symlog space with a soft cross-entropy.  Ensembles are one stacked parameter set
evaluated with `vmap`, so each layer of a whole ensemble is one batched matmul.

Every function takes the run configuration `args` (the `Args` of `spowl.py`, or any object with the same fields)
and works on arrays with any leading batch shape.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp


# ---------------------------------------------------------------------------------------------------------------------
# Discrete regression (Fig. 1, after TD-MPC2; the authors' `spowl/spowl/math.py`)


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def two_hot(x, args):
    """Encode scalars (...) as two-hot vectors (..., num_bins) over bins evenly spaced in symlog space."""
    bin_size = (args.vmax - args.vmin) / (args.num_bins - 1)
    position = (jnp.clip(symlog(x), args.vmin, args.vmax) - args.vmin) / bin_size
    lower = jnp.clip(jnp.floor(position), 0, args.num_bins - 2).astype(jnp.int32)
    upper_weight = (position - lower)[..., None]
    lower_hot = jax.nn.one_hot(lower, args.num_bins)
    upper_hot = jax.nn.one_hot(lower + 1, args.num_bins)
    return (1 - upper_weight) * lower_hot + upper_weight * upper_hot


def decode(logits, args):
    """Expected value of a bin distribution, mapped back from symlog space: (..., num_bins) -> (...)."""
    bin_values = jnp.linspace(args.vmin, args.vmax, args.num_bins)
    return symexp(jax.nn.softmax(logits, -1) @ bin_values)


def soft_ce(logits, x, args):
    """Cross-entropy between predicted bin logits (..., num_bins) and the two-hot encoding of targets x (...)."""
    return -(two_hot(x, args) * jax.nn.log_softmax(logits, -1)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Networks (Fig. 1; the authors' `spowl/spowl/layers.py`)


def simnorm(x, group_size):
    """Simplicial normalisation: a softmax over each group of `group_size` consecutive latent dimensions."""
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    return jax.nn.softmax(groups, -1).reshape(x.shape)


def mish(x):
    """Mish, x tanh(softplus(x)), with one exponential: tanh(log(1 + e)) = n / (n + 2) for n = e (e + 2), e = exp(x).

    The same function as `jax.nn.mish` (within 3e-6 for |x| <= 30, gradient included) at a fraction of its cost on a
    CPU, where three transcendentals per unit (exp, log1p, tanh) took a third of a planning call.  Above x = 20,
    n / (n + 2) is 1 in float32, so clamping the exponent there only avoids inf / inf.
    """
    e = jnp.exp(jnp.minimum(x, 20.0))
    n = e * (e + 2)
    return x * n / (n + 2)


def layer_norm(x, scale, offset, by_products=True, eps=1e-5):
    """LayerNorm over the last axis.  Its mean and (biased) variance are the same averages (within 1e-6) taken one of
    two ways, whose cost differs by backend (docs/elementwise.md):
    - `by_products`: as products with a column of 1/n, which XLA's CPU backend computes faster than reductions over
      the minor axis, forward and backward (planning calls and updates took about 13 % less time).  A GPU's updates
      also ran faster this way, by about an eighth at paper size on an H100;
    - else as reductions, which a GPU runs faster in planning, where the ensembles normalise 25,600 rows at a time
      (10 envs x 512 samples x 5 heads): a paper-size planning call took about a quarter less time on an H100.
    """
    if by_products:
        average = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
        mean = lambda v: v @ average  # noqa: E731
    else:
        mean = lambda v: v.mean(-1, keepdims=True)  # noqa: E731
    centred = x - mean(x)
    return centred * jax.lax.rsqrt(mean(centred * centred) + eps) * scale + offset


def matmul(x, w, precision):
    """x @ w with both inputs rounded to `precision` ('float32' or 'bfloat16'), accumulated and returned in float32:
    mixed precision as GPU tensor cores run it.  At 'float32' this is the plain x @ w."""
    dtype = jnp.dtype(precision)
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class MLP(eqx.Module):
    """NormedLinear hidden layers (Linear -> Dropout (first layer) -> LayerNorm -> Mish) and an output layer.

    The output layer is a plain Linear, or Linear -> LayerNorm -> SimNorm when `simnorm_groups > 0` (encoder and
    dynamics).  Dropout is active only when a PRNG key is passed (training mode).  The Linear layers' products run
    at `precision` (see `matmul`) and LayerNorm takes its averages as products or reductions (see `layer_norm`), both
    set for acting by `for_acting`; parameters and everything between the products are float32.
    """

    weights: list
    biases: list
    norm_scales: list
    norm_offsets: list
    dropout: float = eqx.field(static=True)
    simnorm_groups: int = eqx.field(static=True)
    precision: str = eqx.field(static=True, default="float32")
    norm_by_products: bool = eqx.field(static=True, default=True)

    def __call__(self, x, key=None):
        num_layers = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = matmul(x, w, self.precision) + b
            if i == num_layers - 1 and not self.simnorm_groups:
                break
            if i == 0 and self.dropout > 0 and key is not None:
                keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
                x = jnp.where(keep, x / (1 - self.dropout), 0.0)
            x = layer_norm(x, self.norm_scales[i], self.norm_offsets[i], self.norm_by_products)
            x = mish(x) if i < num_layers - 1 else simnorm(x, self.simnorm_groups)
        return x


def mlp(key, sizes, dropout=0.0, simnorm_groups=0, zero_output=False):
    """An MLP with layer widths `sizes` (input, hidden..., output); weights ~ 0.02 x truncated normal, biases 0.

    `zero_output` zeroes the last layer so a regression head starts uniform over the bins, i.e. predicts 0.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    weights = [0.02 * jax.random.truncated_normal(k, -2, 2, (n_in, n_out)) for k, n_in, n_out in
               zip(keys, sizes[:-1], sizes[1:])]
    if zero_output:
        weights[-1] = jnp.zeros_like(weights[-1])
    normed = sizes[1:] if simnorm_groups else sizes[1:-1]
    return MLP(weights, [jnp.zeros(n) for n in sizes[1:]], [jnp.ones(n) for n in normed],
               [jnp.zeros(n) for n in normed], dropout, simnorm_groups)


def for_acting(networks, precision, norm_by_products):
    """The same networks (any pytree of MLPs: a world model, a policy) as acting runs them: products at `precision`,
    and LayerNorm's averages as products if `norm_by_products`, else as reductions (see `matmul` and `layer_norm`)."""
    return jax.tree.map(lambda m: dataclasses.replace(m, precision=precision, norm_by_products=norm_by_products)
                        if isinstance(m, MLP) else m, networks, is_leaf=lambda m: isinstance(m, MLP))


def ensemble(key, num_heads, sizes, dropout):
    """`num_heads` zero-output regression heads stacked into one MLP whose arrays carry a leading head axis."""
    return eqx.filter_vmap(lambda k: mlp(k, sizes, dropout, zero_output=True))(jax.random.split(key, num_heads))


def ensemble_apply(heads, x, key=None):
    """Every head of a stacked ensemble on the same input: (..., in) -> (num_heads, ..., out)."""
    num_heads = heads.weights[0].shape[0]
    if key is None:
        return eqx.filter_vmap(lambda head: head(x))(heads)
    return eqx.filter_vmap(lambda head, k: head(x, k))(heads, jax.random.split(key, num_heads))


class WorldModel(eqx.Module):
    encoder: MLP  # h: observation -> latent z
    dynamics: MLP  # f: (z, a) -> next z
    reward: MLP  # R: (z, a) -> reward logits
    cost: MLP  # C_j: (z, a) -> immediate-cost logits, stacked ensemble
    q: MLP  # Q_j: (z, a) -> value logits, stacked ensemble
    cost_value: MLP  # Q^c_j: (z, a) -> cost-value logits, stacked ensemble


def init_world_model(key, args, obs_dim, action_dim):
    """All components of Fig. 1, shaped as the authors' `WorldModel.__init__`; the targets start as copies."""
    keys = jax.random.split(key, 6)
    latent, hidden = args.latent_dim, args.mlp_dim
    head = [latent + action_dim, hidden, hidden, args.num_bins]
    # At least one hidden layer even for num_enc_layers=1, as the authors' `WorldModel.__init__`.
    encoder_sizes = [obs_dim] + [args.enc_dim] * max(args.num_enc_layers - 1, 1) + [latent]
    return WorldModel(
        encoder=mlp(keys[0], encoder_sizes, simnorm_groups=args.simnorm_dim),
        dynamics=mlp(keys[1], [latent + action_dim, hidden, hidden, latent], simnorm_groups=args.simnorm_dim),
        reward=mlp(keys[2], head, zero_output=True),
        cost=ensemble(keys[3], args.num_cost_heads, head, args.cost_dropout),
        q=ensemble(keys[4], args.num_q, head, args.dropout),
        cost_value=ensemble(keys[5], args.num_cost_heads, head, args.dropout),
    )


def targets(model):
    """The EMA target ensembles (Q-bar, Q^c-bar) of Eq. 6, as a pair."""
    return model.q, model.cost_value


def update_targets(target, model, args):
    """The target ensembles' EMA: Q-bar <- Q-bar + tau (Q - Q-bar), and Q^c-bar likewise at --cost-tau (unset: tau)."""
    cost_tau = args.tau if args.cost_tau is None else args.cost_tau
    return tuple(jax.tree.map(lambda t, o: t + rate * (o - t), old, new)
                 for rate, old, new in zip((args.tau, cost_tau), target, targets(model)))


def encode(model, obs):
    return model.encoder(obs)


def next_latent(model, z, action):
    return model.dynamics(jnp.concatenate([z, action], -1))


def head_values(heads, z, action, args, key=None):
    """Decoded predictions of every head of an ensemble: (num_heads, ...).  A key turns dropout on."""
    return decode(ensemble_apply(heads, jnp.concatenate([z, action], -1), key), args)


def aggregate(values, key, num, how):
    """Aggregate `num` of the heads (axis 0) drawn without replacement, independently for every sample.

    `how` is 'min', 'max' or 'avg'.  With `num` equal to the ensemble size all heads are used (the draw is moot).
    """
    if num < values.shape[0]:
        order = jnp.argsort(jax.random.uniform(key, values.shape), axis=0)[:num]
        values = jnp.take_along_axis(values, order, axis=0)
    return {"min": jnp.min, "max": jnp.max, "avg": jnp.mean}[how](values, axis=0)


# ---------------------------------------------------------------------------------------------------------------------
# Training (Eq. 5-6)


def td_targets(target, z_next, action_next, reward, cost, terminated, key, args):
    """TD targets of Eq. 6: Q_t = r_t + gamma min(2 of Q-bar), Q^c_t = c_t + gamma_c agg(Q^c-bar).

    Inputs are (H, B, ...): the encoded next observations z'_t and policy actions a'_t there.  The cost value's
    aggregation (`cost_target_agg`: min | max | avg) is the Sec. 5.3 ablation; the `(1 - terminated)` mask is the
    authors' (the paper's Eq. 6 has none).
    """
    target_q, target_cost_value = target
    key_q, key_c = jax.random.split(key)
    q = aggregate(head_values(target_q, z_next, action_next, args), key_q, args.q_subsample, "min")
    qc = aggregate(head_values(target_cost_value, z_next, action_next, args), key_c, args.cost_subsample,
                   args.cost_target_agg)
    alive = 1.0 - terminated
    return reward + alive * args.gamma * q, cost + alive * args.cost_gamma * qc


def masked_mean(x, mask):
    """Mean over the batch (last) axis, leaving out masked entries (cross-episode ones, say): (..., B) -> (...)."""
    return (x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def world_model_loss(model, batch, z_next, q_target, cost_value_target, key, args):
    """World-model loss of Eq. 5 with the authors' weighting (`make_step` in `spowl/spowl/update.py`).

    `batch` holds obs (H+1, B, O), action (H, B, A), reward, cost and valid (H, B); `valid` is False where a
    transition crosses an episode boundary.  There the step's losses are masked and the rollout restarts from the
    constant target z'_t = sg(h(s_{t+1})).  Returns the total and (a dict of the named terms, the rolled-out latents
    z_0..z_H that the policy loss reuses).
    """
    z0 = encode(model, batch.obs[0])

    def rollout(z, step):
        action, target, valid = step
        z_pred = next_latent(model, z, action)
        return jnp.where(valid[:, None], z_pred, target), (z, z_pred)

    z_last, (zs, z_preds) = jax.lax.scan(rollout, z0, (batch.action, z_next, batch.valid), unroll=True)  # H is short
    za = jnp.concatenate([zs, batch.action], -1)
    mask = batch.valid.astype(jnp.float32)
    # Every ensemble runs in training mode here, the cost heads included, as in the authors' `make_step`.
    key_q, key_c, key_cost = jax.random.split(key, 3)
    cost_weight = jnp.where(batch.cost > 0, args.cost_imb_weight, 1.0)  # cost signals are rare (authors' `make_step`)
    per_step = {  # each (H, B)
        "consistency": ((z_preds - z_next) ** 2).mean(-1),
        "reward": soft_ce(model.reward(za), batch.reward, args),
        "value": soft_ce(ensemble_apply(model.q, za, key_q), q_target, args).mean(0),
        "cost": soft_ce(ensemble_apply(model.cost, za, key_cost), batch.cost, args).mean(0) * cost_weight,
        "cost_value": soft_ce(ensemble_apply(model.cost_value, za, key_c), cost_value_target, args).mean(0),
    }
    rho = args.rho ** jnp.arange(batch.action.shape[0])
    terms = {name: (rho * masked_mean(x, mask)).mean() for name, x in per_step.items()}
    coefs = {"consistency": args.consistency_coef, "reward": args.reward_coef, "value": args.value_coef,
             "cost": args.cost_coef, "cost_value": args.cost_value_coef}
    total = sum(coefs[name] * term for name, term in terms.items())
    latents = jnp.concatenate([zs, z_last[None]], 0)
    return total, (terms, jax.lax.stop_gradient(latents))


def cost_value_check(model, rest, last, last_action, args):
    """The cost-value heads against Monte-Carlo cost returns (a diagnostic, logged once a round).

    `rest` (buffer.episode_rests) holds stored states s_t with their actions a_t and the discounted cost of the rest
    of their episode as it happened; `last` is each episode's last state s_T, encoded, and `last_action` the policy's
    action there.  Returns the heads' prediction Q^c(s_t, a_t) (mean of all heads, no dropout), the prediction of that
    same finite sum, Q^c(s_t, a_t) - gamma_c^n Q^c(s_T, pi(s_T)) (truncated episodes bootstrap), and the cost return
    itself."""
    predicted = head_values(model.cost_value, encode(model, rest.obs), rest.action, args).mean(0)
    after = head_values(model.cost_value, last, last_action, args).mean(0)
    episode_part = predicted - args.cost_gamma**rest.steps * jnp.where(rest.terminated, 0.0, after)
    counted = rest.steps > 0  # a start that is its episode's last state has no rest
    values = {"cost_value_pred": predicted, "cost_value_pred_episode": episode_part, "cost_return_mc": rest.cost_return}
    return {name: masked_mean(x, counted) for name, x in values.items()}
