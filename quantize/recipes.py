"""Quantization recipes: which modules of a Qwen3 model get how many bits.

A recipe is an ordered list of rules plus a default. The first rule whose pattern (a regular
expression searched in the module path, e.g. `model.layers.3.mlp.switch_mlp.down_proj`) matches
decides; a rule either gives (bits, group_size, mode) or keeps the module unquantized.

The MoE router (`mlp.gate`) is guarded in every recipe: when no rule names it, it gets 8 bits,
and a rule that gives it fewer is an error. Its logits pick the experts, so rounding them
changes which experts run (mlx-lm's mixed recipes drop it to 4 bits and lose a lot of KL).
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from qwenmlx.errors import QwenMLXError

BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# MLX's float modes fix bits and group size: microscaling blocks of 32 with a shared exponent.
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32)}
DEFAULT_GROUP_SIZE = 64
ROUTER_PATTERN = r"\.mlp\.gate$"


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int
    mode: str = "affine"

    def __post_init__(self):
        if self.mode in FLOAT_MODES:
            if (self.bits, self.group_size) != FLOAT_MODES[self.mode]:
                bits, group_size = FLOAT_MODES[self.mode]
                raise QwenMLXError(f"mode {self.mode} takes bits {bits} and group_size {group_size}, "
                                   f"got bits {self.bits}, group_size {self.group_size}")
        elif self.mode == "affine":
            if self.bits not in BITS:
                raise QwenMLXError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
            if self.group_size not in AFFINE_GROUP_SIZES:
                raise QwenMLXError(f"group_size must be one of {', '.join(map(str, AFFINE_GROUP_SIZES))}, "
                                   f"got {self.group_size!r}")
        else:
            raise QwenMLXError(f"unknown mode {self.mode!r} (affine, {', '.join(FLOAT_MODES)})")

    def as_config(self) -> dict:
        """The entry mlx-lm writes in config.json's quantization section."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


ROUTER_PARAMS = QuantParams(8, 64)


@dataclass(frozen=True)
class Rule:
    pattern: str
    params: QuantParams | None  # None: keep the module unquantized
    # Which layers the rule applies to: all (None), listed indices, or "sensitive": the first and
    # last eighth and every third layer in between (llama.cpp's Q4_K_M choice, as mlx-lm uses it).
    layers: None | str | tuple[int, ...] = None

    def matches(self, module_path: str, num_layers: int) -> bool:
        if not re.search(self.pattern, module_path):
            return False
        if self.layers is None:
            return True
        layer = re.search(r"layers\.(\d+)\.", module_path)
        if layer is None:
            return False
        index = int(layer.group(1))
        if self.layers == "sensitive":
            eighth = num_layers // 8
            return index < eighth or index >= 7 * num_layers // 8 or (index - eighth) % 3 == 2
        return index in self.layers


@dataclass(frozen=True)
class Recipe:
    name: str
    default: QuantParams | None  # None: modules no rule names stay unquantized
    rules: tuple[Rule, ...] = ()
    description: str = ""

    def params_for(self, module_path: str, num_layers: int) -> QuantParams | None:
        """The quantization of one module (None: unquantized); the router never drops below 8 bits."""
        is_router = re.search(ROUTER_PATTERN, module_path) is not None
        for rule in self.rules:
            if rule.matches(module_path, num_layers):
                if is_router and rule.params is not None and (rule.params.mode != "affine" or rule.params.bits < 8):
                    raise QwenMLXError(f"recipe {self.name}: the MoE router {module_path} must stay at 8 bits "
                                       f"(affine) or unquantized, the rule {rule.pattern!r} gives it "
                                       f"{rule.params.bits}-bit {rule.params.mode}")
                return rule.params
        if is_router and self.default is not None:
            return ROUTER_PARAMS
        return self.default

    def check_layers(self, num_layers: int) -> None:
        """Every layer a rule names is one of the model's (a rule for a layer it lacks would quietly do nothing)."""
        for rule in self.rules:
            missing = [i for i in rule.layers if i >= num_layers] if isinstance(rule.layers, tuple) else []
            if missing:
                raise QwenMLXError(f"recipe {self.name}: the rule {rule.pattern!r} names layer {missing[0]}, but the "
                                   f"model has {num_layers} layers (0 to {num_layers - 1})")


def _uniform(bits: int):
    def build(group_size: int) -> Recipe:
        return Recipe(f"q{bits}", QuantParams(bits, group_size),
                      description=f"every linear layer and the embeddings at {bits} bits; router at 8")
    return build


def _experts(bits: int):
    def build(group_size: int) -> Recipe:
        return Recipe(
            f"experts-{bits}", QuantParams(8, group_size),
            rules=(
                Rule(ROUTER_PATTERN, None),
                Rule(r"mlp\.(gate|up|down)_proj$", QuantParams(bits, group_size)),
            ),
            description=f"experts (and dense MLPs) at {bits} bits; attention, embeddings, lm_head at 8; "
                        "router unquantized",
        )
    return build


