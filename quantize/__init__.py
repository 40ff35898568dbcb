"""Quantization recipes and the quantization of single weights, shared by `qwenmlx convert` and `qwenmlx quantize`."""

from .recipes import BUILTIN_RECIPES, QuantParams, Recipe, Rule, get_recipe, read_recipe_file, recipe_from_options
from .tensors import dequantize, quantize, quantized_shapes, squared_error

__all__ = [
    "BUILTIN_RECIPES", "QuantParams", "Recipe", "Rule", "get_recipe", "read_recipe_file", "recipe_from_options",
    "dequantize", "quantize", "quantized_shapes", "squared_error",
]
