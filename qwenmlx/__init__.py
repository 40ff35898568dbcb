"""qwenmlx: Qwen3 and Qwen3-MoE on MLX: chat, summarise, convert and quantize."""

from .checkpoint import load, load_model

__all__ = ["load", "load_model"]
