"""Safety-Gymnasium 1.0.0, its only release, on today's Python, numpy and mujoco: six fixes applied as it loads.

    import sg_fixes
    sg_fixes.install()        # before the first `import safety_gymnasium`; envs.py does this
    import safety_gymnasium

The release was written for Python <= 3.10, numpy 1 and mujoco 2. On today's stack it fails in six places:
1. Python >= 3.11 rejects a dataclass field whose default is unhashable, so `color: np.array = COLOR['goal']` raises
   `ValueError: mutable default` at import (12 asset modules). The fix gives the field a `default_factory` that
   returns the very same shared array, as the default did.
2. `import safety_gymnasium` imports the multi-agent tasks, which need gymnasium-robotics and pettingzoo. The fix
   defers that import to the first call of `safety_gymnasium.make_ma`, so the single-agent tasks need neither.
3. numpy >= 2.5 no longer turns a one-element array into a Python int or float: `sensor(i).objid` is one
   (Car, Doggo, Ant), and mujoco's `model.jnt()` takes only an int. The fix takes its element.
4. The same, for a hinge sensor's reading passed to `float()` (Doggo, Ant).
5. numpy 2's `np.array(x, copy=False)` raises where a copy is needed (an action given as a list). numpy 1 read it
   as "copy only if needed", which is `np.asarray(x)`.
6. Rendering (videos) draws markers (lidar dots, a red sphere at a cost) with Gymnasium 0.28's offscreen viewer,
   which sets `MjvGeom.texid`, a field mujoco 3.2 removed. The fix hands Safety-Gymnasium `MarkerViewer`, that
   viewer with markers made by mujoco's own `mjv_initGeom`.

The installed files stay as they are. `install()` puts a finder at the front of `sys.meta_path` that compiles the
modules named in FIXES from their source with these edits (no bytecode is cached for them); every other module,
Safety-Gymnasium's own included, loads as usual. So the fixes hold wherever and however the package is installed,
and a reinstall cannot undo them. Each edit is one line for one line, so tracebacks point at the right lines.

Every edit states the exact 1.0.0 line it replaces. Another Safety-Gymnasium version is refused at its import, with
one line, and so is a module whose 1.0.0 line is not there exactly once (a file edited by hand, say). `install()`
twice installs once. No fix changes a computed value: the golden-trajectory test (test_envs.py) steps the seven
Table-1 tasks against the released package on its own Python 3.10 stack.
"""

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys

import mujoco
import numpy as np
from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer

VERSION = "1.0.0"
PACKAGE = "safety_gymnasium"

# module -> [(1.0.0 text, fixed text)]: each 1.0.0 text is a whole line, found exactly once in its module.
FIXES = {}
for _module, _colour in [("assets.free_geoms.push_box", "push_box"), ("assets.free_geoms.vases", "vase"),
                         ("assets.geoms.apples", "apple"), ("assets.geoms.buttons", "button"),
                         ("assets.geoms.circle", "circle"), ("assets.geoms.goal", "goal"),
                         ("assets.geoms.hazards", "hazard"), ("assets.geoms.oranges", "orange"),
                         ("assets.geoms.pillars", "pillar"), ("assets.geoms.sigwalls", "sigwall"),
                         ("assets.geoms.walls", "wall"), ("assets.mocaps.gremlins", "gremlin")]:
    FIXES[f"{PACKAGE}.{_module}"] = [(  # 1.
        f"    color: np.array = COLOR['{_colour}']",
        f"    color: np.array = field(default_factory=lambda: COLOR['{_colour}'])")]
for _module in ("assets.geoms.circle", "assets.geoms.sigwalls"):  # 1., the two that do not import `field` yet
    FIXES[f"{PACKAGE}.{_module}"].append(("from dataclasses import dataclass",
                                          "from dataclasses import dataclass, field"))
