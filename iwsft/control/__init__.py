"""Continuous-control pipeline: Gaussian policies on Minari offline datasets."""
