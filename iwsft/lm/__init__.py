"""Language pipeline: decoder-only transformers (a small byte-level model, or pretrained Llama /
Qwen2 checkpoints) fine-tuned with SFT and iw-SFT on curated samples (extra: lm)."""

from iwsft.errors import require_extra

require_extra("lm", "safetensors", "tokenizers", "gguf", "jinja2", "matplotlib", "scipy")
