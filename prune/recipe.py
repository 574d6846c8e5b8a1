"""``prune.Recipe``: every option of a pruning run as one dataclass that saves, loads and validates.

A recipe holds what :func:`prune.apply` takes beyond the model and the store (method, sparsity,
pattern, sink settings, sequential and devices, targets and ignore, ...) and, in ``calibration``, how
``attnprobe prune`` records the store. It is the one place defaults live: ``prune.apply``'s keyword
defaults are read from :data:`DEFAULTS`, and the ``attnprobe prune`` flags are generated from the
fields (help text from each field's ``metadata``).

Adding an option is one field::

    owl_m: float = option(5.0, "OWL's outlier threshold M", check=_positive)

then the keyword of the same name in ``prune.apply`` with the default ``DEFAULTS.owl_m``. Validation
(type from the annotation, ``choices``, ``check``), YAML/JSON, the command-line flag and its
``--help`` follow from the field; ``tests/prune/test_recipe.py`` fails while the two disagree.

Files are YAML (``.yaml``/``.yml``) or JSON (``.json``); an unknown key or a bad value is refused
with an error that names it and lists the valid keys or values. Like llm-compressor's recipes, the
recipe is written beside what it produced: ``prune.save_masks`` stores it in the mask file's header
(through ``result.settings``) and ``prune.save_pretrained`` writes ``recipe.yaml`` into the checkpoint;
:meth:`Recipe.load` reads any of the three.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune.recipe_fields import Fields, RecipeError, option

__all__ = ["Calibration", "DEFAULTS", "Recipe", "RecipeError", "option"]

RECIPE_FILE = "recipe.yaml"


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1) (0.5 prunes half the weights)"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def _pattern(value: str) -> str | None:
    if value in ("structured", "blocks", "experts"):
        return None
    from prune.methods import masks as masks_mod

    n_m = value.split(":")
    sparsity = int(n_m[0]) / int(n_m[1]) if len(n_m) == 2 and all(p.isdigit() for p in n_m) else 0.5
    try:
        masks_mod.parse_pattern(value, sparsity if sparsity < 1 else 0.5)
    except (ValueError, TypeError, ZeroDivisionError) as err:
        valid = '"unstructured", "N:M" (e.g. "2:4"), "structured", "blocks" or "experts"'
        return f"{err} Valid patterns: {valid}"
    return None


def _allocation(value: Any) -> str | None:
    from prune.methods.allocation import ALLOCATIONS

    if isinstance(value, str) and value not in ALLOCATIONS:
        return f"must be one of {list(ALLOCATIONS)}, a {{name regex: sparsity}} mapping or a callable"
    return None


def _regex(value: str) -> str | None:
    import re

    try:
        re.compile(value)
    except re.error as err:
        return f"is not a regular expression ({err})"
    return None


@dataclass
class Calibration(Fields):
    """How ``attnprobe prune`` cuts the calibration data and records the store (``prune.apply`` ignores
    it: it is given the store)."""

    seq_len: int | None = option(
        None, "tokens per calibration window (default: the model's context, at most 2048)", check=_positive
    )
    windows: int = option(128, "calibration windows (fewer if the file is shorter)", check=_positive)
    steps: int = option(50, "forward-noising steps of the calibration trajectory", check=_positive)
    sample_interval: int = option(5, "record every N-th noise level", check=_positive)
    batch_size: int = option(8, "windows per recorded forward", check=_positive)
    seed: int = option(0, "seed of the masking draws")
    mask_token_id: int | None = option(None, "mask token id (default: from the config or tokenizer)")


@dataclass
class Recipe(Fields):
    """Everything :func:`prune.apply` takes beyond the model and the store (its keyword defaults are
    these), plus how the command line records the store.

    Example:
        >>> recipe = Recipe(method="wanda", sparsity=0.5, sink_aware=True)
        >>> Recipe.from_dict(recipe.to_dict()) == recipe
        True
        >>> Recipe.from_dict({"sparsty": 0.5})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        prune.recipe.RecipeError: unknown key(s) ['sparsty'] in recipe; valid keys of Recipe: [...]
    """

    method: str = option(
        "wanda",
        "scoring: magnitude, Wanda (2306.11695) or SparseGPT (2301.00774)",
        choices=("magnitude", "wanda", "sparsegpt"),
    )
    sparsity: float = option(0.5, "fraction of each selected linear's weights pruned", check=_fraction)
    pattern: str = option("unstructured", 'unstructured, N:M (e.g. "2:4") or structured', check=_pattern)
    sink_aware: bool = option(False, "down-weight sink tokens by w = 1 - s before scoring (2602.17664)")
    sequential: bool = option(
        False, "prune block by block on the outputs of the pruned blocks (block-wise engine)"
    )
    accumulate: str = option(
        "wanda",
        "activation norm: wanda (sqrt mean of sum x^2) or reference (sum of L2 norms)",
        choices=("wanda", "reference"),
    )
    sink_std: float | None = option(None, "sink rule threshold in stds (default: the store's)")
    sink_alpha: float | None = option(None, "sink rule sharpness (default: the store's)")
    sink_policy: str = option(
        "all", "down-weight all sinks, or only unstable ones", choices=("all", "unstable")
    )
    unstable_threshold: float = option(0.05, "sink-score variance over steps above which a sink is unstable")
    targets: str | None = option(None, "regex (full match) of linear names to prune", check=_regex)
    ignore: str | None = option(None, "regex (full match) of linear names to leave dense", check=_regex)
    blocksize: int = option(128, "SparseGPT's column block size", check=_positive)
    percdamp: float = option(0.01, "SparseGPT's Hessian damping (fraction of the mean diagonal)")
    structured_mode: str = option(
        "uniform", "structured: same ratio per layer, or one global ranking", choices=("uniform", "global")
    )
    score: str | None = option(
        None,
        "how whole units are scored: blocks bi (default) or bi-clean; experts reap (default), frequency or "
        "norm; structured wanda-sp (default) or flap",
        choices=("bi", "bi-clean", "reap", "frequency", "norm", "wanda-sp", "flap"),
    )
    bias_compensation: bool = option(False, "structured: add the removed channels' mean output to the bias")
    iterative: bool = option(False, "blocks: remove one block at a time and re-measure")
    keep_ends: bool = option(True, "blocks: never remove the first or the last block")
    allow_other_weights: bool = option(False, "accept a store recorded from another checkpoint")
    device: str | None = option(
        None, "with sequential: the device each block visits (e.g. cuda:0); the model stays on the host"
    )
    offload_device: str = option(
        "cpu", "where block inputs and rollback copies wait (sequential); 'disk' keeps block inputs on disk"
    )
    cache_dir: str | None = option(
        None, "with offload_device='disk': the directory for the block-input files (default: a temp dir)"
    )
    strict: bool = option(False, "fail instead of warning when a weight-bearing parameter stays dense")
    allocation: str | dict[str, float] | Callable = option(
        "uniform",
        "how the budget is spread over the layers: uniform, owl, sensitivity, or JSON {name regex: sparsity}",
        check=_allocation,
    )
    owl_m: float = option(5.0, "OWL: an outlier's metric exceeds M times its layer's mean", check=_positive)
    owl_lambda: float = option(0.08, "OWL: layer sparsities stay within target +- lambda", check=_fraction)
    sensitivity_range: float = option(
        0.1, "sensitivity: candidate sparsities within target +- this", check=_fraction
    )
    refine: bool = option(False, "swap pruned and kept weights that lower each row's error (SparseSwaps)")
    refine_iterations: int = option(30, "refinement: swap rounds per row at most", check=_positive)
    refine_candidates: int = option(
        16, "refinement: candidates searched on each side per round", check=_positive
    )
    refine_seconds: float | None = option(None, "refinement: time bound per linear", check=_positive)
    layer_error: bool | None = option(
        None, "report each linear's relative error: None where the Gram matrix is at hand, True always"
    )
    calibration: Calibration = option(
        help="how attnprobe prune records the store (prune.apply ignores it)",
        cli=False,
        default_factory=Calibration,
    )

    def __post_init__(self) -> None:
        if self.calibration is None:
            self.calibration = Calibration()
        for name in ("device", "offload_device"):  # torch.device objects are written as their string
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and type(value).__name__ == "device":
                setattr(self, name, str(value))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if ":" in self.pattern:  # N:M fixes the sparsity
            from prune.methods import masks as masks_mod

            try:
                masks_mod.parse_pattern(self.pattern, self.sparsity)
            except ValueError as err:
                raise RecipeError(
                    f"Recipe.pattern={self.pattern!r} with sparsity={self.sparsity}: {err}"
                ) from None

    @classmethod
    def apply_keys(cls) -> list[str]:
        """The fields that are ``prune.apply`` keywords (all but ``calibration``)."""
        return [k for k in cls.keys() if k != "calibration"]

    def apply_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prune.apply`` (``sparsity`` included)."""
        return {k: getattr(self, k) for k in self.apply_keys()}

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``.yaml``/``.yml``) or JSON (any other suffix, e.g. ``.json``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = "# attnprobe pruning recipe (prune.Recipe); run it with attnprobe prune --recipe\n"
            text += yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file (YAML or JSON), a mask file of ``prune.save_masks`` or a checkpoint of
        ``prune.save_pretrained`` (its ``recipe.yaml``)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no recipe at {path}; write one with Recipe(...).save(path)")
        if path.suffix == ".safetensors":
            from prune.export.mask_files import read_masks

            settings = read_masks(path)[2].get("settings", {})
            if "recipe" not in settings:
                raise RecipeError(f"{path} holds masks saved without a recipe (settings={settings})")
            return cls.from_dict(settings["recipe"], str(path))
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's parse errors
            raise RecipeError(f"cannot parse {path}: {err}") from None
        except Exception as err:  # yaml.YAMLError is not a ValueError
            raise RecipeError(f"cannot parse {path}: {err}") from None
        return cls.from_dict(data if data is not None else {}, str(path))


DEFAULTS = Recipe()
"""The default recipe: ``prune.apply``'s keyword defaults are read from it."""


def recipe_arguments(recipe: Recipe, passed: Mapping[str, Any]) -> dict[str, Any]:
    """``prune.apply``'s arguments for ``apply(model, store, recipe, **passed)``.

    Options come from the recipe alone: a recipe option also passed as a keyword is refused (which one
    should win is ambiguous); other keywords (``progress``) pass through.
    """
    both = sorted(set(passed) & set(Recipe.apply_keys()))
    if both:
        raise TypeError(
            f"prune.apply got a Recipe and the recipe option(s) {both} as keywords; put them in the recipe: "
            f"recipe.replace({both[0]}=...)."
        )
    return {**recipe.apply_kwargs(), **passed}


def records_recipe(apply: Callable) -> Callable:
    """Let ``apply(model, store, recipe)`` take a :class:`Recipe`, and attach the recipe of every run
    (also the keyword form) to the result: ``result.recipe`` and ``result.settings["recipe"]``, which
    ``save_masks`` and ``save_pretrained`` write."""
    import functools
    import inspect

    signature = inspect.signature(apply)

    @functools.wraps(apply)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        recipe = bound.arguments.get("sparsity")
        if isinstance(recipe, Recipe):
            passed = {k: v for k, v in bound.arguments.items() if k not in ("model", "store", "sparsity")}
            passed = {**passed.pop("kwargs", {}), **passed}  # an apply that takes **kwargs
            result = apply(
                bound.arguments["model"], bound.arguments["store"], **recipe_arguments(recipe, passed)
            )
        else:
            result = apply(*args, **kwargs)
            bound.apply_defaults()  # the keyword form: the options apply ran with, defaults filled in
            values = {k: bound.arguments[k] for k in Recipe.apply_keys() if k in bound.arguments}
            try:
                recipe = Recipe(**values)
            except RecipeError:  # a value apply accepts but a file cannot hold: no recipe to write
                recipe = None
        result.recipe = recipe
        if recipe is not None:
            result.settings["recipe"] = recipe.to_dict(strict=False)
        return result

    return wrapper
