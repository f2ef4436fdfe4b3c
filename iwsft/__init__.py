"""iwsft: importance-weighted supervised fine-tuning (Qin & Springenberg, 2025) in JAX/Flax."""

__version__ = "0.1.0"
