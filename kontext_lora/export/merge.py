"""Merge LoRAs into the base transformer, save it (diffusers folder or one BFL-named file); resize a LoRA's rank.

Merging goes through PEFT (diffusers' `load_lora_adapter` + `set_adapters` + `fuse_lora` + `unload_lora`), so DoRA
and per-module alphas merge exactly as they run. Rank resizing is an SVD of each module's B @ A.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kontext_lora.atomic import atomic_directory
from kontext_lora.export import names
from kontext_lora.export.diffusers_format import KONTEXT_LORA_METADATA_KEY, atomic_save_safetensors
from kontext_lora.export.formats import Adapter, FormatError, ModuleLora, to_diffusers

MERGE_FORMATS = ("diffusers", "bfl")


def merge_loras(transformer: torch.nn.Module, loras: Sequence[tuple[Adapter, float]]) -> torch.nn.Module:
    """Fuse each adapter, times its scale, into the transformer's base weights, in place; returns the transformer.

    `transformer`: a `FluxTransformer2DModel` without adapters. Afterwards it has no LoRA layers left: W += sum of
    scale * (alpha/r) * B @ A over the adapters (DoRA adapters as PEFT merges them).
    """
    if getattr(transformer, "peft_config", None):
        raise FormatError("the transformer already has adapters; merge into a freshly loaded one")
    adapter_names, scales = [], []
    for index, (adapter, scale) in enumerate(loras):
        state, config = to_diffusers(adapter)
        name = f"merge_{index}"
        transformer.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=config)
        adapter_names.append(name)
        scales.append(float(scale))
    if not adapter_names:
        raise FormatError("nothing to merge: give at least one LoRA")
    transformer.set_adapters(adapter_names, weights=scales)
    transformer.fuse_lora(adapter_names=adapter_names)
    transformer.unload_lora()
    return transformer


def diffusers_to_bfl_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in BFL names (the layout of BFL's single-file checkpoints).

    q/k/v (and single-block proj_mlp) weights and biases are concatenated along the output rows into
    `img_attn.qkv` / `txt_attn.qkv` / `linear1`; `norm_out.linear` rows are swapped to BFL's (shift, scale). The
    inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, which has no writer of its own.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[names.BflModule, dict[str, dict[str, torch.Tensor]]]] = {}
    unknown = []
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        norm = _norm_param(key)
        if norm is not None:
            out[norm] = value
            continue
        try:
            bfl = names.to_bfl(module)
        except names.UnknownModuleError:
            unknown.append(key)
            continue
        if param not in ("weight", "bias"):
            unknown.append(key)
        elif bfl.fused:
            fused.setdefault(bfl.name, (bfl, {}))[1].setdefault(param, {})[module] = value
        else:
            out[f"{bfl.name}.{param}"] = _swap_rows(value) if bfl.swap_shift_scale else value
    if unknown:
        raise FormatError(f"{len(unknown)} transformer parameters have no BFL name (e.g. `{unknown[0]}`)")
    for bfl_name, (bfl, params) in fused.items():
        for param, parts in params.items():
            missing = [p for p in bfl.parts if p not in parts]
            if missing:
                raise FormatError(f"`{bfl_name}.{param}` is missing its part `{missing[0]}`")
            out[f"{bfl_name}.{param}"] = torch.cat([parts[p] for p in bfl.parts], dim=0)
    return out


def _norm_param(key: str) -> str | None:
    """BFL name of a q/k RMSNorm scale, or None when `key` is not one."""
    block, _, rest = key.partition(".")
    index, _, suffix = rest.partition(".")
    kind = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}.get(block)
    if kind is None:
        return None
    for bfl_suffix, diffusers_suffix in names.norm_params(kind).items():
        if suffix == diffusers_suffix:
            return f"{kind}.{index}.{bfl_suffix}"
    return None


def _swap_rows(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def save_merged(
    transformer: torch.nn.Module, out: str | Path, fmt: str = "diffusers", record: dict[str, Any] | None = None
) -> Path:
    """Save a merged transformer: a diffusers folder (`fmt="diffusers"`) or one BFL-named safetensors file ("bfl").

    Both are written under a temporary name and renamed into place. `record` goes into the BFL file's metadata.
    """
    out = Path(out)
    if fmt == "bfl":
        state = diffusers_to_bfl_state_dict({k: v.detach() for k, v in transformer.state_dict().items()})
        metadata = {"format": "pt", KONTEXT_LORA_METADATA_KEY: json.dumps(record or {}, sort_keys=True, default=str)}
        return atomic_save_safetensors(state, out, metadata)
    if fmt != "diffusers":
        raise FormatError(f"unknown merge format {fmt!r}; choose one of {', '.join(MERGE_FORMATS)}")
    with atomic_directory(out) as tmp:
        transformer.save_pretrained(tmp)
        if record:
            (tmp / "kontext_lora_merge.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return out


# ------------------------------------------------------------------------------------------------ resize


@dataclass
class ResizeReport:
    """Energy (sum of squared singular values of each module's update) kept by a rank resize."""

    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (old rank, new rank)
    kept: dict[str, float] = field(default_factory=dict)  # module -> fraction of its energy kept
    total_energy: float = 0.0  # of all updates, scale included
    kept_energy: float = 0.0

    @property
    def energy_kept(self) -> float:
        """Fraction of the whole adapter's update energy kept (1.0 for an all-zero adapter)."""
        return self.kept_energy / self.total_energy if self.total_energy > 0 else 1.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        if not self.kept:
            return "no modules"
        old = sorted({r for r, _ in self.ranks.values()})
        new = sorted({r for _, r in self.ranks.values()})
        worst = min(self.kept, key=self.kept.__getitem__)
        return (
            f"{len(self.kept)} modules, rank {_span(old)} -> {_span(new)}; energy kept {self.energy_kept:.4%} overall, "
            f"per module mean {sum(self.kept.values()) / len(self.kept):.4%}, min {self.kept[worst]:.4%} ({worst})"
        )


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def resize_adapter(
    adapter: Adapter, rank: int | None = None, energy: float | None = None
) -> tuple[Adapter, ResizeReport]:
    """Cut every module's update B @ A to `rank`, or to the smallest rank keeping `energy` of it (0 < energy <= 1).

    Per module, with B (out, r) = Qb Rb and A^T (in, r) = Qa Ra: B @ A = Qb (Rb Ra^T) Qa^T, and the SVD of the
    small (r, r) core gives the best rank-k factors. alpha becomes k * (alpha / r) so the update scale stays; a rank
    at or above the module's keeps it exactly. DoRA magnitudes and lora_B biases are kept as they are.
    """
    if (rank is None) == (energy is None):
        raise FormatError("give exactly one of rank or energy")
    if rank is not None and rank < 1:
        raise FormatError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise FormatError(f"energy must be in (0, 1], got {energy}")
    if adapter.other:
        raise FormatError("resize handles LoRA pairs only; this adapter also has LoHa/LoKr tensors")
    largest = max((lora.rank for lora in adapter.modules.values()), default=0)
    if rank is not None and rank > largest:
        raise FormatError(
            f"rank {rank} is above this LoRA's rank {largest}: resizing can only lower a rank; give one below {largest}"
        )
    report = ResizeReport()
    modules: dict[str, ModuleLora] = {}
    for module, lora in adapter.modules.items():
        q_up, r_up = torch.linalg.qr(lora.up.double())  # (out, m), (m, r)
        q_down, r_down = torch.linalg.qr(lora.down.double().T)  # (in, n), (n, r)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # core (m, n)
        power = s.square()
        total = float(power.sum())
        if rank is not None:
            keep = min(rank, int(s.numel()))
        else:
            cumulative = power.cumsum(0) / total if total > 0 else torch.ones_like(power)
            keep = int((cumulative < energy - 1e-12).sum()) + 1
            keep = min(keep, int(s.numel()))
        root = s[:keep].sqrt()
        up = (q_up @ u[:, :keep]) * root  # (out, k)
        down = root[:, None] * (vh[:keep] @ q_down.T)  # (k, in)
        kept = float(power[:keep].sum())
        modules[module] = ModuleLora(
            down.to(lora.down.dtype), up.to(lora.up.dtype), lora.scale * keep, extras=dict(lora.extras)
        )
        report.ranks[module] = (lora.rank, keep)
        report.kept[module] = kept / total if total > 0 else 1.0
        report.total_energy += total * lora.scale**2
        report.kept_energy += kept * lora.scale**2
    info = dict(adapter.info)
    info["resized"] = {
        "rank": rank,
        "energy": energy,
        "energy_kept": round(report.energy_kept, 6),
        "from_ranks": sorted({r for r, _ in report.ranks.values()}),
    }
    resized = Adapter(modules, other=dict(adapter.other), config=None, info=info, source_format=adapter.source_format)
    return resized, report
