"""How the seven Table-1 tasks step under Safety-Gymnasium 1.0.0 as released: the golden file `envs.npz`.

Recorded once on the released stack, which is Safety-Gymnasium 1.0.0 with its own pins (Python 3.10, mujoco 2.3.3,
numpy 1.23.5, gymnasium 0.28.1), unpatched:

    python3.10 -m venv /tmp/sg-released && /tmp/sg-released/bin/pip install safety-gymnasium==1.0.0
    /tmp/sg-released/bin/python golden/record_envs.py record          # writes golden/envs.npz (1 min)

`test_envs.py::test_golden_trajectory` steps the same actions on the project's stack and compares;
`python golden/record_envs.py compare` prints that comparison as a table, on any stack.

Each task starts from `reset(seed)` and takes STEPS actions, uniform in the action box and each held for `hold` steps
(CASES), so that the robot travels and meets hazards. An episode end resets the env (its seeded stream continued), as
training does. Stored per task: the actions, the reset observation, observations after the steps in OBS_STEPS, every
step's reward, cost and end flags, and the yardstick.

The yardstick is how far the released stack drifts from itself under perturbations at the level of floating-point
rounding. MuJoCo is chaotic, and a lidar reading jumps when an object crosses a bin edge, so any other stack (another
numpy rounds `cos` differently by one unit in the last place) drifts from the golden run the same way. Four reruns
of the released stack measure it: two with every action scaled by 1 +- 1e-12, and two with the reset state moved by
one unit in the last place (qpos scaled by 1 +- 2**-52, then `mj_forward`). Stored: their largest |obs difference|
at each kept step and |reward difference| at each step, and their cost sums and end steps.
"""

import pathlib
import sys

import gymnasium
import numpy as np

TASKS = ("SafetyPointGoal1-v0", "SafetyPointGoal2-v0", "SafetyPointPush1-v0", "SafetyPointButton1-v0",
         "SafetyCarGoal1-v0", "SafetyDoggoGoal1-v0", "SafetyAntGoal1-v0")
CASES = {  # task: (reset seed, steps an action is held), chosen so that 5 of the 7 tasks meet a cost in STEPS steps
    "SafetyPointGoal1-v0": (3, 25), "SafetyPointGoal2-v0": (3, 25), "SafetyPointPush1-v0": (2, 25),
    "SafetyPointButton1-v0": (3, 25), "SafetyCarGoal1-v0": (3, 25), "SafetyDoggoGoal1-v0": (0, 25),
    "SafetyAntGoal1-v0": (3, 5)}  # Doggo and Ant met no cost from any of 40 seeds at hold 25; Ant falls 8 times here
STEPS = 300
YARD_ACTION = (1e-12, -1e-12)  # the yardstick's reruns: actions scaled by 1 + each,
YARD_STATE = (2.0**-52, -(2.0**-52))  # and the reset state's qpos scaled by 1 + each (one unit in the last place)
OBS_STEPS = (1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 250, 300)  # observations kept after these steps
GOLDEN = pathlib.Path(__file__).with_name("envs.npz")


