"""The install: every import satisfied, Safety-Gymnasium 1.0.0's fixes (sg_fixes.py), and the seven Table-1 tasks
stepped against the released package."""

import ast
import glob
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import sg_fixes
from golden import record_envs

sg_fixes.install()
import safety_gymnasium  # noqa: E402

GOLDEN = record_envs.load()
MARGIN = 10.0  # how far past the yardstick's one realisation of the drift a difference may go


def envelope(drift):
    """The tolerance at each step: MARGIN times the largest drift of the yardstick up to that step, and never
    below 1e-12. Chaos only grows, so a step's tolerance is never tighter than an earlier one's."""
    return np.maximum(MARGIN * np.maximum.accumulate(drift), 1e-12)


@pytest.mark.parametrize("task", record_envs.TASKS)
def test_golden_trajectory(task):
    """The task steps as Safety-Gymnasium 1.0.0 does on its own stack (Python 3.10, mujoco 2.3.3, numpy 1.23.5),
    recorded in golden/envs.npz by `golden/record_envs.py`, whose docstring gives the command.

    Tolerances come from a measured yardstick, not a guess: the released stack against itself in four reruns, with
    the actions scaled by 1 +- 1e-12 and with the reset state's qpos scaled by 1 +- 2**-52 (record_envs.py). A
    difference may be at most MARGIN times the yardstick's largest drift so far. Where the yardstick stays small that
    is tight: Doggo is held to 1e-9 for all 300 steps and Ant to 2e-8 for 100, and the Point tasks' sensors to 3e-7
    or less for their first 2 (PointGoal1) to 100 (PointButton1) steps, until a lidar jump or a contact opens the
    tolerance. The Car's reset pose sits on a contact edge (a one-ulp move changes its contacts, and its
    accelerometer by 5), so it is compared loosely from the first step. Once the yardstick's sensors have drifted by
    1, the runs are different trajectories, and a difference need only be one of two values in the golden run's
    range. Costs must be equal step for step while the yardstick's drift stays under 1e-6, and the 300-step cost sums
    and the steps that ended an episode equal wherever all four reruns kept them.
    """
    golden = GOLDEN[task]
    run = record_envs.rollout(safety_gymnasium, task, golden["actions"])
    d = record_envs.differences(golden, run)
    # Once the yardstick's sensors have drifted by 1 or more, the runs are different trajectories, and from that
    # step on a difference need only be one of two values within the golden run's range (at most twice the range).
    steps = {"sensors": np.array([0, *record_envs.OBS_STEPS]), "reward": np.arange(1, record_envs.STEPS + 1)}
    steps["lidar"] = steps["sensors"]
    kept_obs = np.vstack([golden["reset_obs"], golden["obs"]])
    ranges = {"sensors": np.abs(kept_obs[:, ~golden["lidar"]]).max(),
              "lidar": np.abs(kept_obs[:, golden["lidar"]]).max(), "reward": np.abs(golden["reward"]).max()}
    separated = steps["sensors"][np.maximum.accumulate(golden["yardstick_sensors"]) >= 1.0]
    for part in ("sensors", "lidar", "reward"):
        tolerance = envelope(golden["yardstick_" + part])
        if separated.size:
            tolerance = np.where(steps[part] >= separated[0], np.maximum(tolerance, 2 * ranges[part]), tolerance)
        worst = np.argmax(d[part] / tolerance)
        assert d[part][worst] <= tolerance[worst], (
            f"{task}: |{part} difference| {d[part][worst]:.1e} after step {steps[part][worst]}, "
            f"tolerance {tolerance[worst]:.1e}")

    drift = np.maximum.accumulate(np.maximum(golden["yardstick_sensors"], golden["yardstick_lidar"]))[1:]
    predictable = record_envs.OBS_STEPS[np.argmax(drift > 1e-6)] - 1 if (drift > 1e-6).any() else record_envs.STEPS
    np.testing.assert_array_equal(run["cost"][:predictable], golden["cost"][:predictable])
    if (golden["yardstick_cost_sums"] == golden["cost"].sum()).all():
        assert run["cost"].sum() == golden["cost"].sum()
    if golden["yardstick_ends_equal"].all():
        np.testing.assert_array_equal(np.flatnonzero(run["terminated"] | run["truncated"]),
                                      np.flatnonzero(golden["terminated"] | golden["truncated"]))


# --track only, which names the package to install when it is missing; and golden/record_authors.py's, which
# records with the authors' code in a venv of its own, with omegaconf added (docs/fidelity.md)
OPTIONAL = {"wandb", "omegaconf"}


