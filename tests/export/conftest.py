"""Shared pieces of the export tests: the adapter under test, fixed transformer inputs, and diffusers' loader as oracle.

`make_adapter` is the one place the adapter comes from: an adapter trained a few steps on the project's loss
(alpha != rank).
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from kontext_lora.export.diffusers_format import WEIGHT_NAME, save_diffusers_lora
from kontext_lora.model.tiny import TINY_TRANSFORMER, build_tiny_pipeline
from kontext_lora.train.objective import LatentBatch, flow_matching_loss

SEED = 0
INNER = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]  # 64
MLP = 4 * INNER

# Every linear kind inside the blocks (anchored, so the final `proj_out` is not caught by the single-block one).
DOUBLE_KINDS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear",
]  # fmt: skip
SINGLE_KINDS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
GLOBAL_MODULES = [
    "x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2", "proj_out", "norm_out.linear",
]  # fmt: skip


def _alternation(names: list[str]) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


BLOCK_TARGETS = (
    rf"^(transformer_blocks\.\d+\.({_alternation(DOUBLE_KINDS)})"
    rf"|single_transformer_blocks\.\d+\.({_alternation(SINGLE_KINDS)}))$"
)
GLOBAL_TARGETS = rf"^({_alternation(GLOBAL_MODULES)})$"


def make_adapter(transformer: torch.nn.Module, target_modules: str | list[str] = BLOCK_TARGETS, **config) -> None:
    """Put the adapter under test on `transformer`: rank 4, alpha 8 unless `config` says otherwise, trained.

    Trained for a few AdamW steps on the project's flow-matching loss (random cached-style latents), so every
    lora_B has moved off PEFT's zero init and the output tests cannot pass trivially.
    """
    settings = dict(r=4, lora_alpha=8, init_lora_weights="gaussian") | config
    transformer.add_adapter(peft.LoraConfig(target_modules=target_modules, **settings))
    generator = torch.Generator().manual_seed(1234)
    params = [p for n, p in transformer.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    batch = LatentBatch(
        target_latents=torch.randn(2, 16, 4, 4, generator=generator),
        control_latents=torch.randn(2, 16, 4, 4, generator=generator),
        prompt_embeds=torch.randn(2, 8, TINY_TRANSFORMER["joint_attention_dim"], generator=generator),
        pooled_embeds=torch.randn(2, TINY_TRANSFORMER["pooled_projection_dim"], generator=generator),
    )
    for _ in range(5):
        sigmas, noise = torch.rand(2, generator=generator), torch.randn(2, 16, 4, 4, generator=generator)
        loss = flow_matching_loss(transformer, batch, sigmas, noise, guidance=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.requires_grad_(False)


def transformer_inputs(tokens: int = 16, text_tokens: int = 8) -> dict[str, torch.Tensor]:
    """Fixed inputs of the tiny transformer: hidden (1, tokens, 64), text (1, text_tokens, 32), pooled (1, 32)."""
    generator = torch.Generator().manual_seed(7)
    side = int(tokens**0.5)
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // side
    img_ids[:, 2] = torch.arange(tokens) % side
    return {
        "hidden_states": torch.randn(1, tokens, TINY_TRANSFORMER["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(
            1, text_tokens, TINY_TRANSFORMER["joint_attention_dim"], generator=generator
        ),
        "pooled_projections": torch.randn(1, TINY_TRANSFORMER["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.6]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.tensor([2.5]),
    }


@torch.no_grad()
def run_transformer(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer's output (1, 16, 64) on the fixed inputs."""
    return transformer(**transformer_inputs(), return_dict=False)[0]


def lora_modules(transformer: torch.nn.Module) -> set[str]:
    """Names of the modules that carry a LoRA layer."""
    return {name for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)}


@dataclass
class AdapterCase:
    """An adapter saved in our diffusers format, with what it must reproduce."""

    path: Path  # the diffusers-format file (what training writes)
    modules: set[str]  # modules it adapts
    output: torch.Tensor  # transformer output with the adapter, on `transformer_inputs()`
    base_output: torch.Tensor  # the same without it


