"""The sweep file: which dotted config keys vary, how (grid / random / explicit runs), and each run's name.

A sweep file is YAML with exactly one of `grid`, `random` or `runs`, plus optional `name`, `dir` and `fixed`::

    name: rank_lr                 # default: the file's stem; also the wandb group of the runs
    dir: runs/sweeps/rank_lr      # default: runs/sweeps/<name>; each run writes <dir>/<run name>/
    fixed: {train.steps: 300}     # overrides applied to every run (not part of run names)
    grid:                         # cartesian product, last key varying fastest
      lora.rank: [4, 8]
      train.lr: [1.0e-4, 1.0e-3]

    random:                       # instead of grid: `samples` draws, reproducible from `seed`
      samples: 8
      seed: 0
      parameters:
        lora.rank: [4, 8, 16]                     # a list: uniform choice
        train.lr: {min: 1.0e-5, max: 1.0e-3}      # a range: log-uniform for *lr keys, else uniform
        train.steps: {min: 100, max: 400}         # integer ends: an integer; `log: true|false` to choose

    runs:                         # instead of grid: explicit override sets, optionally named
      - {lora.rank: 4}
      - {name: big, lora.rank: 32, train.lr: 5.0e-5}
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import random
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kontext_lora.config import ConfigError, describe_keys

METHODS = ("grid", "random", "runs")
_TOP_KEYS = ("name", "dir", "fixed", *METHODS)
_RANDOM_KEYS = ("samples", "seed", "parameters")
_RANGE_KEYS = ("min", "max", "log")
SIGNIFICANT_DIGITS = 3  # random floats are rounded so run names show the exact value trained with


@dataclass
class Run:
    """One run of a sweep: its folder name and the swept keys' values (dotted key -> value)."""

    name: str
    overrides: dict[str, Any]

    def dotlist(self) -> list[str]:
        """The overrides as `key=value` strings that `load_config` reads back to the same values."""
        return [f"{key}={dotlist_value(value)}" for key, value in self.overrides.items()]


@dataclass
class Sweep:
    """A parsed sweep file: the runs in order, plus what the wandb export needs to describe them."""

    name: str
    dir: Path
    method: str  # grid | random | runs
    runs: list[Run]
    keys: list[str]  # the swept keys, in file order: the summary's override columns
    fixed: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # grid lists or random specs (not for `runs`)
    samples: int = 0
    seed: int = 0
    source: Path | None = None

    def fixed_dotlist(self) -> list[str]:
        return [f"{key}={dotlist_value(value)}" for key, value in self.fixed.items()]


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Read and check a sweep file; `out_dir` replaces its `dir`. Fails with a ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        node = OmegaConf.load(path)  # OmegaConf's YAML reads 1e-3 as a float (plain PyYAML keeps a string)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping with one of {', '.join(METHODS)}")
    raw: dict = OmegaConf.to_container(node, resolve=False)  # type: ignore[assignment]
    _check_names(raw, _TOP_KEYS, f"{path}")
    methods = [m for m in METHODS if m in raw]
    if len(methods) != 1:
        raise ConfigError(f"{path}: give exactly one of {', '.join(METHODS)} (found {', '.join(methods) or 'none'})")
    method = methods[0]
    name = _safe(str(raw.get("name") or path.stem)) or "sweep"
    fixed = _overrides(raw.get("fixed") or {}, f"{path}: fixed")
    sweep = Sweep(
        name=name, dir=Path(out_dir or raw.get("dir") or Path("runs") / "sweeps" / name), method=method,
        runs=[], keys=[], fixed=fixed, source=path,
    )  # fmt: skip
    where = f"{path}: {method}"
    names: list[str | None] = []  # `runs` entries may name themselves; other runs are named from their values
    if method == "grid":
        grid = _overrides(raw["grid"], where)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: `{key}` needs a non-empty list of values, got {values!r}")
        sweep.parameters, sweep.keys = grid, list(grid)
        combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    elif method == "random":
        spec = raw["random"]
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with samples, seed, parameters")
        _check_names(spec, _RANDOM_KEYS, where)
        samples, seed = spec.get("samples"), spec.get("seed", 0)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
            raise ConfigError(f"{where}: `samples` must be a positive integer, got {samples!r}")
        parameters = _overrides(spec.get("parameters") or {}, f"{where}: parameters")
        if not parameters:
            raise ConfigError(f"{where}: `parameters` lists no key to sample")
        for key, choice in parameters.items():
            _check_distribution(key, choice, f"{where}: parameters")
        sweep.parameters, sweep.keys, sweep.samples, sweep.seed = parameters, list(parameters), samples, int(seed)
        combos = sample_random(parameters, samples, int(seed))
    else:
        entries = raw["runs"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: expected a non-empty list of override mappings")
        combos = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}[{i}]: expected a mapping of dotted keys to values, got {entry!r}")
            entry = dict(entry)
            names.append(entry.pop("name", None))
            combos.append(_overrides(entry, f"{where}[{i}]"))
        sweep.keys = list(dict.fromkeys(key for combo in combos for key in combo))
    if "output.dir" in (*sweep.keys, *fixed):
        raise ConfigError(f"{path}: `output.dir` is set by the sweep (<dir>/<run name>); set the sweep's `dir` instead")
    sweep.runs = _named(combos, sweep.keys, names)
    return sweep


