"""LoRA key formats: read diffusers/PEFT, ai-toolkit, kohya, ComfyUI and fal files; write diffusers, kohya, ComfyUI.

Every file is read into one `Adapter` (diffusers module path -> lora_A, lora_B, alpha) and written from it.

Written layouts (all proven by `FluxKontextPipeline.load_lora_weights` in tests/export):
- diffusers: `transformer.<module>.lora_A.weight / lora_B.weight`, alpha in the `lora_adapter_metadata` entry.
- kohya: `lora_unet_<bfl_name_with_underscores>.lora_down.weight / lora_up.weight / alpha`.
- ComfyUI: `diffusion_model.<bfl_name>.lora_down.weight / lora_up.weight / alpha`. These are the names ComfyUI's own
  LoRA writer uses (`LoraSave`); ComfyUI reads `lora_A/lora_B` there too, but diffusers' Flux loader does not (it
  loads nothing from such a file, with no error), so we write the names both loaders read. Import takes both.
BFL fuses q/k/v into `img_attn.qkv` / `txt_attn.qkv` and single-block q/k/v/proj_mlp into `linear1`: the fused
lora_down stacks the parts' lora_A (rank n*r), the fused lora_up is block-diagonal, and alpha is n*r * (alpha/r) so
the update scale is unchanged. diffusers' reader recognises that block structure and splits it back exactly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kontext_lora.errors import UserError
from kontext_lora.export import names
from kontext_lora.export.diffusers_format import (
    KONTEXT_LORA_METADATA_KEY,
    LORA_ADAPTER_METADATA_KEY,
    PREFIX,
    WEIGHT_NAME,
    atomic_save_safetensors,
    read_lora_file,
    save_diffusers_lora,
)

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("diffusers", "kohya", "comfyui")
IMPORT_FORMATS = ("diffusers", "kohya", "comfyui", "fal")


class FormatError(UserError, ValueError):
    """A LoRA file that cannot be read, or an adapter a format cannot hold; the message says which and why."""


@dataclass
class ModuleLora:
    """One adapted linear: delta W = (alpha / rank) * up @ down.

    `down`: lora_A / lora_down, (rank, in_features). `up`: lora_B / lora_up, (out_features, rank).
    `extras`: other tensors of the module by PEFT key suffix: `lora_magnitude_vector` (DoRA, (out_features,)),
    `lora_B.bias` ((out_features,)).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update (out_features, in_features), in float32."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class Adapter:
    """A transformer LoRA in diffusers module names, whatever file it came from.

    `other`: tensors of adapter kinds that have no lora_A/lora_B (LoHa `hada_*`, LoKr `lokr_*`), by PEFT key; only
    the diffusers format carries them. `config`: the PEFT config dict the file was saved with (diffusers files),
    reused when writing diffusers again. `info`: our own `kontext_lora` metadata.
    """

    modules: dict[str, ModuleLora]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    source_format: str = "diffusers"


# ----------------------------------------------------------------------------------------------- reading


_DIFFUSERS_KIND = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight"
    r"|lora_magnitude_vector(?:\.weight)?|alpha)$"
)
_OTHER_ADAPTER = re.compile(r"\.(hada_|lokr_)")
_BFL_KIND = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$"
)
_DOWN, _UP = ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.", "time_in.", "vector_in.",
              "guidance_in.")  # fmt: skip