def save_adapter_case(directory: Path, target_modules: str | list[str] = BLOCK_TARGETS, **config) -> AdapterCase:
    """Build a tiny pipeline, put `make_adapter` on it, record its outputs and save it with `save_diffusers_lora`."""
    pipe = fresh_pipeline()
    transformer = pipe.transformer
    base_output = run_transformer(transformer)
    make_adapter(transformer, target_modules, **config)
    output = run_transformer(transformer)
    assert not torch.allclose(output, base_output, atol=1e-3), "the adapter must change the output"
    info = {"base_model": "tiny-kontext", "step": 10, "rank": 4, "alpha": 8, "resolution": 64,
            "config": {"lora": {"rank": 4, "alpha": 8.0}, "train": {"steps": 10}}}  # fmt: skip
    path = save_diffusers_lora(
        directory / WEIGHT_NAME,
        peft.get_peft_model_state_dict(transformer),
        transformer.peft_config["default"].to_dict(),
        info,
    )
    return AdapterCase(path, lora_modules(transformer), output, base_output)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One torch thread for these tests: the tiny model's matmuls are ~100x slower with two threads on a busy 2-core
    machine (OpenMP contention). Restored after the package."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def adapter_case(tmp_path_factory: pytest.TempPathFactory) -> AdapterCase:
    """The main adapter: every block linear kind, r = 4, alpha = 8, plus a per-module rank and alpha."""
    return save_adapter_case(
        tmp_path_factory.mktemp("run"),
        rank_pattern={"norm1_context.linear": 2},
        alpha_pattern={"ff.net.2": 2.0},
    )


@pytest.fixture(scope="package")
def global_case(tmp_path_factory: pytest.TempPathFactory) -> AdapterCase:
    """An adapter on the linears outside the blocks (embedders, final layer), alpha != rank."""
    return save_adapter_case(tmp_path_factory.mktemp("global"), GLOBAL_TARGETS, r=2, lora_alpha=6)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Loaded:
    """What diffusers' own loader made of a file in a fresh tiny pipeline."""

    modules: set[str]
    output: torch.Tensor
    complaints: list[str]  # diffusers/PEFT warnings about the transformer's keys
    pipe: object


_PRISTINE: list = []


def fresh_pipeline():
    """A tiny pipeline as `build_tiny_pipeline(SEED)` makes it, with a transformer no adapter has touched.

    Built once; later calls copy its transformer (the part a LoRA changes) and share the rest.
    """
    from diffusers import FluxKontextPipeline

    if not _PRISTINE:
        _PRISTINE.append(build_tiny_pipeline(SEED))
    components = dict(_PRISTINE[0].components)
    components["transformer"] = copy.deepcopy(components["transformer"])
    return FluxKontextPipeline(**components)


def load_with_diffusers(path: Path) -> Loaded:
    """`FluxKontextPipeline.load_lora_weights(path)` into a fresh tiny pipeline (same seed, fp32)."""
    from diffusers.utils import logging as diffusers_logging

    pipe = fresh_pipeline()
    handler = _Records()
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        root.removeHandler(handler)
    messages = handler.messages + [str(w.message) for w in caught]
    complaints = [
        m for m in messages
        if "text_encoder" not in m and "CLIPTextModel" not in m  # no text-encoder LoRA in these files: expected
        and any(word in m for word in ("unexpected", "missing", "No LoRA keys", "Unsupported", "inconsistency"))
    ]  # fmt: skip
    return Loaded(lora_modules(pipe.transformer), run_transformer(pipe.transformer), complaints, pipe)


def diffusers_at_tiny_width(function, replacements: dict[str, str]):
    """A diffusers function recompiled with its hard-coded FLUX.1 widths replaced by the tiny model's.

    diffusers' kohya reader splits `linear1` at (3072, 3072, 3072, 12288) and its BFL checkpoint reader assumes
    inner dim 3072; everything else in them is used unchanged, so the tiny model can stand in for the full one.
    """
    module = inspect.getmodule(function)
    source = inspect.getsource(function)
    for old, new in replacements.items():
        assert source.count(old) == 1, f"diffusers changed: `{old}` not found once in {function.__name__}"
        source = source.replace(old, new)
    namespace = dict(vars(module))
    exec(compile(source, inspect.getsourcefile(function), "exec"), namespace)
    return namespace[function.__name__]


@pytest.fixture
def tiny_width_kohya_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `FluxKontextPipeline.load_lora_weights` read kohya/ComfyUI `linear1` at the tiny model's width."""
    from diffusers.loaders import lora_conversion_utils, lora_pipeline

    patched = diffusers_at_tiny_width(
        lora_conversion_utils._convert_kohya_flux_lora_to_diffusers,
        {"dims=[3072, 3072, 3072, 12288]": f"dims=[{INNER}, {INNER}, {INNER}, {MLP}]"},
    )
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", patched)
