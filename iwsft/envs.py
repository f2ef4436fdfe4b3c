"""Gymnasium environments made one way: MuJoCo's warnings go through Python's `warnings`, so a
warning that a shipped model file raises (HalfCheetah's deprecated `settotalmass` under MuJoCo 4)
is said once per process instead of on every environment of every evaluation."""

from __future__ import annotations

import warnings

import gymnasium as gym


def _warn(message: str) -> None:
  warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


def route_mujoco_warnings() -> None:
  """MuJoCo's warnings as RuntimeWarnings from here on (unless a handler is already set)."""
  import mujoco

  if mujoco.get_mju_user_warning() is None:
    mujoco.set_mju_user_warning(_warn)


def make(env_id, **kwargs) -> gym.Env:
  """gym.make(env_id, **kwargs), MuJoCo's warnings routed (route_mujoco_warnings)."""
  route_mujoco_warnings()
  return gym.make(env_id, **kwargs)


def make_vec(env_id, num_envs: int) -> gym.vector.VectorEnv:
  """num_envs copies of env_id stepped in this process, MuJoCo's warnings routed."""
  route_mujoco_warnings()
  return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
