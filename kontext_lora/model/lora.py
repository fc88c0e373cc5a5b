"""LoRA injection through PEFT: target presets and the adapter's config/state for saving."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, PeftConfig, get_peft_model_state_dict
from peft import LoraConfig as PeftLoraConfig

from kontext_lora.config import LoraConfig

_ADAPTER_PARAM = re.compile(r"\.(lora_|hada_|lokr_)")
# Inits that move part of the base weight into the adapter; their initial adapter is kept to save a plain LoRA.
BASE_MUTATING_INITS = ("pissa", "olora")
_INITIAL_STATE = "_kontext_lora_initial_adapter"

# Module kinds inside FLUX's 19 double-stream and 38 single-stream blocks. Presets are anchored regexes over full
# module names, because a plain suffix `proj_out` would also adapt the model's final projection layer.
_DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # fmt: skip
_DOUBLE_MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_DOUBLE_MOD = ["norm1.linear", "norm1_context.linear"]
_SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]  # proj_out: attention + MLP output
_SINGLE_MLP = ["proj_mlp"]
_SINGLE_MOD = ["norm.linear"]

PRESETS: dict[str, tuple[list[str], list[str]]] = {
    "attention": (_DOUBLE_ATTENTION, _SINGLE_ATTENTION),
    "attention_mlp": (_DOUBLE_ATTENTION + _DOUBLE_MLP, _SINGLE_ATTENTION + _SINGLE_MLP),
    "all": (_DOUBLE_ATTENTION + _DOUBLE_MLP + _DOUBLE_MOD, _SINGLE_ATTENTION + _SINGLE_MLP + _SINGLE_MOD),
}


def _alternation(names: list[str]) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


def target_modules(cfg: LoraConfig) -> str | list[str]:
    """PEFT `target_modules`: the explicit regex, else the explicit suffix list, else an anchored preset regex."""
    if cfg.target_regex:
        return cfg.target_regex
    if cfg.target_modules:
        return list(cfg.target_modules)
    double, single = PRESETS[cfg.preset]
    return (
        rf"^(transformer_blocks\.\d+\.({_alternation(double)})"
        rf"|single_transformer_blocks\.\d+\.({_alternation(single)}))$"
    )


def peft_config(cfg: LoraConfig) -> PeftConfig:
    """The PEFT config of `lora.adapter_type`: LoraConfig (with DoRA / rsLoRA / init), LoHaConfig or LoKrConfig."""
    common = dict(
        r=cfg.rank,
        target_modules=target_modules(cfg),
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern={key: float(value) for key, value in cfg.alpha_pattern.items()},
    )
    if cfg.adapter_type == "loha":
        return LoHaConfig(alpha=cfg.alpha, **common)
    if cfg.adapter_type == "lokr":
        return LoKrConfig(alpha=cfg.alpha, **common)
    return PeftLoraConfig(
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        **common,
    )


def inject_lora(transformer: torch.nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> PeftConfig:
    """Add the PEFT adapter of `cfg` to the (frozen) transformer; only adapter parameters stay trainable, in float32."""
    peft_config_ = peft_config(cfg)
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(peft_config_, adapter_name=adapter_name)  # diffusers' PeftAdapterMixin
    except ValueError as exc:
        raise ValueError(f"config key `lora.target_modules`: {str(exc).splitlines()[0]}") from None
    for param in lora_parameters(transformer):
        param.data = param.data.float()  # master weights in fp32 even when the base is bf16
    if cfg.adapter_type == "lora" and cfg.init_lora_weights in BASE_MUTATING_INITS:
        initial = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
        setattr(transformer, _INITIAL_STATE, {key: value.detach().clone() for key, value in initial.items()})
    return peft_config_


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters: lora_A / lora_B (+ DoRA's lora_magnitude_vector), LoHa hada_*, LoKr lokr_*."""
    return [p for name, p in transformer.named_parameters() if p.requires_grad and _ADAPTER_PARAM.search(name)]


def adapter_state(transformer: torch.nn.Module, adapter_name: str = "default") -> tuple[dict, dict[str, Any]]:
    """(state dict with keys `<module>.lora_A.weight`, PEFT config dict) of the adapter, ready to save.

    For a PiSSA / OLoRA adapter this is the equivalent plain LoRA on the ORIGINAL base weights (see
    `_as_plain_lora`), so the file works wherever a LoRA does; it does not load back into a PiSSA-injected model.
    """
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    config = transformer.peft_config[adapter_name].to_dict()
    initial = getattr(transformer, _INITIAL_STATE, None)
    if initial is not None:
        state, config = _as_plain_lora(state, config, initial)
    return state, config


def _as_plain_lora(
    state: dict[str, torch.Tensor], config: dict[str, Any], initial: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PiSSA / OLoRA -> LoRA on the original base, as PEFT's `subtract_mutated_init` does for `save_pretrained`.

    Those inits move s * B0 @ A0 out of the base weight (W_res = W - s B0 A0), so the trained model is
    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] @ [A ; A0]: rank 2r, and alpha scaled so the scale s
    (alpha / r, or alpha / sqrt(r) with rsLoRA) is unchanged. Written here because PEFT does this only inside
    `PeftModel.save_pretrained`, which writes PEFT's own file layout rather than diffusers'.
    """
    factor = math.sqrt(2.0) if config.get("use_rslora") else 2.0
    converted = {}
    for key, value in state.items():
        if key.endswith("lora_A.weight"):
            converted[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif key.endswith("lora_B.weight"):
            converted[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            converted[key] = value
    config = dict(config)
    config.update(
        r=2 * config["r"],
        lora_alpha=factor * config["lora_alpha"],
        rank_pattern={key: 2 * rank for key, rank in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={key: factor * alpha for key, alpha in (config.get("alpha_pattern") or {}).items()},
        init_lora_weights=True,
    )
    return converted, config


def load_adapter_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default"):
    """Copy `<module>.lora_A.weight / lora_B.weight` tensors into the injected adapter; every key must match."""
    from peft import set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(transformer, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ValueError(
            f"the LoRA file does not match lora.* targets: {len(missing)} adapted modules missing from the file, "
            f"{len(unexpected)} not adapted by the config (first: {first})"
        )
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    assert not result.unexpected_keys, result.unexpected_keys


def load_adapter_file(transformer: torch.nn.Module, path, adapter_name: str = "default") -> None:
    """Load a file the trainer saved (`transformer.<PEFT key>` tensors, any adapter type) into the injected adapter.

    The transformer must carry an adapter of the same config (`inject_lora`); every key must match.
    """
    from safetensors.torch import load_file

    state = {key.removeprefix("transformer."): value for key, value in load_file(str(path)).items()}
    load_adapter_state(transformer, state, adapter_name)