FIXES[PACKAGE] = [(  # 2.
    "from safety_gymnasium.tasks.safe_multi_agent.safe_mujoco_multi import make_ma",
    "def make_ma(*args, **kwargs): from safety_gymnasium.tasks.safe_multi_agent.safe_mujoco_multi import make_ma; "
    "return make_ma(*args, **kwargs)")]
FIXES[f"{PACKAGE}.bases.base_agent"] = [
    ("                joint_id = self.engine.model.sensor(sensor_id).objid",  # 3.
     "                joint_id = int(self.engine.model.sensor(sensor_id).objid[0])"),
    ("                theta = float(self.get_sensor(sensor))  # Ensure not 1D, 1-element array",  # 4.
     "                theta = float(self.get_sensor(sensor)[0])  # Ensure not 1D, 1-element array"),
    ("        action = np.array(action, copy=False)  # Cast to ndarray",  # 5.
     "        action = np.asarray(action)  # Cast to ndarray")]
FIXES[f"{PACKAGE}.bases.underlying"] = [(  # 6.
    "from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer",
    "from sg_fixes import MarkerViewer as OffScreenViewer")]
FIXES[f"{PACKAGE}.builder"] = [(  # 5.
    "        action = np.array(action, copy=False)  # cast to ndarray",
    "        action = np.asarray(action)  # cast to ndarray")]


class MarkerViewer(OffScreenViewer):
    """Gymnasium's offscreen viewer, with its markers made by `mujoco.mjv_initGeom` (6.)."""

    def _add_marker_to_scene(self, marker: dict):
        if self.scn.ngeom >= self.scn.maxgeom:
            raise RuntimeError(f"Ran out of geoms. maxgeom: {self.scn.maxgeom}")
        geom = self.scn.geoms[self.scn.ngeom]
        size = np.zeros(3)
        size[:len(marker["size"])] = marker["size"]
        mujoco.mjv_initGeom(geom, marker["type"], size, np.asarray(marker["pos"], np.float64), np.eye(3).ravel(),
                            np.asarray(marker["rgba"], np.float32))
        geom.category, geom.label = mujoco.mjtCatBit.mjCAT_DECOR, marker.get("label", "")
        self.scn.ngeom += 1


def fix(module: str, source: str) -> str:
    """`source` of `module` with its FIXES applied; raises ImportError if a 1.0.0 line is not there exactly once."""
    lines = source.split("\n")
    for old, new in FIXES[module]:
        if lines.count(old) != 1:
            raise ImportError(f"{module} does not hold the Safety-Gymnasium {VERSION} line that sg_fixes.py fixes "
                              f"({old.strip()!r}): `pip install --force-reinstall --no-deps "
                              f"safety-gymnasium=={VERSION}`")
        lines[lines.index(old)] = new
    return "\n".join(lines)


class _FixingLoader(importlib.machinery.SourceFileLoader):
    """Compiles a module from its fixed source, never from or into its bytecode cache."""

    def get_code(self, fullname):
        source = importlib.util.decode_source(self.get_data(self.path))
        return compile(fix(fullname, source), self.path, "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules in FIXES as the usual path finder does, then hands them to `_FixingLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname == PACKAGE:
            check_version()
        if fullname not in FIXES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _FixingLoader(spec.loader.name, spec.loader.path)
        return spec


def check_version():
    """Refuses, in one line, any Safety-Gymnasium but the release these fixes were written for."""
    try:
        found = importlib.metadata.version("safety-gymnasium")
    except importlib.metadata.PackageNotFoundError:
        return  # the import itself will say that it is missing
    if found != VERSION:
        raise ImportError(f"sg_fixes.py knows Safety-Gymnasium {VERSION} only, and {found} is installed: "
                          f"`pip install --no-deps safety-gymnasium=={VERSION}`")


def install():
    """Makes the next `import safety_gymnasium` load the fixed modules (idempotent)."""
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    loaded = sorted(module for module in FIXES if module in sys.modules)
    if loaded:
        raise ImportError(f"sg_fixes.install() must come before `import safety_gymnasium` ({loaded[0]} is loaded)")
    sys.meta_path.insert(0, _Finder())