def sample_random(parameters: dict[str, Any], samples: int, seed: int) -> list[dict[str, Any]]:
    """`samples` override sets drawn with random.Random(seed); identical draws are kept once."""
    rng = random.Random(seed)
    draws: list[dict[str, Any]] = []
    for _ in range(samples):
        draw = {key: _draw(rng, key, choice) for key, choice in parameters.items()}
        if draw not in draws:
            draws.append(draw)
    return draws


def is_log_range(key: str, choice: dict) -> bool:
    """Ranges of learning rates (keys ending in `lr`) are log-uniform unless `log:` says otherwise."""
    return bool(choice.get("log", key.rsplit(".", 1)[-1].endswith("lr")))


def is_int_range(choice: dict) -> bool:
    return all(isinstance(choice[end], int) and not isinstance(choice[end], bool) for end in ("min", "max"))


def _draw(rng: random.Random, key: str, choice: Any) -> Any:
    if isinstance(choice, list):
        return choice[rng.randrange(len(choice))]
    low, high = choice["min"], choice["max"]
    if is_log_range(key, choice):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if is_int_range(choice):
        return min(high, max(low, round(value)))
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _check_distribution(key: str, choice: Any, where: str) -> None:
    if isinstance(choice, list):
        if not choice:
            raise ConfigError(f"{where}: `{key}` has an empty list of values")
        return
    if not isinstance(choice, dict) or not {"min", "max"} <= set(choice):
        raise ConfigError(f"{where}: `{key}` needs a list of values or a range {{min: .., max: ..}}, got {choice!r}")
    _check_names(choice, _RANGE_KEYS, f"{where}: {key}")
    low, high = choice["min"], choice["max"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise ConfigError(f"{where}: `{key}` range needs numbers min < max, got min={low!r} max={high!r}")
    if is_log_range(key, choice) and low <= 0:
        raise ConfigError(f"{where}: `{key}` is sampled log-uniformly, so min must be > 0 (got {low!r}; or log: false)")


# ------------------------------------------------------------------------------------------------- keys


def _valid_keys() -> tuple[set[str], set[str]]:
    """Every declared dotted key, and those holding lists (whose items may be addressed as key.0.field)."""
    rows = describe_keys()
    keys = {key for key, *_ in rows if "[]" not in key}
    lists = {key.split("[]")[0] for key, *_ in rows if "[]" in key}
    return keys, lists


def _overrides(mapping: Any, where: str) -> dict[str, Any]:
    """Dotted config keys -> values, each key declared in the schema (else an error with the near miss).

    Nested sections are accepted too and flattened: {train: {lr: [..]}} is {train.lr: [..]}.
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys, got {mapping!r}")
    keys, lists = _valid_keys()
    flat = _flatten(mapping, keys, lists)
    for key in flat:
        if key in keys or any(key.startswith(f"{lst}.") for lst in lists):
            continue
        near = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        raise ConfigError(f"{where}: unknown config key `{key}`{hint} (`kontext-lora keys` lists them all)")
    return flat


def _flatten(mapping: dict, keys: set[str], lists: set[str], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        declared = full in keys or any(full.startswith(f"{lst}.") for lst in lists)
        if isinstance(value, dict) and not declared and any(k.startswith(f"{full}.") for k in keys):
            flat.update(_flatten(value, keys, lists, f"{full}."))  # a section such as `train:`
        else:
            flat[full] = value
    return flat


def _check_names(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown entry `{key}` (allowed here: {', '.join(allowed)})")


# ------------------------------------------------------------------------------------------------ names


def run_name(overrides: dict[str, Any], keys: list[str], scientific: Collection[str] = ()) -> str:
    """A readable, filesystem-safe folder name: {lora.rank: 4, train.lr: 1e-3} -> `rank4_lr1e-3`.

    Each key is shortened to its last part unless two swept keys share it; numbers follow the key directly,
    other values after a dash (`preset-attention`). Floats of the keys in `scientific` are all written with an
    exponent (`1e-2`, not `0.01`). Very long names are cut and end in a hash of the full one.
    """
    last_parts = [key.rsplit(".", 1)[-1] for key in keys]
    short = {key: part if last_parts.count(part) == 1 else key for key, part in zip(keys, last_parts, strict=True)}
    parts = []
    for key, value in overrides.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        parts.append(f"{short.get(key, key)}{'' if number else '-'}{_format_value(value, key in scientific)}")
    name = _safe("_".join(parts)) or "base"
    if len(name) > 100:
        name = f"{name[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _named(combos: list[dict[str, Any]], keys: list[str], names: list[str | None]) -> list[Run]:
    """Runs with unique names: a repeated name gets -2, -3, ...

    A key whose values need an exponent anywhere in the sweep gets one in every run's name (`lr1e-3`, `lr1e-2`), so
    the names of one sweep read and sort alike.
    """
    scientific = {key for combo in combos for key, value in combo.items() if _needs_exponent(value)}
    runs, seen = [], set()
    for i, combo in enumerate(combos):
        given = names[i] if i < len(names) else None
        base = _safe(str(given)) if given else run_name(combo, keys, scientific)
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        runs.append(Run(name, combo))
    return runs


def _needs_exponent(value: Any) -> bool:
    return isinstance(value, float) and value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)


def _format_value(value: Any, scientific: bool = False) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (scientific or _needs_exponent(value)):  # 0.001 -> 1e-3, 3e-05 -> 3e-5
            mantissa, exponent = f"{value:.6e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(item, scientific) for item in value)
    if isinstance(value, dict):
        return "-".join(f"{k}-{_format_value(v, scientific)}" for k, v in value.items())
    return str(value)


def _safe(text: str) -> str:
    """Letters, digits and . _ + - only (other runs of characters become one dash)."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._+-]+", "-", text)).strip("-.")


# ---------------------------------------------------------------------------------------------- dotlist


def dotlist_value(value: Any) -> str:
    """`value` written so that OmegaConf's `key=value` parsing gives it back unchanged (type included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _parses_back(value, value):
            return value
        return "'" + value.replace("'", "''") + "'"  # e.g. the string "1e-3", which would read back as a float
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("\n...").strip()


def _parses_back(text: str, value: Any) -> bool:
    try:
        parsed = OmegaConf.from_dotlist([f"k={text}"])._get_node("k")._value()  # raw: ${..} stays unresolved
    except OmegaConfBaseException:
        return False
    return parsed == value and type(parsed) is type(value)
