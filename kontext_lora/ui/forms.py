"""The Config page's form, generated from the typed schema (kontext_lora/config.py): one field per declared key.

A config file is shown resolved (its `extends:` bases merged); the form sends every field back and the fields
whose value differs from the file's become `key=value` overrides, checked by `load_config` exactly as on the
command line. Its error names the key (`config key `lora.rank`: ...`), which puts the message at that field.
Saving writes the file's own YAML (its `extends:` kept) with the overrides applied.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from kontext_lora.atomic import atomic_write_text
from kontext_lora.config import Config, ConfigError, describe_keys, load_config

_KEY_IN_ERROR = re.compile(r"`([A-Za-z_][\w.\[\]]*)`")


@dataclass
class Field:
    key: str  # dotted, e.g. lora.rank
    kind: str  # bool, int, float, str, list, dict
    default: Any
    doc: str
    choices: tuple[str, ...] | None
    value: str = ""  # as the form shows it
    error: str = ""

    @property
    def section(self) -> str:
        return self.key.split(".")[0]


def _choices(key: str) -> tuple[str, ...] | None:
    schema: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        schema = typing.get_type_hints(schema)[part]
    found = {f.name: f for f in dataclasses.fields(schema)}[parts[-1]]
    return found.metadata.get("choices")


def schema_fields() -> list[Field]:
    """Every top-level key of the schema (list items such as data.datasets[].path are edited within their list)."""
    fields = []
    for key, kind, default, doc in describe_keys():
        if "[]" in key:
            continue
        kind = kind.split("[")[0]
        fields.append(Field(key, kind, default, doc, _choices(key)))
    return fields


def item_docs() -> dict[str, list[tuple[str, str]]]:
    """For each list-of-sections key, the (key, doc) of its items' keys (shown beside its YAML text)."""
    docs: dict[str, list[tuple[str, str]]] = {}
    for key, _, _, doc in describe_keys():
        if "[]." in key:
            parent, child = key.split("[].", 1)
            docs.setdefault(parent, []).append((child, doc))
    return docs


def show(value: Any, kind: str) -> str:
    """A value as its form field holds it: YAML flow text for lists and dicts."""
    if kind in ("list", "dict"):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "???":
        return ""
    return str(value)


def file_values(path: Path) -> tuple[dict[str, Any], str]:
    """Every key's value in the config at `path` (bases merged, defaults filled), and the error loading it, if any.

    A file that does not load still shows: its own values over the defaults, so the error can be fixed here.
    """
    schema = OmegaConf.structured(Config)
    error = ""
    try:
        merged = OmegaConf.merge(schema, _read(path))
    except ConfigError as exc:
        return _flat(OmegaConf.to_container(schema)), str(exc)
    except Exception as exc:  # an ill-typed value: show the file over the defaults with the message
        error = str(load_error(path) or exc)
        raw = OmegaConf.to_container(_read(path)) if path.is_file() else {}
        return {**_flat(OmegaConf.to_container(schema)), **_flat(raw)}, error
    error = load_error(path)
    return _flat(OmegaConf.to_container(merged)), error


