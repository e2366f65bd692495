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


def draw_windows(buffer, key, batch_size, length, starts):
    """B windows of `length` consecutive entries, env and start drawn uniformly and independently, the start among the
    `starts` oldest entries: the env (B, 1) and the ring indices (B, length) of each."""
    num_envs, capacity = buffer.cost.shape
    key_env, key_start = jax.random.split(key)
    env = jax.random.randint(key_env, (batch_size, 1), 0, num_envs)
    oldest = jnp.where(buffer.size == capacity, buffer.position, 0)
    start = oldest + jax.random.randint(key_start, (batch_size, 1), 0, starts)
    return env, (start + jnp.arange(length)) % capacity


def sample(buffer, key, batch_size, horizon):
    """B windows of H+1 entries: env and start drawn uniformly and independently, with replacement.

    Starts lie in [oldest, oldest + size - H) so a window never straddles the write pointer.  Needs size > H.
    """
    env, index = draw_windows(buffer, key, batch_size, horizon + 1, buffer.size - horizon)

    def window(array):  # (E, C, ...) -> (H+1, B, ...)
        return jnp.swapaxes(array[env, index], 0, 1)

    ended = window(buffer.terminated) | window(buffer.truncated)
    return Batch(obs=window(buffer.obs), action=window(buffer.action)[1:], reward=window(buffer.reward)[1:],
                 cost=window(buffer.cost)[1:], terminated=window(buffer.terminated)[1:].astype(jnp.float32),
                 valid=~ended[:-1])


class EpisodeRest(NamedTuple):
    obs: jax.Array  # (B, O) the start observations
    action: jax.Array  # (B, A) the action taken there
    cost_return: jax.Array  # (B,) sum_k gamma^k c_k over the rest of the start's episode
    steps: jax.Array  # (B,) steps from the start to its episode's last observation (0: the start is one)
    last_obs: jax.Array  # (B, O) the episode's last observation
    terminated: jax.Array  # (B,) bool: the episode ended in a terminal state (nothing to bootstrap after it)


def episode_rests(buffer, key, batch_size, length, gamma):
    """B entries drawn uniformly, each with the Monte-Carlo discounted cost of the rest of its episode, for checking
    the cost-value heads.  `length` bounds an episode's steps; starts lie at least that far behind the write pointer,
    so every episode they see has ended (while the buffer holds fewer entries, the rest is cut short)."""
    env, index = draw_windows(buffer, key, batch_size, length + 1, jnp.maximum(buffer.size - length, 1))
    ended = (buffer.terminated | buffer.truncated)[env, index]
    inside = jnp.cumsum(ended[:, :-1], -1) == 0  # step k (obs k -> obs k+1) is in the start's episode
    steps = inside.sum(-1)
    cost_return = (inside * gamma ** jnp.arange(length) * buffer.cost[env, index[:, 1:]]).sum(-1)
    env, last = env[:, 0], jnp.take_along_axis(index, steps[:, None], 1)[:, 0]
    return EpisodeRest(buffer.obs[env, index[:, 0]], buffer.action[env, index[:, 1]], cost_return, steps,
                       buffer.obs[env, last], buffer.terminated[env, last])
