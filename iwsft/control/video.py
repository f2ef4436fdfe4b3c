"""Videos of a policy's evaluation episodes: an animated GIF and a strip of frames (PNG).

MuJoCo renders off-screen through EGL on machines without a display (iwsft.control sets
MUJOCO_GL=egl unless it is set; OSMesa fails on these machines).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from iwsft import envs as envs_lib

SIZE = 240  # pixels, square
MAX_FRAMES = 150  # per episode: longer episodes are subsampled evenly


def record_episodes(
  act: Callable[[np.ndarray], np.ndarray], env_spec, episodes: int, seed: int
) -> tuple[list[np.ndarray], list[float]]:
  """Runs `episodes` episodes (reset seeds seed, seed + 1, ...) of act(obs [1, O]) -> [1, A] with
  rendering; -> (frames [H, W, 3] uint8 of all episodes in turn, the episodes' returns)."""
  env = _render_env(env_spec)
  frames, returns = [], []
  try:
    for i in range(episodes):
      obs, _ = env.reset(seed=seed + i)
      shots, total, done = [env.render()], 0.0, False
      while not done:
        action = np.asarray(act(obs[None].astype(np.float32)), np.float64)[0]
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + float(reward), terminated or truncated
        shots.append(env.render())
      keep = np.unique(np.linspace(0, len(shots) - 1, min(len(shots), MAX_FRAMES)).astype(int))
      frames += [shots[k] for k in keep]
      returns.append(total)
  finally:
    env.close()
  return frames, returns


def _render_env(env_spec):
  """The environment rendering to arrays, through the model's "track" camera (it follows the
  body, as the locomotion models define it) where there is one."""
  import mujoco

  env = envs_lib.make(env_spec, render_mode="rgb_array", width=SIZE, height=SIZE)
  model = getattr(env.unwrapped, "model", None)
  if model is None:  # not a MuJoCo environment
    return env
  names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
  if "track" not in names:
    return env
  env.close()
  return envs_lib.make(
    env_spec, render_mode="rgb_array", width=SIZE, height=SIZE, camera_name="track"
  )


def write_video(frames: list[np.ndarray], gif_path: str, strip_path: str, fps: int = 30) -> None:
  """frames -> an animated GIF and a PNG of 6 evenly spaced frames side by side."""
  import imageio.v3 as iio

  iio.imwrite(gif_path, np.stack(frames), duration=1000 / fps, loop=0)
  picks = np.linspace(0, len(frames) - 1, min(6, len(frames))).astype(int)
  iio.imwrite(strip_path, np.concatenate([frames[k] for k in picks], axis=1))