def load_error(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """load_config's one-line error for the file with these overrides ('' when it loads)."""
    for override in overrides:  # load_config hands values to YAML, which would raise its own multi-line error
        key, value = override.split("=", 1)
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as exc:
            return f"config key `{key}`: {value!r} is not valid YAML ({str(exc).splitlines()[0]})"
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        return str(exc)
    return ""


def _read(path: Path) -> DictConfig:
    from kontext_lora.config import _read_yaml  # the loader's own `extends:` resolution

    return _read_yaml(path)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    sections = {f.name for f in dataclasses.fields(Config)}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and (not prefix and key in sections):
            flat.update(_flat(value, full + "."))
        else:
            flat[full] = value
    return flat


def overrides_from_form(form: dict[str, str], values: dict[str, Any]) -> list[str]:
    """`key=value` for every schema field whose form text differs from the file's value."""
    overrides = []
    for f in schema_fields():
        if f.key not in form:
            if f.kind == "bool" and values.get(f.key) is True:  # an unchecked box is not sent
                overrides.append(f"{f.key}=false")
            continue
        text = form[f.key].strip()
        if f.kind == "bool":
            text = "true" if text in ("on", "true") else "false"
        if text != show(values.get(f.key, f.default), f.kind):
            if f.kind == "str" and (text == "" or _reparses(text)):
                text = yaml.safe_dump(text, default_style="'").strip()  # stays a string (e.g. '1e-4', 'on')
            overrides.append(f"{f.key}={text}")
    return overrides


def _reparses(text: str) -> bool:
    try:
        return not isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return True


def fields_for(values: dict[str, Any], form: dict[str, str] | None = None, error: str = "") -> tuple[list[Field], str]:
    """The form's fields filled from the file (or the submitted form); the error put at its key when it names one.

    Returns (fields, error left for the top of the page)."""
    fields = schema_fields()
    for f in fields:
        if form is not None and f.key in form:
            f.value = form[f.key]
        elif form is not None and f.kind == "bool":
            f.value = "false"
        else:
            f.value = show(values.get(f.key, f.default), f.kind)
    if not error:
        return fields, ""
    named = _KEY_IN_ERROR.search(error)
    if named:
        key = re.sub(r"\[\d*\].*$", "", named.group(1))  # data.datasets[0].path -> data.datasets
        for f in fields:
            if f.key == key or key.startswith(f.key + "."):
                f.error = error
                return fields, ""
    return fields, error


def save_yaml(source: Path, destination: Path, overrides: list[str]) -> str:
    """Write the file `source`'s own keys with `overrides` applied to `destination` (its `extends:` re-pointed from
    the new folder); returns the text written. `load_config` of the result equals load_config(source, overrides)."""
    node = OmegaConf.load(source) if source.is_file() else OmegaConf.create({})
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(node, key, yaml.safe_load(value) if value else "", merge=False)
    parent = node.get("extends")
    if parent is not None:
        base = (source.parent / str(parent)).resolve()
        node["extends"] = os.path.relpath(base, destination.parent.resolve())
    text = OmegaConf.to_yaml(node)
    if parent is not None:  # `extends:` first, as people write it
        lines = text.splitlines(keepends=True)
        first = [line for line in lines if line.startswith("extends:")]
        text = "".join(first + [line for line in lines if line not in first])
    atomic_write_text(destination, text)
    return text


def extends_chain(path: Path) -> list[Path]:
    """The file and its `extends:` bases, nearest first."""
    chain, current = [], path
    while current.is_file() and current not in chain:
        chain.append(current)
        try:
            parent = (yaml.safe_load(current.read_text()) or {}).get("extends")
        except (yaml.YAMLError, AttributeError):
            break
        if not parent:
            break
        current = (current.parent / str(parent)).resolve()
    return chain


_planner_lock = threading.Lock()  # one model count at a time: the first imports diffusers and builds it on meta


def warm_planner() -> None:
    """Import what the planner needs and count the default model once (run in the background at start)."""
    from kontext_lora.config import DataConfig, DatasetConfig
    from kontext_lora.planner import count_model

    with _planner_lock:
        count_model(Config(data=DataConfig(datasets=[DatasetConfig(path=".")])))


def plan_for(path: Path, overrides: list[str], vram: float) -> dict[str, Any]:
    """The planner's prediction for this config under a `vram` GiB budget: the chosen knobs and the top candidates."""
    from kontext_lora.planner import candidates, choose, fp8_matmuls_available

    cfg = load_config(path, overrides)
    with _planner_lock:
        preds = candidates(cfg, vram, fp8_matmuls=fp8_matmuls_available())
    try:
        chosen, error = choose(preds, vram), ""
    except ConfigError as exc:  # nothing fits: the message says what to lower
        chosen, error = None, str(exc)
    rows = sorted(preds, key=lambda p: (not p.fits(vram), p.s_per_step))[:8]
    return {
        "chosen": chosen,
        "error": error,
        "rows": [(p, p.fits(vram)) for p in rows],
        "shape": f"{cfg.data.resolution}², batch {cfg.train.batch_size}, rank {cfg.lora.rank}, {cfg.optim.optimizer}",
    }
