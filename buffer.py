"""A device-resident circular replay buffer as pure functions, one time-ordered ring per parallel env
(the authors' `spowl/common/buffer.py`, `sample_from_buffer`, samples windows the same way).

Entry i of an env's ring holds (obs_i, action_i, reward_i, cost_i, terminated_i, truncated_i), where action_i,
reward_i and cost_i are what led to obs_i.  A sample is B windows of H+1 consecutive entries of one env.  Windows may
cross an episode end; `valid` marks the transitions that do not, and every loss term of the others is masked
(as the `done` mask of the authors' `make_step`), so no loss is ever computed across an episode boundary.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Buffer(NamedTuple):
    obs: jax.Array  # (E, C, O)
    action: jax.Array  # (E, C, A)
    reward: jax.Array  # (E, C)
    cost: jax.Array  # (E, C)
    terminated: jax.Array  # (E, C) bool
    truncated: jax.Array  # (E, C) bool
    position: jax.Array  # () next entry to write, the same for every env
    size: jax.Array  # () entries held per env


class Batch(NamedTuple):
    obs: jax.Array  # (H+1, B, O)
    action: jax.Array  # (H, B, A): action t leads from obs t to obs t+1
    reward: jax.Array  # (H, B)
    cost: jax.Array  # (H, B)
    terminated: jax.Array  # (H, B) float: obs t+1 is terminal (no bootstrapping)
    valid: jax.Array  # (H, B) bool: obs t did not end its episode, so step t stays inside one


def init(num_envs, capacity, obs_dim, action_dim):
    """An empty buffer of `capacity` entries per env."""
    shape = (num_envs, capacity)
    return Buffer(jnp.zeros((*shape, obs_dim)), jnp.zeros((*shape, action_dim)), jnp.zeros(shape), jnp.zeros(shape),
                  jnp.zeros(shape, bool), jnp.zeros(shape, bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add(buffer, obs, action, reward, cost, terminated, truncated):
    """Write one entry for every env (leading axis E), overwriting the oldest when full (FIFO)."""
    capacity = buffer.obs.shape[1]
    entry = (obs, action, reward, cost, terminated, truncated)
    stored = [array.at[:, buffer.position].set(value) for array, value in zip(buffer[:6], entry)]
    return Buffer(*stored, (buffer.position + 1) % capacity, jnp.minimum(buffer.size + 1, capacity))


def sample(buffer, key, batch_size, horizon):
    """B windows of H+1 entries: env and start drawn uniformly and independently, with replacement.

    Starts lie in [oldest, oldest + size - H) so a window never straddles the write pointer.  Needs size > H.
    """
    num_envs, capacity = buffer.reward.shape
    key_env, key_start = jax.random.split(key)
    env = jax.random.randint(key_env, (batch_size, 1), 0, num_envs)
    oldest = jnp.where(buffer.size == capacity, buffer.position, 0)
    start = oldest + jax.random.randint(key_start, (batch_size, 1), 0, buffer.size - horizon)
    index = (start + jnp.arange(horizon + 1)) % capacity  # (B, H+1)

    def window(array):  # (E, C, ...) -> (H+1, B, ...)
        return jnp.swapaxes(array[env, index], 0, 1)

    ended = window(buffer.terminated) | window(buffer.truncated)
    return Batch(obs=window(buffer.obs), action=window(buffer.action)[1:], reward=window(buffer.reward)[1:],
                 cost=window(buffer.cost)[1:], terminated=window(buffer.terminated)[1:].astype(jnp.float32),
                 valid=~ended[:-1])
