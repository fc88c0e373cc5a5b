"""`kontext-lora` command line: train | sweep | preflight | cache | plan | infer | export | merge | resize |
make-tiny-model | ui | keys."""

from __future__ import annotations

import argparse
import sys

# The base of the errors that are the user's to fix (printed as one line, exit code 2, no traceback). It imports
# nothing, so a config typo fails at once, before torch or diffusers is imported.
from kontext_lora.errors import UserError
from kontext_lora.run_files import PREFLIGHT_NAME


def _train(args: argparse.Namespace) -> int:
    from kontext_lora.config import load_config

    cfg = load_config(args.config, args.overrides)  # before the heavy imports: a bad config fails at once
    from kontext_lora.train.loop import train

    train(cfg)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from kontext_lora.sweep.command import sweep_command

    return sweep_command(
        args.config, args.sweep, args.overrides, out_dir=args.dir, launcher=args.launcher, print_commands=args.print,
        slurm=args.slurm, wandb_sweep=args.wandb_sweep, summary_only=args.summary,
    )  # fmt: skip


def _preflight(args: argparse.Namespace) -> int:
    from kontext_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pathlib import Path

    from kontext_lora.data.buckets import bucket_table
    from kontext_lora.data.plan import build_plan
    from kontext_lora.data.preflight import preflight, write_contact_sheet

    report = preflight(cfg.data)
    print(report.table())
    report.raise_on_errors()
    plan = build_plan(cfg.data, report)
    print(bucket_table([sample.bucket_key for sample in plan]))
    sheet = write_contact_sheet(report, args.sheet or Path(cfg.output.dir) / PREFLIGHT_NAME, cfg.data.preflight_samples)
    warnings = len(report.of_level("warning"))
    print(f"preflight passed: {len(plan)} usable triples, {warnings} warning(s); contact sheet {sheet}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from kontext_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    import torch
    from accelerate import PartialState

    from kontext_lora.data.plan import build_plan
    from kontext_lora.data.preflight import preflight
    from kontext_lora.data.triples import DataError
    from kontext_lora.train.encode import cached_dataset, load_encoders, release_encoders

    # Several processes under `accelerate launch`/torchrun: each fills its share (gloo on a CPU-only machine).
    state = PartialState(cpu=not torch.cuda.is_available())
    report = preflight(cfg.data, show_progress=state.is_main_process)
    if state.is_main_process:
        print(report.table())
    report.raise_on_errors()
    plan = build_plan(cfg.data, report)
    if not plan:
        raise DataError("no usable triples: every triple was skipped (see the preflight warnings above)")
    pipe = load_encoders(cfg)  # only the VAE and the text encoders are needed here
    pipe.to(state.device)
    dataset = cached_dataset(cfg, plan, pipe, state, show_progress=state.is_main_process)
    release_encoders(pipe)
    if state.is_main_process:
        print(f"cache ready: {len(dataset)} triples in {dataset.cache.folder}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from kontext_lora.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    from kontext_lora.planner import (
        PLAN_HEADROOM,
        candidates,
        choose,
        fp8_matmuls_available,
        kept_keys,
        phase_summary,
        plan_table,
        resolve_budget,
    )

    if args.vram is not None:
        budget, source = args.vram, "--vram"
    else:
        resolved = resolve_budget(cfg)
        if resolved is None:
            raise ConfigError(
                f"config key `memory.budget_gib`: {cfg.memory.budget_gib} gives no budget here (auto needs a CUDA "
                "device); pass --vram GIB"
            )
        budget, source = resolved
    fp8_matmuls = args.fp8_matmuls == "yes" or (args.fp8_matmuls == "auto" and fp8_matmuls_available())
    preds = candidates(cfg, budget, fp8_matmuls=fp8_matmuls)
    shape = f"{cfg.data.buckets} buckets at {cfg.data.resolution}, batch {cfg.train.batch_size}, rank {cfg.lora.rank}"
    print(f"memory plan for {budget:.1f} GiB ({source}; a candidate fits under {1 - PLAN_HEADROOM:.0%} of it), "
          f"{shape}, {cfg.optim.optimizer}:")  # fmt: skip
    kept = kept_keys(cfg)
    if kept:
        print(f"kept as set: {kept}")
    chosen = choose(preds, budget, kept=kept, **({"budget_name": "--vram"} if source == "--vram" else {}))
    print(plan_table(preds, budget, limit=args.show, chosen=chosen))
    print(f"\nchosen: {chosen.knobs.label()}: peak {chosen.peak_gib:.1f} GiB in {chosen.binding}, "
          f"{chosen.s_per_step:.2f} s/step; per phase (GiB):")  # fmt: skip
    print(phase_summary(chosen))
    print("overrides:\n  " + " ".join(chosen.knobs.overrides()))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from kontext_lora.model.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed, pretrained=not args.random))
    return 0


def _infer(args: argparse.Namespace) -> int:
    from kontext_lora.infer import run_inference

    out = run_inference(
        model=args.model, image=args.image, prompt=args.prompt, out=args.out, lora=args.lora, scale=args.scale,
        steps=args.steps, guidance=args.guidance, seed=args.seed, dtype=args.dtype, size=args.size,
        offload=args.offload,
    )  # fmt: skip
    print(out)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from kontext_lora.ui.app import serve  # needs the [ui] extra

    serve(host=args.host, port=args.port, root=args.root)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from kontext_lora.config import describe_keys

    for key, kind, default, doc in describe_keys():
        print(f"{key:36s} {kind:6s} {default!r:>14}  {doc}")
    return 0


