"""Continuous-control pipeline: Gaussian policies on Minari offline datasets (extra: control)."""

import os

from iwsft.errors import require_extra

require_extra("control", "gymnasium", "mujoco", "minari", "matplotlib", "imageio", "scipy")

# MuJoCo picks its off-screen OpenGL backend when first imported: EGL renders on machines without
# a display (OSMesa fails on these machines). A value set by the user wins.
os.environ.setdefault("MUJOCO_GL", "egl")