def _mixed_4_6(group_size: int) -> Recipe:
    return Recipe(
        "mixed-4-6", QuantParams(4, group_size),
        rules=(
            Rule(r"\.(v_proj|down_proj)$", QuantParams(6, group_size), layers="sensitive"),
            Rule(r"^lm_head$", QuantParams(6, group_size)),
        ),
        description="4 bits; v_proj and down_proj at 6 in the first and last eighth of the layers and "
                    "every third between; lm_head at 6; router at 8",
    )


def _float_mode(mode: str):
    def build(group_size: int) -> Recipe:
        bits, mode_group_size = FLOAT_MODES[mode]
        if group_size not in (DEFAULT_GROUP_SIZE, mode_group_size):
            raise QwenMLXError(f"recipe {mode} has a fixed group size of {mode_group_size}")
        return Recipe(mode, QuantParams(bits, mode_group_size, mode),
                      description=f"MLX's {mode} float format everywhere; router at 8 bits affine")
    return build


BUILTIN_RECIPES = {
    "q4": _uniform(4), "q6": _uniform(6), "q8": _uniform(8),
    "experts-4": _experts(4), "experts-6": _experts(6),
    "mixed-4-6": _mixed_4_6,
    "mxfp4": _float_mode("mxfp4"), "mxfp8": _float_mode("mxfp8"),
}

_PARAM_KEYS = {"bits", "group_size", "mode"}
_RULE_KEYS = {"pattern", "keep", "layers"} | _PARAM_KEYS


def get_recipe(name_or_file: str, group_size: int = DEFAULT_GROUP_SIZE) -> Recipe:
    """A built-in recipe by name, or a user's TOML recipe file."""
    if name_or_file in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name_or_file](group_size)
    path = Path(name_or_file)
    if path.suffix == ".toml" or path.is_file():
        return read_recipe_file(path)
    raise QwenMLXError(f"unknown recipe {name_or_file!r}: use one of {', '.join(BUILTIN_RECIPES)} "
                       "or a .toml recipe file")


def read_recipe_file(path: Path) -> Recipe:
    """A TOML recipe: an optional [default] table and [[rules]] (pattern, bits/group_size/mode or keep, layers)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise QwenMLXError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a recipe is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise QwenMLXError(f"{path}: not valid TOML ({e})") from None
    try:
        _check_keys(raw, {"description", "default", "rules"}, "top level")
        default = _params(raw["default"], "[default]") if "default" in raw else None
        if not isinstance(raw.get("rules", []), list):
            raise QwenMLXError("rules must be an array of tables ([[rules]])")
        rules = tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(raw.get("rules", [])))
    except QwenMLXError as e:
        raise QwenMLXError(f"{path}: {e}") from None
    return Recipe(path.stem, default, rules, description=str(raw.get("description", "")))


def _check_keys(table, allowed: set, where: str) -> None:
    if not isinstance(table, dict):
        raise QwenMLXError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise QwenMLXError(f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")


def _params(table: dict, where: str) -> QuantParams:
    _check_keys(table, _PARAM_KEYS, where)
    if "bits" not in table:
        raise QwenMLXError(f"{where} needs bits")
    mode = table.get("mode", "affine")
    group_size = table.get("group_size", FLOAT_MODES[mode][1] if mode in FLOAT_MODES else DEFAULT_GROUP_SIZE)
    try:
        return QuantParams(table["bits"], group_size, mode)
    except QwenMLXError as e:
        raise QwenMLXError(f"{where}: {e}") from None


def _rule(table: dict, where: str) -> Rule:
    _check_keys(table, _RULE_KEYS, where)
    if not isinstance(table.get("pattern"), str):
        raise QwenMLXError(f"{where} needs a pattern (a regular expression over module paths)")
    try:
        re.compile(table["pattern"])
    except re.error as e:
        raise QwenMLXError(f"{where}: bad pattern {table['pattern']!r} ({e})") from None
    layers = table.get("layers")
    if layers is not None and layers != "sensitive":
        if not (isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)):
            raise QwenMLXError(f"{where}: layers must be \"sensitive\" or a list of layer indices (0, 1, ...)")
        layers = tuple(layers)
    if table.get("keep"):
        if _PARAM_KEYS & set(table):
            raise QwenMLXError(f"{where}: keep = true takes no bits/group_size/mode")
        return Rule(table["pattern"], None, layers)
    return Rule(table["pattern"], _params({k: v for k, v in table.items() if k in _PARAM_KEYS}, where), layers)


def recipe_from_options(recipe: str | None, bits: int | None, group_size: int) -> Recipe | None:
    """The CLI's --recipe / --bits / --group-size: a recipe, `--bits N` for qN, or neither for no quantization."""
    if recipe is not None and bits is not None:
        raise QwenMLXError("give --recipe or --bits, not both (--bits N is the recipe qN)")
    if bits is not None:
        if f"q{bits}" not in BUILTIN_RECIPES:
            raise QwenMLXError(f"--bits must be 4, 6 or 8 (or pick a --recipe), got {bits}")
        recipe = f"q{bits}"
    return get_recipe(recipe, group_size) if recipe is not None else None
