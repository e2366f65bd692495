"""Shared by the test files: XLA's optimisation level for the unit tests, the tiny config, the agent and batch at it,
the jitted update and planning call, the hand-built models, and the helpers that run spowl.py as a script.

Fixtures hold what a test receives; the plain functions and constants here are imported by name (`from conftest
import ...`) where a helper or a module-level flag list needs them.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import buffer as replay
import spowl
from planner import act
from policy import init_policy
from world_model import WorldModel, init_world_model, two_hot

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

# A small model that compiles and runs quickly on a CPU, and the same as spowl.py's flags.
TINY = spowl.Args(latent_dim=32, mlp_dim=64, enc_dim=32, num_samples=32, num_pi_trajs=4, num_elites=8, iterations=2,
                  batch_size=32, ci_resamples=200)
TINY_FLAGS = ["--latent-dim", "32", "--mlp-dim", "64", "--enc-dim", "32", "--num-samples", "32", "--num-pi-trajs", "4",
              "--num-elites", "8", "--iterations", "2", "--batch-size", "32", "--ci-resamples", "200",
              "--no-progress-bar"]
OBS_DIM, ACTION_DIM = 12, 2


def pytest_configure(config):
    """The unit tests compile many small programs and run each a few times, so the test process compiles at XLA's
    optimisation level 0 unless XLA_FLAGS says otherwise (the slow tests' command sets level 1, as the rounds test
    trains in this process).  Set here, before any test module is imported: JAX reads XLA_FLAGS once, when it starts
    its backend (at the first array), and importing JAX or the project's modules does not start it.  The runs the tests
    start set their own level."""
    # Level 0: a gradient update of the tiny model compiles in about a third of the time of level 1.
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


# ---------------------------------------------------------------------------------------------------------------------
# The tiny config, an agent and a batch at it, and the jitted update and planning call


@pytest.fixture(scope="session")
def tiny():
    """The tiny config (`TINY`)."""
    return TINY


def random_batch(key, args, obs_dim=OBS_DIM, action_dim=ACTION_DIM):
    h, b = args.horizon, args.batch_size
    keys = jax.random.split(key, 4)
    return replay.Batch(obs=jax.random.normal(keys[0], (h + 1, b, obs_dim)),
                        action=jax.random.uniform(keys[1], (h, b, action_dim), minval=-1, maxval=1),
                        reward=jax.random.uniform(keys[2], (h, b)), cost=jax.random.bernoulli(keys[3], 0.2, (h, b)) * 1.0,
                        terminated=jnp.zeros((h, b)), valid=jnp.ones((h, b), bool))


@pytest.fixture(scope="session")
def agent(tiny):
    """A fresh agent at the tiny config, from key 0."""
    return spowl.init_agent(jax.random.PRNGKey(0), tiny, OBS_DIM, ACTION_DIM)


@pytest.fixture(scope="session")
def batch(tiny):
    """A random batch at the tiny config, from key 1: nonzero rewards and costs, no terminal step."""
    return random_batch(jax.random.PRNGKey(1), tiny)


@pytest.fixture(scope="session")
def jit_update():
    """`spowl.update` jitted once for the test process: tests calling it with the same config share one compile (under
    `pytest -n`, when they share an xdist_group)."""
    return jax.jit(spowl.update, static_argnums=3)


@pytest.fixture(scope="session")
def jit_act():
    """The planning call `act` jitted once for the test process, as `jit_update`."""
    return jax.jit(act, static_argnums=(5, 6))


def perturbed_model(args):
    """A fresh world model with every parameter perturbed: the heads' output layers are no longer zero, so every loss
    term depends on its inputs (and on dropout)."""
    model = init_world_model(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    return jax.tree.unflatten(treedef, [w + 0.1 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------------------------------------------------
# Hand-built models and policies


class Fixed(eqx.Module):
    """A stand-in network computing a hand-written function."""

    fn: object = eqx.field(static=True)

    def __call__(self, x, key=None):
        return self.fn(x)


class Heads(eqx.Module):
    """A stand-in for a stacked ensemble on (z, a): head j predicts fn(z, a, j, p_j), as the logits of its two-hot
    encoding; `index` (j) and `p` carry the head axis that `ensemble_apply` maps over.  `p` holds a number per head,
    so that models differing only in it share a compiled program."""

    index: jax.Array
    p: jax.Array
    fn: object = eqx.field(static=True)
    args: object = eqx.field(static=True)

    @property
    def weights(self):
        return [self.index]

    def __call__(self, x, key=None):
        z, a = x[..., :self.args.latent_dim], x[..., self.args.latent_dim:]
        return jnp.log(two_hot(self.fn(z, a, self.index, self.p), self.args) + 1e-30)


def heads(fn, args, p=0.0):
    """Five `Heads` computing fn(z, a, j, p)."""
    return Heads(jnp.arange(5.0), jnp.full(5, p, jnp.float32), fn, args)


def hand_model(args, reward, cost, q, cost_value, drift=0.0):
    """A world model of hand-written functions: identity encoder; dynamics that add `drift` to the first latent
    coordinate each step (so z_i[0] = z_0[0] + i drift); reward(z, a) + reward.p (p = 0 here); and head j (0-4) of
    the cost, Q and Q^c ensembles fn(z, a, j).  z is (..., L), a (..., A)."""
    step = drift * jnp.eye(args.latent_dim)[0]
    ensemble = lambda fn: heads(lambda z, a, j, p: fn(z, a, j), args)  # noqa: E731
    return WorldModel(encoder=Fixed(lambda obs: obs), dynamics=Fixed(lambda x: x[..., :args.latent_dim] + step),
                      reward=Heads(jnp.zeros(()), jnp.zeros(()), lambda z, a, j, p: reward(z, a) + p, args),
                      cost=ensemble(cost), q=ensemble(q), cost_value=ensemble(cost_value))


def hand_built_model(args, reward, cost, q, cost_value):
    """`hand_model` with a constant latent, and reward and cost of the (one-dimensional) action a, Q and Q^c of a and
    the head index j."""
    return hand_model(args, lambda z, a: reward(a[..., 0]), lambda z, a, j: cost(a[..., 0]),
                      lambda z, a, j: q(a[..., 0], j), lambda z, a, j: cost_value(a[..., 0], j))


def zero_policy(args):
    """A policy whose actions are ~0: zero weights -> mean 0, log-std -4."""
    return jax.tree.map(jnp.zeros_like, init_policy(jax.random.PRNGKey(0), args, 1))


def pinned_policy(args, action):
    """A policy whose samples are `action` (within 1e-4) everywhere: zero weights, and output biases that give mean
    atanh(action) and the lowest log-std (-10)."""
    policy = zero_policy(args)
    return eqx.tree_at(lambda p: p.biases[-1], policy, jnp.array([np.arctanh(action), -30.0]))


@pytest.fixture(scope="session")
def plan_actions(jit_act):
    """`plan_actions(model, args, num_envs=8, key=0, policy=None)`: eval-mode actions and diagnostics of `act` for
    `num_envs` envs at z = 0 (the zero policy unless `policy` is given)."""

    def plan_actions(model, args, num_envs=8, key=0, policy=None):
        obs = jnp.zeros((num_envs, args.latent_dim))
        mean = jnp.zeros((num_envs, args.horizon, 1))
        policy = zero_policy(args) if policy is None else policy
        action, _, info = jit_act(model, policy, obs, mean, jax.random.PRNGKey(key), args, True)
        return np.asarray(action[:, 0]), {name: np.asarray(x) for name, x in info.items()}

    return plan_actions


# The model of `hand_ensembles`, from z_0 = 0 (so z_i[0] = i) with a policy pinned at 0.4 (also the action at z_H):
#   reward 0.1 z[0] + a;   cost head j: (j + 1)(1 - a) / 10;   Q_j = z[0] + j + a;   Q^c_j = 0.5 z[0] + 0.2 j + 0.5 a
# with gamma 0.9 and gamma_c 0.6 (unequal, so a swap shows), and every Q head averaged (q_subsample = 5).
HAND_POLICY_ACTION = 0.4


@pytest.fixture(scope="session")
def hand(tiny):
    """The config of `hand_ensembles`: the tiny one with gamma 0.9, gamma_c 0.6 and every Q head averaged."""
    return dataclasses.replace(tiny, gamma=0.9, cost_gamma=0.6, q_subsample=5)


@pytest.fixture(scope="session")
def hand_ensembles():
    """`hand_ensembles(args)`: the hand-written world model above, one per config for the session (its functions are
    static), so that planning calls with the same config share a program."""

    @functools.cache
    def hand_ensembles(args):
        return hand_model(args, reward=lambda z, a: a[..., 0] + 0.1 * z[..., 0],
                          cost=lambda z, a, j: (j + 1) * (1 - a[..., 0]) / 10,
                          q=lambda z, a, j: z[..., 0] + j + a[..., 0],
                          cost_value=lambda z, a, j: 0.5 * z[..., 0] + 0.2 * j + 0.5 * a[..., 0], drift=1.0)

    return hand_ensembles


# ---------------------------------------------------------------------------------------------------------------------
# spowl.py as a script


def spowl_cli(*flags, timeout=900, env=None):
    return subprocess.run([sys.executable, "spowl.py", *flags], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_DIR, env=env)


def spowl_start(*flags, env=None, new_session=False):
    """spowl.py started in the background (stdout and stderr captured), in a session of its own if `new_session`."""
    return subprocess.Popen([sys.executable, "spowl.py", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_DIR, env=env, start_new_session=new_session)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_rows(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