def test_every_package_the_code_imports_is_installed():
    """requirements.txt holds every package that the project's files import, at any depth (a lazy import in a
    function included), so an install by `pip install --no-deps -r requirements.txt` lacks none."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = set()
    for path in glob.glob(os.path.join(here, "*.py")) + glob.glob(os.path.join(here, "golden", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    missing = sorted(name for name in names - OPTIONAL if importlib.util.find_spec(name) is None)
    assert not missing, f"imported but not installed: {missing}"


def test_every_fix_applies_to_the_installed_release():
    """Each of sg_fixes' edits finds its 1.0.0 line exactly once, and the fixed modules are the ones loaded."""
    for module, edits in sg_fixes.FIXES.items():
        source = open(importlib.import_module(module).__file__, encoding="utf-8").read()
        fixed = sg_fixes.fix(module, source)
        assert source.count("\n") == fixed.count("\n")  # one line for one line: tracebacks stay right
        for old, new in edits:
            assert new in fixed.split("\n") and old not in fixed.split("\n")
    assert isinstance(sys.modules["safety_gymnasium.bases.base_agent"].__loader__, sg_fixes._FixingLoader)
    assert safety_gymnasium.make_ma.__module__ == "safety_gymnasium"  # deferred: gymnasium-robotics not needed


def test_fix_refuses_an_unknown_text_and_install_is_idempotent():
    module = "safety_gymnasium.builder"
    old = sg_fixes.FIXES[module][0][0]
    with pytest.raises(ImportError, match="does not hold the Safety-Gymnasium 1.0.0 line"):
        sg_fixes.fix(module, "import numpy as np\n")
    with pytest.raises(ImportError, match="does not hold"):  # already fixed by hand, or edited: refused too
        sg_fixes.fix(module, old + "\n" + old + "\n")
    before = list(sys.meta_path)
    sg_fixes.install()
    assert sys.meta_path == before


def run_python(code, **environ):
    """`code` in a fresh interpreter, with `environ` added to the environment."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **environ})


def test_refuses_another_safety_gymnasium_version_in_one_line():
    result = run_python("import importlib.metadata as m, sg_fixes\n"
                        "m.version = lambda name: '1.1.0' if name == 'safety-gymnasium' else None\n"
                        "sg_fixes.install()\n"
                        "try:\n    import safety_gymnasium\nexcept ImportError as e:\n    print(e)\n")
    assert result.stdout.strip().splitlines() == [
        "sg_fixes.py knows Safety-Gymnasium 1.0.0 only, and 1.1.0 is installed: "
        "`pip install --no-deps safety-gymnasium==1.0.0`"], result.stderr


def test_fixes_change_nothing_on_disk_and_import_without_warnings():
    """A fresh interpreter imports and steps a task with every warning an error; the installed files are untouched
    and no bytecode of a fixed module is written."""
    sources = [importlib.util.find_spec(module).origin for module in sg_fixes.FIXES]
    files = sources + [importlib.util.cache_from_source(source) for source in sources]
    read = lambda path: open(path, "rb").read() if os.path.exists(path) else None  # noqa: E731
    before = [read(f) for f in files]
    result = run_python("import warnings; warnings.simplefilter('error')\n"
                        "import sg_fixes; sg_fixes.install(); import safety_gymnasium\n"
                        "env = safety_gymnasium.make('SafetyCarGoal1-v0'); env.reset(seed=0)\n"
                        "env.step([0.1, -0.2]); print('ok')\n")
    assert result.stdout.strip() == "ok", result.stderr
    assert [read(f) for f in files] == before


def test_a_video_frame_draws_the_markers():
    """Rendering as `--capture-video` does (EGL), on mujoco >= 3.2 (fix 6): after a step with a cost, the scene holds
    Safety-Gymnasium's markers, and a frame is drawn."""
    result = run_python("""
import numpy as np
import envs
env = envs.make_env("SafetyPointGoal1-v0", 5, 0, render=True)
env.reset()
rng = np.random.default_rng(0)
while env.step(rng.uniform(-1, 1, 2))[4]["cost"] == 0:
    pass
frame = env.render()
scene = env.unwrapped.task.viewer.scn
geoms = scene.ngeom
env.unwrapped.task.render_conf.lidar_markers, env.unwrapped.cost = False, {}
env.render()
print(frame.shape, int(frame.std() > 10), geoms - scene.ngeom)
""", MUJOCO_GL="egl")
    # a dot per bin of the 3 lidars (goal, hazards, vases; 16 bins each), and the cost sphere
    assert result.stdout.split("\n")[0] == f"(256, 256, 3) 1 {3 * 16 + 1}", result.stderr