def read_adapter(path: str | Path) -> Adapter:
    """Read a LoRA safetensors file in any supported format."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        tensors, metadata = read_lora_file(path)
    except Exception as exc:  # safetensors' own error types vary between versions
        raise FormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        return from_any(tensors, metadata)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None


def detect_format(keys: Iterable[str]) -> str:
    """Which trainer's layout the keys are in: one of IMPORT_FORMATS."""
    keys = list(keys)
    if not keys:
        raise FormatError("the file holds no tensors")
    text = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text:
        raise FormatError(
            f"{len(text)} text-encoder LoRA tensors (e.g. `{text[0]}`): only transformer LoRAs are supported"
        )

    def every(prefix: str) -> bool:
        return all(k.startswith(prefix) for k in keys)

    if every(names.KOHYA_PREFIX):
        return "kohya"
    if every(names.COMFYUI_PREFIX):
        return "comfyui"
    if every("base_model.model."):  # fal's Kontext trainer (BFL names) or a PEFT `save_pretrained` (diffusers names)
        return "fal" if keys[0].removeprefix("base_model.model.").startswith(_BFL_ROOTS) else "diffusers"
    if every(PREFIX):
        return "diffusers"
    if all(k.startswith(_BFL_ROOTS) for k in keys):
        return "comfyui"  # bare BFL names: ComfyUI reads these too
    if all(_DIFFUSERS_KIND.match(k) or _OTHER_ADAPTER.search(k) for k in keys):
        return "diffusers"  # bare PEFT names (`get_peft_model_state_dict` saved as is)
    raise FormatError(f"unrecognised LoRA layout (first keys: {', '.join(sorted(keys)[:3])})")