# Subcommands with parsers of their own (argv after the command name is handed over whole).
_DELEGATED = {
    "export": ("kontext_lora.export.cli", "export_main", "write a LoRA in diffusers / kohya / ComfyUI format"),
    "merge": ("kontext_lora.export.cli", "merge_main", "fuse LoRAs into the base transformer"),
    "resize": ("kontext_lora.export.cli", "resize_main", "change a LoRA's rank by SVD"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=5e-5")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="many runs from a base config and a sweep file (grid / random / list)")
    p.add_argument("--config", required=True, help="base YAML config of every run")
    p.add_argument("--sweep", required=True, help="sweep YAML: grid, random or runs of dotted keys")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run (the swept values win)")
    p.add_argument("--dir", help="sweep folder (default: the sweep file's `dir`, else runs/sweeps/<name>)")
    p.add_argument("--launcher", choices=["inprocess", "accelerate"], default="inprocess",
                   help="train each run in this process, or as an `accelerate launch` subprocess")  # fmt: skip
    p.add_argument("--print", action="store_true", help="print the accelerate command of each unfinished run")
    p.add_argument("--slurm", action="store_true", help="write <dir>/sweep.slurm, an array job of unfinished runs")
    p.add_argument("--wandb-sweep", action="store_true", help="write <dir>/wandb_sweep.yaml for wandb agents")
    p.add_argument("--summary", action="store_true", help="only rebuild the summary from the run folders")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("preflight", help="check every triple of a config's datasets and print a report")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--sheet", help="contact sheet path (default: <output.dir>/preflight.jpg)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_preflight)

    p = sub.add_parser("cache", help="fill the disk cache of latents and text embeddings (no training)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_cache)

    p = sub.add_parser("plan", help="predict peak memory and s/step; pick the fastest knobs that fit a budget")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--vram", type=float, help="memory budget in GiB (default: the config's memory.budget_gib)")
    p.add_argument("--show", type=int, default=20, help="candidates shown, fastest first")
    p.add_argument(
        "--fp8-matmuls",
        choices=("auto", "yes", "no"),
        default="auto",
        help="consider fp8 matmuls on an fp8-stored base (auto: if this machine's GPU has fp8 tensor cores)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "make-tiny-model", help="build the tiny Kontext pipeline (a pretrained editor) in diffusers layout"
    )
    p.add_argument("dir")
    p.add_argument("--random", action="store_true", help="random weights instead (smaller, for unit tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (with --random)")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("infer", help="edit an image with the base model and a LoRA")
    p.add_argument("--model", required=True, help="diffusers folder of FLUX.1-Kontext-dev")
    p.add_argument("--lora", help="LoRA safetensors file (any format diffusers loads)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", type=int, help="square output side (default: Kontext's preferred ~1 MP size)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "model", "group"],
                   help="GPU placement: all on it, each model only while it runs, or blocks streamed from CPU memory "
                   "(auto: the first that fits)")  # fmt: skip
    p.set_defaults(func=_infer)

    p = sub.add_parser("ui", help="local web app: datasets, configs, runs and sweeps under --root")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--root", default=".", help="project folder: the only files the app reads and writes")
    p.set_defaults(func=_ui)

    p = sub.add_parser("keys", help="list every config key with its type, default and doc")
    p.set_defaults(func=_keys)
    for name, (_, _, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Import-time messages of optional dependencies that say nothing about the user's run: torchao's prebuilt CUDA
# extensions that do not match this machine (we use only its pure-Python `to_nf4`), torch's notes to torchao about
# Enum registration, bitsandbytes' CPU kernel hub and diffusers' torchao checkpoint types. PEFT and diffusers import
# torchao / bitsandbytes whenever they are installed, so every run printed them. Only these loggers are raised to
# ERROR; everything else keeps its level.
_QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "bitsandbytes.backends.cpu.ops",
    "diffusers.quantizers.torchao.torchao_quantizer",
)


# Single messages that every command printed and that ask nothing of the user: transformers' note that it uses the
# PIL image processors because torchvision is not installed (the pipeline's CLIP processor works either way), and
# diffusers' notice that a LoRA has no text-encoder keys (ours adapt the transformer only, so none ever has). Other
# messages of these loggers still show.
_QUIET_MESSAGES = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
}


class _DropMessage:
    """A logging filter dropping the records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def quiet_dependency_noise() -> None:
    """Raise the loggers in `_QUIET_LOGGERS` to ERROR and filter `_QUIET_MESSAGES` (before the dependencies are
    imported; loggers are created on first use, so nothing is imported here)."""
    import logging

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, text in _QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_dependency_noise()
    if argv and argv[0] in _DELEGATED:
        import importlib

        module, function, _ = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # a signal's clean stop (train/stop.py) is one line too; Ctrl-C elsewhere is not
        stop = sys.modules.get("kontext_lora.train.stop")
        if stop is None or not isinstance(exc, stop.TrainingStopped):
            raise
        print(f"kontext-lora: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:  # every package's user errors derive from it (kontext_lora/errors.py)
        print(f"kontext-lora: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"kontext-lora: error: file not found: {exc.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
