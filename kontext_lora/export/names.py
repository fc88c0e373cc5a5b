"""FLUX transformer module names: diffusers (PEFT) <-> BFL, including the fused groups.

BFL (and so kohya and ComfyUI) stacks some diffusers linears along the output rows of one linear:
`img_attn.qkv` = to_q|to_k|to_v, `txt_attn.qkv` = add_q|k|v_proj, and in single blocks `linear1` =
to_q|to_k|to_v|proj_mlp (rows d, d, d, 4d for inner dim d). `final_layer.adaLN_modulation.1` outputs
(shift, scale) where diffusers' `norm_out.linear` outputs (scale, shift). The table below is the only place
these facts live; `diffusers/loaders/lora_conversion_utils.py` (`_convert_kohya_flux_lora_to_diffusers`) and
`single_file_utils.convert_flux_transformer_checkpoint_to_diffusers` hold the same mapping, and the tests check
that the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KOHYA_PREFIX = "lora_unet_"
COMFYUI_PREFIX = "diffusion_model."

# BFL module suffix -> the diffusers module suffixes stacked in it, in row order.
_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_GLOBAL: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED_SHIFT_SCALE = frozenset({"final_layer.adaLN_modulation.1"})

# Parameters that are not linears: the q/k RMSNorm scales (BFL name -> diffusers name, per block).
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}

MLP_RATIO = 4  # FLUX.1: single-block proj_mlp has 4x the rows of to_q

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


class UnknownModuleError(KeyError):
    """A module name outside the FLUX transformer's known linears."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class BflModule:
    """One BFL linear and the diffusers linears it holds.

    `parts`: diffusers module paths stacked along the output rows, in order (one entry when not fused).
    `swap_shift_scale`: the output rows are (shift, scale) in BFL and (scale, shift) in diffusers.
    """

    name: str
    parts: tuple[str, ...]
    swap_shift_scale: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def is_block(self) -> bool:
        """Inside a double or single block (diffusers' kohya reader keeps these; see formats.py)."""
        return self.name.startswith(("double_blocks.", "single_blocks."))


def to_bfl(module: str) -> BflModule:
    """The BFL linear holding the diffusers linear `module` (e.g. `transformer_blocks.0.attn.to_q`)."""
    match = _BLOCK.match(module)
    if match:
        kind, index, suffix = match.groups()
        table, bfl_kind = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        for bfl_suffix, parts in table.items():
            if suffix in parts:
                prefix = f"{kind}.{index}."
                return BflModule(f"{bfl_kind}.{index}.{bfl_suffix}", tuple(prefix + p for p in parts))
    else:
        for bfl_name, parts in _GLOBAL.items():
            if module in parts:
                return BflModule(bfl_name, parts, bfl_name in SWAPPED_SHIFT_SCALE)
    raise UnknownModuleError(f"`{module}` is not a FLUX transformer linear with a BFL name")


def from_bfl(name: str) -> BflModule:
    """The diffusers linears held by the BFL linear `name` (e.g. `single_blocks.3.linear1`)."""
    match = _BFL_BLOCK.match(name)
    if match:
        bfl_kind, index, suffix = match.groups()
        double = bfl_kind == "double_blocks"
        table, kind = (_DOUBLE, "transformer_blocks") if double else (_SINGLE, "single_transformer_blocks")
        if suffix in table:
            return BflModule(name, tuple(f"{kind}.{index}.{p}" for p in table[suffix]))
    elif name in _GLOBAL:
        return BflModule(name, _GLOBAL[name], name in SWAPPED_SHIFT_SCALE)
    raise UnknownModuleError(f"`{name}` is not a FLUX transformer linear in BFL naming")


def kohya_name(bfl_name: str) -> str:
    """kohya's module name: `lora_unet_` + the BFL name with dots as underscores."""
    return KOHYA_PREFIX + bfl_name.replace(".", "_")


def _kohya_table() -> dict[str, str]:
    suffixes = {s.replace(".", "_"): s for s in (*_DOUBLE, *_SINGLE)}
    return suffixes | {name.replace(".", "_"): name for name in _GLOBAL}


_KOHYA_SUFFIXES = _kohya_table()
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def bfl_from_kohya(kohya: str) -> str:
    """Inverse of `kohya_name` (underscores are ambiguous, so it goes through the table)."""
    body = kohya.removeprefix(KOHYA_PREFIX)
    match = _KOHYA_BLOCK.match(body)
    if match and match.group(3) in _KOHYA_SUFFIXES:
        return f"{match.group(1)}.{match.group(2)}.{_KOHYA_SUFFIXES[match.group(3)]}"
    if not match and body in _KOHYA_SUFFIXES and _KOHYA_SUFFIXES[body] in _GLOBAL:
        return _KOHYA_SUFFIXES[body]
    raise UnknownModuleError(f"`{kohya}` is not a FLUX transformer linear in kohya naming")


def part_rows(module: BflModule, known: dict[str, int] | None = None, total: int | None = None) -> list[int]:
    """Output rows of each part of `module` (FLUX.1 layout: qkv parts equal, `linear1` = d, d, d, MLP_RATIO * d).

    Give either the rows of at least one part (`known`: part -> rows) or the fused module's `total` rows.
    """
    widths = [MLP_RATIO if part.endswith("proj_mlp") else 1 for part in module.parts]
    if total is not None:
        unit, rest = divmod(total, sum(widths))
        what = f"{total} rows"
    else:
        part = next((p for p in module.parts if p in (known or {})), None)
        if part is None:
            raise ValueError(f"{module.name}: no part of known size")
        unit, rest = divmod(known[part], widths[module.parts.index(part)])  # type: ignore[index]
        what = f"{part} with {known[part]} rows"  # type: ignore[index]
    if rest or unit == 0:
        raise ValueError(f"{module.name}: {what} does not fit the FLUX layout {widths} x d")
    return [unit * w for w in widths]


def norm_params(kind: str) -> dict[str, str]:
    """BFL -> diffusers names of the non-linear parameters of one block (`double_blocks` or `single_blocks`)."""
    return dict(_DOUBLE_NORMS if kind == "double_blocks" else _SINGLE_NORMS)