def from_any(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Adapter:
    """Read tensors in any supported layout (see `detect_format`) into an Adapter."""
    metadata = dict(metadata or {})
    fmt = detect_format(tensors)
    if fmt == "diffusers":
        return from_diffusers(tensors, metadata)
    adapter = {"kohya": from_kohya, "comfyui": from_comfyui, "fal": from_fal}[fmt](tensors)
    adapter.info = _json_entry(metadata, KONTEXT_LORA_METADATA_KEY)
    return adapter


def from_diffusers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Adapter:
    """Read diffusers/PEFT keys (`transformer.<module>.lora_A.weight`, ai-toolkit's files too) into an Adapter.

    Alpha per module: the `lora_adapter_metadata` config (alpha_pattern, then lora_alpha), else a `<module>.alpha`
    tensor, else the rank (what diffusers assumes for a file without alphas: scale 1).
    """
    metadata = dict(metadata or {})
    config = _adapter_config(metadata)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        bare = key.removeprefix(PREFIX).removeprefix("base_model.model.")
        if _OTHER_ADAPTER.search(bare):
            other[bare] = value
            continue
        match = _DIFFUSERS_KIND.match(bare)
        if not match:
            raise FormatError(f"unexpected key `{key}` (expected `<module>.lora_A.weight` / `.lora_B.weight`)")
        kind = match["kind"].removesuffix(".weight") if match["kind"].startswith("lora_magnitude") else match["kind"]
        grouped.setdefault(match["module"], {})[kind] = value
    modules = {}
    for module, parts in grouped.items():
        try:
            names.to_bfl(module)  # every FLUX transformer linear has a BFL name: this rejects other models' LoRAs
        except names.UnknownModuleError as exc:
            raise FormatError(str(exc)) from None
        down = next((parts.pop(k) for k in _DOWN if k in parts), None)
        up = next((parts.pop(k) for k in _UP if k in parts), None)
        if down is None or up is None:
            raise FormatError(f"`{module}` has {sorted(parts)} but lacks lora_A or lora_B")
        _check_pair(module, down, up)
        stored_alpha = parts.pop("alpha", None)
        rank = int(down.shape[0])
        if config is not None:
            alpha = _config_alpha(config, module, rank)
        elif stored_alpha is not None:
            alpha = float(stored_alpha)
        else:
            alpha = float(rank)
        modules[module] = ModuleLora(down, up, alpha, extras=parts)
    return Adapter(
        modules,
        other=other,
        config=config,
        info=_json_entry(metadata, KONTEXT_LORA_METADATA_KEY),
        source_format="diffusers",
    )


def from_kohya(tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """Read kohya sd-scripts keys (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`)."""
    loras: dict[str, dict[str, torch.Tensor]] = {}
    unhandled = []
    for key, value in tensors.items():
        module, _, kind = key.partition(".")
        slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
        if slot is None:
            unhandled.append(key)
            continue
        try:
            bfl_name = names.bfl_from_kohya(module)
        except names.UnknownModuleError as exc:
            raise FormatError(str(exc)) from None
        loras.setdefault(bfl_name, {})[slot] = value
    _raise_unhandled(unhandled, "kohya")
    return _from_bfl(loras, "kohya")


def from_comfyui(tensors: Mapping[str, torch.Tensor], prefix: str = names.COMFYUI_PREFIX) -> Adapter:
    """Read BFL-named keys (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` or `.lora_A.weight`)."""
    loras: dict[str, dict[str, torch.Tensor]] = {}
    unhandled = []
    for key, value in tensors.items():
        match = _BFL_KIND.match(key.removeprefix(prefix))
        if not match:
            unhandled.append(key)
            continue
        slot = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up"}
        loras.setdefault(match["module"], {})[slot.get(match["kind"], "alpha")] = value
    _raise_unhandled(unhandled, "ComfyUI")
    return _from_bfl(loras, "comfyui")


def from_fal(tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """Read fal's Kontext trainer keys (`base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`, no alpha).

    diffusers' `_convert_fal_kontext_lora_to_diffusers` needs all 19 + 38 blocks and every module kind (it pops
    each unconditionally); the layout is ComfyUI's with another prefix, so it is read as ComfyUI.
    """
    adapter = from_comfyui(tensors, prefix="base_model.model.")
    adapter.source_format = "fal"
    return adapter


def _from_bfl(loras: dict[str, dict[str, torch.Tensor]], source: str) -> Adapter:
    """BFL-named LoRAs ({bfl name: {down, up, alpha?}}) -> Adapter, through diffusers' kohya converter.

    The converter gets the tensors without their alphas: with an alpha it bakes alpha/rank into lora_A (not
    bit-exact, and the alpha is lost), and for `final_layer.*` it drops the alpha altogether. We apply each alpha
    ourselves, as ComfyUI does: scale = alpha / fused rank, so a part of rank r gets alpha = scale * r.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    kohya_state: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    by_hand: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for bfl_name, slots in loras.items():
        try:
            module = names.from_bfl(bfl_name)
        except names.UnknownModuleError as exc:
            raise FormatError(str(exc)) from None
        if "down" not in slots or "up" not in slots:
            raise FormatError(f"`{bfl_name}` lacks its lora_down/lora_A or lora_up/lora_B tensor")
        down, up = slots["down"], slots["up"]
        _check_pair(bfl_name, down, up)
        scales[bfl_name] = (float(slots["alpha"]) if "alpha" in slots else down.shape[0]) / down.shape[0]
        if bfl_name.startswith("single_blocks.") and bfl_name.endswith(".linear1"):
            # diffusers' converter hard-codes FLUX.1's full widths (3072, 3072, 3072, 12288) for linear1 and fails on
            # any other width (the tiny test model, pruned variants); it splits qkv by thirds, which fits any width.
            by_hand[bfl_name] = (down, up)
            continue
        kohya_state[f"{names.kohya_name(module.name)}.lora_down.weight"] = down
        kohya_state[f"{names.kohya_name(module.name)}.lora_up.weight"] = up

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    if kohya_state:
        try:
            converted = _convert_kohya_flux_lora_to_diffusers(kohya_state)
        except (ValueError, AssertionError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise FormatError(f"diffusers' kohya converter refused the file: {reason}") from None
        for key, value in converted.items():
            # Block modules come back as `transformer.<module>.lora_A.weight`, the others without the prefix.
            module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
            pairs.setdefault(module, {})[kind] = value
    for bfl_name, (down, up) in by_hand.items():
        for part, (part_down, part_up) in _split_fused(names.from_bfl(bfl_name), down, up).items():
            pairs[part] = {"A.weight": part_down, "B.weight": part_up}

    modules: dict[str, ModuleLora] = {}
    for module, slots in pairs.items():
        bfl = names.to_bfl(module)
        down, up = slots["A.weight"], slots["B.weight"]
        if bfl.fused:
            trimmed = _trim_zero_rank(down, up)
            if trimmed is None:
                continue  # an all-zero part: padding our exporter adds for a part the adapter did not train
            down, up = trimmed
        modules[module] = ModuleLora(down.clone(), up.clone(), scales[bfl.name] * down.shape[0])
    dropped = set(loras) - {names.to_bfl(module).name for module in pairs}
    if dropped:
        raise FormatError(f"diffusers' kohya converter dropped {len(dropped)} modules (e.g. `{sorted(dropped)[0]}`)")
    return Adapter(modules, source_format=source)


def _split_fused(
    module: names.BflModule, down: torch.Tensor, up: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Split a fused BFL LoRA into its parts, as diffusers' `_convert_to_ai_toolkit_cat` does.

    down (R, in), up (sum(rows), R). When up is block-diagonal in n equal rank blocks, part j gets rows j of
    down and its diagonal block; otherwise every part gets all of down and its own rows of up.
    """
    try:
        rows = names.part_rows(module, total=int(up.shape[0]))
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    ups = torch.split(up, rows, dim=0)
    count, fused_rank = len(module.parts), int(down.shape[0])
    if fused_rank % count == 0:
        rank = fused_rank // count
        block_diagonal = all(
            not part_up[:, : j * rank].any() and not part_up[:, (j + 1) * rank :].any() for j, part_up in enumerate(ups)
        )
        if block_diagonal:
            return {
                part: (down[j * rank : (j + 1) * rank], ups[j][:, j * rank : (j + 1) * rank])
                for j, part in enumerate(module.parts)
            }
    return {part: (down, part_up) for part, part_up in zip(module.parts, ups, strict=True)}


def _trim_zero_rank(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Drop rank components that are zero in both down (row) and up (column); None when nothing is left."""
    keep = down.ne(0).any(dim=1) | up.ne(0).any(dim=0)
    if bool(keep.all()):
        return down, up
    if not bool(keep.any()):
        return None
    return down[keep], up[:, keep]


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise FormatError(
            f"`{name}`: lora_down/A {tuple(down.shape)} and lora_up/B {tuple(up.shape)} "
            "are not an (r, in), (out, r) pair"
        )


def _raise_unhandled(keys: list[str], fmt: str) -> None:
    if not keys:
        return
    kinds = sorted({key.rsplit(".", 1)[-1] if "." in key else key for key in keys})
    raise FormatError(
        f"{len(keys)} {fmt} keys this reader does not handle (e.g. `{keys[0]}`; kinds: {', '.join(kinds[:6])}); "
        "only plain LoRA pairs (lora_down/up or lora_A/B, alpha) are supported"
    )


def _json_entry(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _adapter_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The PEFT config from diffusers' `lora_adapter_metadata` entry, without the `transformer.` prefix."""
    raw = _json_entry(metadata, LORA_ADAPTER_METADATA_KEY)
    config = {k.removeprefix(PREFIX): v for k, v in raw.items() if k.startswith(PREFIX)}
    return config or None


def _config_alpha(config: Mapping[str, Any], module: str, rank: int) -> float:
    """Alpha of `module` under a PEFT LoraConfig dict, as PEFT resolves it; rsLoRA expressed as a plain alpha/r."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    alpha = float(pattern.get(get_pattern_key(pattern.keys(), module), config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return alpha


# ----------------------------------------------------------------------------------------------- writing


def to_diffusers(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT state dict with keys `<module>.lora_A.weight`, PEFT config dict): what `save_diffusers_lora` takes.

    The file's own config is reused when the adapter came from a diffusers file; otherwise one is built that
    gives each module its rank and alpha (`^`-anchored rank/alpha patterns, as diffusers' loader writes them).
    """
    state: dict[str, torch.Tensor] = {}
    for module, lora in adapter.modules.items():
        state[f"{module}.lora_A.weight"] = lora.down
        state[f"{module}.lora_B.weight"] = lora.up
        for kind, value in lora.extras.items():
            state[f"{module}.{kind}"] = value
    state.update(adapter.other)
    config = adapter.config if adapter.config is not None else peft_config_for(adapter)
    return state, dict(config)


def peft_config_for(adapter: Adapter) -> dict[str, Any]:
    """A LoraConfig dict that reproduces every module's rank and alpha and targets exactly its modules."""
    if not adapter.modules:
        raise FormatError("the adapter has no LoRA modules")
    ranks = {module: lora.rank for module, lora in adapter.modules.items()}
    alphas = {module: lora.alpha for module, lora in adapter.modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{m}": r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {f"^{m}": a for m, a in sorted(alphas.items()) if a != alpha},
        "target_modules": "^(" + "|".join(re.escape(m) for m in sorted(adapter.modules)) + ")$",
        "use_dora": any("lora_magnitude_vector" in lora.extras for lora in adapter.modules.values()),
        "lora_bias": any("lora_B.bias" in lora.extras for lora in adapter.modules.values()),
    }


@dataclass
class BflLora:
    """One BFL-named LoRA: down (rank, in), up (out, rank) in BFL row order, alpha (update scale alpha / rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def to_bfl_loras(adapter: Adapter, fmt: str = "kohya") -> dict[str, BflLora]:
    """The adapter as BFL-named LoRAs, fusing q/k/v (and single-block proj_mlp) groups; `fmt` names errors.

    A fused group's parts are padded to the group's largest rank, a part the adapter lacks is written as zeros (both
    keep the block-diagonal layout that diffusers' reader splits exactly), and a part whose alpha/rank differs from
    the group's first is scaled in its lora_up. `final_layer.*` gets alpha = rank with the scale baked into lora_up,
    because diffusers' kohya reader ignores alpha there while ComfyUI applies it.
    """
    _check_expressible(adapter, fmt)
    groups: dict[str, tuple[names.BflModule, dict[str, ModuleLora]]] = {}
    for module, lora in adapter.modules.items():
        try:
            bfl = names.to_bfl(module)
        except names.UnknownModuleError as exc:
            raise FormatError(f"{fmt} cannot hold {exc}") from None
        groups.setdefault(bfl.name, (bfl, {}))[1][module] = lora

    out: dict[str, BflLora] = {}
    padded, rescaled, outside_blocks = [], [], []
    for bfl_name, (bfl, parts) in sorted(groups.items()):
        if not bfl.fused:
            lora = parts[bfl.parts[0]]
            up, alpha = lora.up, lora.alpha
            if bfl.swap_shift_scale:
                up = _swap_halves(up)
            if bfl_name.startswith("final_layer."):
                up, alpha = up * lora.scale, float(lora.rank)
            if not bfl.is_block:
                outside_blocks.append(bfl_name)
            out[bfl_name] = BflLora(lora.down, up, alpha)
            continue
        out[bfl_name], was_padded, was_rescaled = _fuse(bfl, parts)
        if was_padded:
            padded.append(bfl_name)
        if was_rescaled:
            rescaled.append(bfl_name)
    if padded:
        logger.warning(
            "%s: %d fused modules (e.g. %s) have parts missing or of unequal rank; padded with zero rank blocks so "
            "the fused LoRA splits back exactly (same output, larger file).",
            fmt, len(padded), padded[0],
        )  # fmt: skip
    if rescaled:
        logger.warning(
            "%s: %d fused modules (e.g. %s) have parts with different alpha/rank; each part's scale is baked into "
            "its lora_up (same output; the per-part alphas do not round-trip).",
            fmt, len(rescaled), rescaled[0],
        )  # fmt: skip
    if outside_blocks:
        logger.warning(
            "%s: LoRA on %s is written, and ComfyUI applies it, but diffusers' load_lora_weights (0.42) drops modules "
            "outside the double/single blocks from kohya/ComfyUI files without notice; load the diffusers file there.",
            fmt, ", ".join(outside_blocks),
        )  # fmt: skip
    return out


def _fuse(bfl: names.BflModule, parts: dict[str, ModuleLora]) -> tuple[BflLora, bool, bool]:
    """Stack a group's parts: down (n*r, in) = cat of downs, up (sum rows, n*r) block-diagonal, alpha = scale*n*r."""
    present = [parts[p] for p in bfl.parts if p in parts]
    rank = max(lora.rank for lora in present)
    scale = present[0].scale
    try:
        rows = names.part_rows(bfl, known={p: int(parts[p].up.shape[0]) for p in parts})
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    in_features, dtype = int(present[0].down.shape[1]), present[0].up.dtype
    padded = len(present) < len(bfl.parts) or any(lora.rank != rank for lora in present)
    rescaled = any(not math.isclose(lora.scale, scale) for lora in present)
    downs, ups = [], []
    for part, part_rows in zip(bfl.parts, rows, strict=True):
        down = torch.zeros(rank, in_features, dtype=dtype)
        up = torch.zeros(part_rows, rank, dtype=dtype)
        lora = parts.get(part)
        if lora is not None:
            down[: lora.rank] = lora.down
            up[:, : lora.rank] = lora.up if math.isclose(lora.scale, scale) else lora.up * (lora.scale / scale)
        downs.append(down)
        ups.append(up)
    fused = BflLora(torch.cat(downs), torch.block_diag(*ups), scale * rank * len(bfl.parts))
    return fused, padded, rescaled


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows; its own inverse."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_expressible(adapter: Adapter, fmt: str) -> None:
    """Refuse, naming what and why, tensors a BFL-named LoRA file has no faithful place for."""
    if adapter.other:
        kinds = sorted({re.sub(r"^.*\.((hada|lokr)_\w+?)(\.weight)?$", r"\1", k) for k in adapter.other})
        raise FormatError(
            f"{fmt} export: the adapter has LoHa/LoKr tensors ({', '.join(kinds)}), which this exporter does not write "
            "in BFL naming (no loader here to prove the layout); use the diffusers file"
        )
    dora = [m for m, lora in adapter.modules.items() if "lora_magnitude_vector" in lora.extras]
    if dora:
        raise FormatError(
            f"{fmt} export: {len(dora)} modules carry DoRA magnitudes (e.g. {dora[0]}), which have no faithful place: "
            "PEFT normalises DoRA per output row, ComfyUI's `dora_scale` per input column, and diffusers drops "
            "`dora_scale`; use the diffusers file, or merge the adapter into the base (`merge`)"
        )
    biased = [m for m, lora in adapter.modules.items() if "lora_B.bias" in lora.extras]
    if biased:
        raise FormatError(
            f"{fmt} export: {len(biased)} modules have a lora_B bias (e.g. {biased[0]}), which {fmt} has no key for"
        )


def to_kohya(adapter: Adapter) -> dict[str, torch.Tensor]:
    """kohya keys: `lora_unet_<bfl_name_with_underscores>.lora_down.weight / lora_up.weight / alpha`."""
    return _bfl_state(to_bfl_loras(adapter, "kohya"), names.kohya_name)


def to_comfyui(adapter: Adapter) -> dict[str, torch.Tensor]:
    """ComfyUI keys: `diffusion_model.<bfl_name>.lora_down.weight / lora_up.weight / alpha`."""
    return _bfl_state(to_bfl_loras(adapter, "ComfyUI"), lambda name: names.COMFYUI_PREFIX + name)


def _bfl_state(loras: dict[str, BflLora], key_of) -> dict[str, torch.Tensor]:
    state = {}
    for bfl_name, lora in loras.items():
        key = key_of(bfl_name)
        state[f"{key}.lora_down.weight"] = lora.down
        state[f"{key}.lora_up.weight"] = lora.up
        state[f"{key}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)  # float32 holds n*r*scale exactly
    return state


def write_format(adapter: Adapter, fmt: str, path: str | Path) -> Path:
    """Write the adapter in `fmt` (one of EXPORT_FORMATS) to the safetensors file `path`, atomically."""
    if Path(path).is_dir():
        raise FormatError(f"--out {path} is a folder; name the .safetensors file to write")
    return _prepare(adapter, fmt)(Path(path))


def _prepare(adapter: Adapter, fmt: str) -> Callable[[Path], Path]:
    """Convert the adapter to `fmt` now (raising if it cannot hold it); the returned function writes the file."""
    info = dict(adapter.info) | {"format": fmt}
    if fmt == "diffusers":
        state, config = to_diffusers(adapter)
        return lambda path: save_diffusers_lora(path, state, config, info)
    converters = {"kohya": to_kohya, "comfyui": to_comfyui}
    if fmt not in converters:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    tensors = converters[fmt](adapter)
    # No `lora_adapter_metadata` here: diffusers would apply its alpha on top of the alphas its kohya reader bakes in.
    metadata = {"format": "pt", KONTEXT_LORA_METADATA_KEY: json.dumps(info, sort_keys=True, default=str)}
    return lambda path: atomic_save_safetensors(tensors, path, metadata)


def export_file_names(name: str) -> dict[str, str]:
    """File name of each format in an export folder (diffusers keeps its default: `load_lora_weights(dir)` works)."""
    return {"diffusers": WEIGHT_NAME, "kohya": f"{name}_kohya.safetensors", "comfyui": f"{name}_comfyui.safetensors"}


def write_exports(
    lora_path: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = EXPORT_FORMATS,
    name: str | None = None,
    card: bool = True,
) -> dict[str, Path]:
    """Export the LoRA file `lora_path` (any supported format) to `out_dir` in each of `formats`, plus README.md.

    Every format is converted before anything is written, so a format that cannot hold the adapter fails the call
    without leaving a partial export. `name` (the kohya/ComfyUI file stem) defaults to the run folder's name.
    """
    from kontext_lora.export.card import write_model_card

    lora_path, out_dir = Path(lora_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FormatError(f"--out {out_dir} is a file; the exports go into a folder: name a folder")
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown:
        raise FormatError(f"unknown format {unknown[0]!r}; choose from {', '.join(EXPORT_FORMATS)} or all")
    adapter = read_adapter(lora_path)
    writers = {fmt: _prepare(adapter, fmt) for fmt in formats}  # every conversion before the first write
    stem = name or (lora_path.parent.resolve().name if lora_path.name == WEIGHT_NAME else lora_path.stem)
    files = export_file_names(stem or "lora")
    written = {fmt: write(out_dir / files[fmt]) for fmt, write in writers.items()}
    if card:
        written["card"] = write_model_card(
            out_dir, card_metadata(adapter), [p.name for p in written.values()], run_dir=lora_path.parent
        )
    return written


def comfyui_log_line(comfyui_file: str | Path, lora_path: str | Path) -> str:
    """The export log's pointer for ComfyUI users, with the update scale alpha/r of the LoRA at `lora_path`."""
    from kontext_lora.export.card import comfyui_note

    info = read_adapter(lora_path).info
    return comfyui_note(str(comfyui_file), info.get("rank"), info.get("alpha"))


def card_metadata(adapter: Adapter) -> dict[str, str]:
    """The adapter's config and info as diffusers-file metadata strings (what `card.model_card` reads)."""
    config = adapter.config if adapter.config is not None else (peft_config_for(adapter) if adapter.modules else {})
    prefixed = {PREFIX + k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return {
        LORA_ADAPTER_METADATA_KEY: json.dumps(prefixed, sort_keys=True, default=str),
        KONTEXT_LORA_METADATA_KEY: json.dumps(adapter.info, sort_keys=True, default=str),
    }
