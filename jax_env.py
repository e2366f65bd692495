"""JaxPointGoal1-v0: a small pure-JAX constrained navigation task modelled on Safety-Gymnasium's SafetyPointGoal1.

This is a fast test-bed for CI and for vmapping over seeds, not a benchmark: the physics is a simple integrator rather
than MuJoCo, so its returns and costs are not comparable to Safety-Gymnasium's numbers.

Dynamics. A point robot with heading `heading` moves on the plane. Each agent step runs `NUM_SUBSTEPS` Euler
substeps of length `DT`: the forward action accelerates the robot along its heading against linear damping (so the
top speed is `ACCELERATION / DAMPING` = 1 m/s), and the turn action sets the angular velocity directly. The position
is clipped to the arena [-ARENA_HALF_WIDTH, ARENA_HALF_WIDTH]^2, whose edge acts as a wall.

Reward. `REWARD_DISTANCE * (previous goal distance - current goal distance)`, plus `REWARD_GOAL` on the step the
robot comes within `GOAL_RADIUS` of the goal; the goal is then re-placed at a random free spot.

Cost. 1.0 for every step that ends with the robot inside any of the `NUM_HAZARDS` circular hazards.

Layout. The robot, goal and hazards are placed uniformly in [-PLACEMENT_HALF_WIDTH, PLACEMENT_HALF_WIDTH]^2 at every
reset, each keeping its keep-out distance from the others, so the robot and goal never start inside a hazard. The
hazards are denser than Safety-Gymnasium's so that a reward-greedy policy drives through them often.

Observation (float32, egocentric like Safety-Gymnasium's, `OBS_DIM` = 34):
    [0:16]   goal lidar: per angular sector relative to the heading, exp(-distance) of the goal (aliased into the
             neighbouring sectors, as in Safety-Gymnasium).
    [16:32]  hazard lidar: the same, max over the hazard centres.
    [32]     forward velocity / max speed.
    [33]     angular velocity / max turn rate.

Episodes last exactly `EPISODE_LENGTH` agent steps: `truncated` is True on the last one and `terminated` is always
False. `step` never resets; the caller calls `reset` after a truncated step.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

ENV_ID = "JaxPointGoal1-v0"
ACT_DIM = 2
EPISODE_LENGTH = 200
NUM_LIDAR_BINS = 16
OBS_DIM = 2 * NUM_LIDAR_BINS + 2

# Physics: 5 substeps of 0.02 s give 0.1 s per agent step, i.e. at most 0.1 m and 0.3 rad per step.
DT = 0.02
NUM_SUBSTEPS = 5
ACCELERATION = 5.0
DAMPING = 5.0
MAX_SPEED = ACCELERATION / DAMPING
MAX_TURN_RATE = 3.0

# Layout.
ARENA_HALF_WIDTH = 2.0
PLACEMENT_HALF_WIDTH = 1.5
NUM_HAZARDS = 8
HAZARD_RADIUS = 0.25
GOAL_RADIUS = 0.3
# Minimum distance between two objects is the sum of their keep-outs.
ROBOT_KEEPOUT = 0.4
GOAL_KEEPOUT = 0.3
HAZARD_KEEPOUT = 0.2
# Uniform candidates per placement; the first one that respects every keep-out is used (rejection sampling with a
# fixed shape). If none does, which is very rare at this density, the first candidate is used anyway.
NUM_PLACEMENT_CANDIDATES = 32

# Reward.
REWARD_DISTANCE = 1.0
REWARD_GOAL = 1.0


class EnvState(NamedTuple):
    """Full environment state; every field is an array so the state can be vmapped and carried through scans."""

    pos: jax.Array  # (2,) robot position
    heading: jax.Array  # () robot yaw in radians
    velocity: jax.Array  # () forward speed
    ang_velocity: jax.Array  # () yaw rate
    goal: jax.Array  # (2,) goal position
    hazards: jax.Array  # (NUM_HAZARDS, 2) hazard centres
    key: jax.Array  # PRNG key used to re-place the goal
    t: jax.Array  # () int32 agent steps taken in this episode


def _sample_free(key, occupied, clearance):
    """Draws a uniform point in the placement area at least `clearance` (per object) away from `occupied` (n, 2)."""
    candidates = jax.random.uniform(
        key, (NUM_PLACEMENT_CANDIDATES, 2), minval=-PLACEMENT_HALF_WIDTH, maxval=PLACEMENT_HALF_WIDTH
    )
    dist = jnp.linalg.norm(candidates[:, None, :] - occupied[None, :, :], axis=-1)  # (candidates, n)
    is_free = jnp.all(dist >= clearance, axis=-1)
    return candidates[jnp.argmax(is_free)]


def _lidar(pos, heading, objects):
    """Safety-Gymnasium-style lidar: per sector, the max over `objects` (n, 2) of exp(-distance), with aliasing."""
    rel = objects - pos
    dist = jnp.linalg.norm(rel, axis=-1)
    angle = jnp.mod(jnp.arctan2(rel[:, 1], rel[:, 0]) - heading, 2 * jnp.pi)
    position = angle / (2 * jnp.pi) * NUM_LIDAR_BINS  # in [0, NUM_LIDAR_BINS]
    sector = jnp.floor(position).astype(jnp.int32)
    alias = (position - sector)[:, None]  # how far into its sector each object lies
    reading = jnp.exp(-dist)[:, None]

    def one_hot(offset):
        return jax.nn.one_hot(jnp.mod(sector + offset, NUM_LIDAR_BINS), NUM_LIDAR_BINS)

    # An object near a sector edge also lights up the neighbouring sector, so the reading varies smoothly with angle.
    readings = jnp.maximum(
        one_hot(0) * reading, jnp.maximum(one_hot(1) * alias * reading, one_hot(-1) * (1 - alias) * reading)
    )
    return readings.max(axis=0)


def _observe(state):
    """Egocentric observation of shape (OBS_DIM,); see the module docstring for the layout."""
    return jnp.concatenate(
        [
            _lidar(state.pos, state.heading, state.goal[None]),
            _lidar(state.pos, state.heading, state.hazards),
            jnp.stack([state.velocity / MAX_SPEED, state.ang_velocity / MAX_TURN_RATE]),
        ]
    ).astype(jnp.float32)


def reset(key):
    """Samples a new layout; returns (state, obs)."""
    keys = jax.random.split(key, NUM_HAZARDS + 4)
    pos = jax.random.uniform(keys[0], (2,), minval=-PLACEMENT_HALF_WIDTH, maxval=PLACEMENT_HALF_WIDTH)
    heading = jax.random.uniform(keys[1], (), minval=-jnp.pi, maxval=jnp.pi)
    goal = _sample_free(keys[2], pos[None], ROBOT_KEEPOUT + GOAL_KEEPOUT)
    # Hazards are placed one by one; slots not yet placed sit far away so they never block a candidate.
    occupied = jnp.full((NUM_HAZARDS + 2, 2), 1e3).at[0].set(pos).at[1].set(goal)
    keepout = jnp.concatenate([jnp.array([ROBOT_KEEPOUT, GOAL_KEEPOUT]), jnp.full(NUM_HAZARDS, HAZARD_KEEPOUT)])
    for i in range(NUM_HAZARDS):
        hazard = _sample_free(keys[3 + i], occupied, keepout + HAZARD_KEEPOUT)
        occupied = occupied.at[2 + i].set(hazard)
    state = EnvState(
        pos=pos,
        heading=heading,
        velocity=jnp.zeros(()),
        ang_velocity=jnp.zeros(()),
        goal=goal,
        hazards=occupied[2:],
        key=keys[-1],
        t=jnp.zeros((), jnp.int32),
    )
    return state, _observe(state)


def _move(state, action):
    """Integrates the point-robot dynamics over one agent step (NUM_SUBSTEPS Euler substeps)."""
    ang_velocity = action[1] * MAX_TURN_RATE

    def substep(_, carry):
        pos, heading, velocity = carry
        heading = heading + ang_velocity * DT
        velocity = velocity + DT * (ACCELERATION * action[0] - DAMPING * velocity)
        pos = pos + DT * velocity * jnp.stack([jnp.cos(heading), jnp.sin(heading)])
        return jnp.clip(pos, -ARENA_HALF_WIDTH, ARENA_HALF_WIDTH), heading, velocity

    pos, heading, velocity = jax.lax.fori_loop(
        0, NUM_SUBSTEPS, substep, (state.pos, state.heading, state.velocity)
    )
    # Keep the yaw in [-pi, pi) so it stays well conditioned over long episodes.
    heading = jnp.mod(heading + jnp.pi, 2 * jnp.pi) - jnp.pi
    return state._replace(pos=pos, heading=heading, velocity=velocity, ang_velocity=ang_velocity)


def step(state, action):
    """Advances one agent step; returns (state, obs, reward, cost, terminated, truncated)."""
    action = jnp.clip(action, -1.0, 1.0)
    previous_dist = jnp.linalg.norm(state.goal - state.pos)
    state = _move(state, action)
    dist = jnp.linalg.norm(state.goal - state.pos)
    reached = dist <= GOAL_RADIUS
    reward = REWARD_DISTANCE * (previous_dist - dist) + REWARD_GOAL * reached

    # Re-place a reached goal away from the robot and the hazards; the next step's progress is measured to it.
    key, goal_key = jax.random.split(state.key)
    occupied = jnp.concatenate([state.pos[None], state.hazards])
    clearance = jnp.concatenate([jnp.array([ROBOT_KEEPOUT]), jnp.full(NUM_HAZARDS, HAZARD_KEEPOUT)]) + GOAL_KEEPOUT
    goal = jnp.where(reached, _sample_free(goal_key, occupied, clearance), state.goal)

    hazard_dist = jnp.linalg.norm(state.hazards - state.pos, axis=-1)
    cost = jnp.any(hazard_dist <= HAZARD_RADIUS).astype(jnp.float32)
    state = state._replace(goal=goal, key=key, t=state.t + 1)
    truncated = state.t >= EPISODE_LENGTH
    return state, _observe(state), reward.astype(jnp.float32), cost, jnp.zeros((), bool), truncated