def make_actions(space, task_index, hold):
    """STEPS actions in the task's action box, piecewise constant over `hold` steps, from a fixed numpy stream."""
    rng = np.random.RandomState(1000 + task_index)
    held = rng.uniform(-1.0, 1.0, (-(-STEPS // hold), space.shape[0]))
    unit = np.repeat(held, hold, axis=0)[:STEPS]
    return space.low + (unit + 1.0) * 0.5 * (space.high - space.low)


def rollout(safety_gymnasium, task, actions, nudge=0.0):
    """Steps `task` through `actions` from its reset seed, its reset state qpos scaled by 1 + `nudge`.
    Returns the recorded arrays."""
    env = safety_gymnasium.make(task)
    obs, _ = env.reset(seed=CASES[task][0])
    if nudge:
        import mujoco

        engine = env.unwrapped.task.agent.engine
        engine.data.qpos[:] *= 1.0 + nudge
        mujoco.mj_forward(engine.model, engine.data)
        obs = env.unwrapped.task.obs()
    spaces = env.unwrapped.task.obs_info.obs_space_dict  # the observation's parts, flattened as the task does
    lidar = gymnasium.spaces.utils.flatten(spaces, {name: np.full(space.shape, "lidar" in name)
                                                    for name, space in spaces.items()}) > 0
    out = {"lidar": lidar, "reset_obs": np.asarray(obs, np.float64), "obs": [], "reward": [], "cost": [],
           "terminated": [], "truncated": []}
    for t, action in enumerate(actions, start=1):
        obs, reward, cost, terminated, truncated, _ = env.step(action)
        for name, value in (("reward", reward), ("cost", cost), ("terminated", terminated),
                            ("truncated", truncated)):
            out[name].append(value)
        if t in OBS_STEPS:
            out["obs"].append(np.asarray(obs, np.float64))
        if terminated or truncated:
            env.reset()
    env.close()
    return {name: np.asarray(value, bool if name in ("lidar", "terminated", "truncated") else np.float64)
            for name, value in out.items()}


def load():
    """The golden file as {task: {name: array}}, with each task's actions."""
    with np.load(GOLDEN) as data:
        return {task: {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(task + "/")}
                for task in TASKS}


def differences(golden, run):
    """|obs difference| at reset and after each step of OBS_STEPS (max over the sensors, and over the lidars, whose
    readings jump when an object crosses a bin edge), |reward difference| at each step, the cost sum and the steps
    that ended an episode."""
    obs = np.abs(np.vstack([run["reset_obs"], run["obs"]]) - np.vstack([golden["reset_obs"], golden["obs"]]))
    return {"sensors": obs[:, ~golden["lidar"]].max(axis=1), "lidar": obs[:, golden["lidar"]].max(axis=1),
            "reward": np.abs(run["reward"] - golden["reward"]), "cost_sum": run["cost"].sum(),
            "ends": np.flatnonzero(run["terminated"] | run["truncated"])}


def yardstick(safety_gymnasium, task, golden):
    """The largest drift of the four perturbed reruns of the released stack from `golden` (see the docstring)."""
    runs = [differences(golden, rollout(safety_gymnasium, task, golden["actions"] * (1.0 + eps)))
            for eps in YARD_ACTION]
    runs += [differences(golden, rollout(safety_gymnasium, task, golden["actions"], nudge=eps)) for eps in YARD_STATE]
    largest = lambda name: np.max([run[name] for run in runs], axis=0)  # noqa: E731
    return {"yardstick_sensors": largest("sensors"), "yardstick_lidar": largest("lidar"),
            "yardstick_reward": largest("reward"),
            "yardstick_cost_sums": np.array([run["cost_sum"] for run in runs]),
            "yardstick_ends_equal": np.array([np.array_equal(run["ends"], np.flatnonzero(golden["terminated"] |
                                                                                          golden["truncated"]))
                                              for run in runs])}


def print_table(golden, rows):
    """Each task's differences from the golden run, each above the yardstick's."""
    print("max |difference| after".ljust(24) + "".join(f"{s:>8}" for s in (0, *OBS_STEPS)) + "  costs")
    for task, d in rows.items():
        g = golden[task]
        print(f"{task:24}" + "".join(f"{s:>8}" for s in [""] * 15) + f"  {d['cost_sum']:g} of {g['cost'].sum():g}")
        for part in ("sensors", "lidar"):
            print(f"  {part:22}" + "".join(f"{x:8.0e}" for x in d[part]))
            print(f"    yardstick".ljust(24) + "".join(f"{x:8.0e}" for x in g["yardstick_" + part]))
        reward, yard = d["reward"][np.array(OBS_STEPS) - 1], g["yardstick_reward"][np.array(OBS_STEPS) - 1]
        print("  reward".ljust(32) + "".join(f"{x:8.0e}" for x in reward))
        print("    yardstick".ljust(32) + "".join(f"{x:8.0e}" for x in yard) + f"  {g['yardstick_cost_sums']}")


def main(mode):
    if mode == "record" and sys.version_info >= (3, 11):
        sys.exit("record_envs.py: record runs on the released stack (Python 3.10, see the docstring)")
    if mode == "compare":  # the project's stack: Safety-Gymnasium fixed as it loads
        sys.path.insert(0, str(GOLDEN.parent.parent))
        import sg_fixes

        sg_fixes.install()
    import safety_gymnasium

    if mode == "record":
        arrays = {}
        for i, task in enumerate(TASKS):
            actions = make_actions(safety_gymnasium.make(task).action_space, i, CASES[task][1])
            run = {"actions": actions, **rollout(safety_gymnasium, task, actions)}
            run.update(yardstick(safety_gymnasium, task, run))
            arrays.update({f"{task}/{name}": value for name, value in run.items()})
            print(task, "cost sum", run["cost"].sum(), "ends at", np.flatnonzero(run["terminated"] | run["truncated"]))
        np.savez_compressed(GOLDEN, **arrays)
        print("wrote", GOLDEN, GOLDEN.stat().st_size, "bytes")
        return
    golden = load()
    print_table(golden, {task: differences(golden[task], rollout(safety_gymnasium, task, golden[task]["actions"]))
                         for task in TASKS})


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("record", "compare"):
        sys.exit("usage: python golden/record_envs.py record|compare")
    main(sys.argv[1])
