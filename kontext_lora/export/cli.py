"""Command-line entry points of the export package: `export`, `merge`, `resize`.

Each takes the arguments after its subcommand and returns an exit code: 0 on success, 2 for a problem the user can
fix (missing file, unknown format, keys no reader handles), printed as one line on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from kontext_lora.export.formats import EXPORT_FORMATS, FormatError, comfyui_log_line


class _UsageError(Exception):
    """argparse's complaint, raised instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _run(prog: str, parser: argparse.ArgumentParser, argv: list[str], body: Callable[[argparse.Namespace], int]) -> int:
    """Parse, run `body`, and turn user errors into one stderr line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s")
    try:
        args = parser.parse_args(argv)
        return body(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except _UsageError as exc:
        print(f"{prog}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    except (FormatError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        message = f"file not found: {exc.filename}" if isinstance(exc, FileNotFoundError) and exc.filename else exc
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------ export


def export_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kontext-lora export", description="Write a LoRA in diffusers, kohya and/or ComfyUI format.")
    parser.add_argument("--lora", required=True, help="LoRA safetensors file: ours, or kohya/ComfyUI/ai-toolkit/fal")
    parser.add_argument("--format", required=True, choices=[*EXPORT_FORMATS, "all"], help="format to write")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--name", help="stem of the kohya/ComfyUI file names (default: the run folder's name)")
    parser.add_argument("--no-card", action="store_true", help="do not write README.md")
    return parser


def export_main(argv: list[str]) -> int:
    """`kontext-lora export --lora IN --format diffusers|kohya|comfyui|all --out DIR`."""

    def body(args: argparse.Namespace) -> int:
        from kontext_lora.export.formats import write_exports

        formats = EXPORT_FORMATS if args.format == "all" else (args.format,)
        written = write_exports(args.lora, args.out, formats, name=args.name, card=not args.no_card)
        for kind, path in written.items():
            print(f"{kind}: {path}")
        if "comfyui" in written:
            print(comfyui_log_line(written["comfyui"], args.lora))
        return 0

    return _run("kontext-lora export", export_parser(), argv, body)


# ------------------------------------------------------------------------------------------------- merge


def _lora_and_scale(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:SCALE` (an existing file whose name has a colon stays whole)."""
    path, _, scale = text.rpartition(":")
    if path and not Path(text).is_file():
        try:
            return path, float(scale)
        except ValueError:
            if "/" not in scale and "\\" not in scale:  # `f:abc` is a bad strength; `C:\\x` a Windows path
                raise argparse.ArgumentTypeError(
                    f"{text}: the strength after ':' must be a number, not {scale!r} (FILE[:SCALE], e.g. {path}:0.8)"
                ) from None
    return text, 1.0


def merge_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kontext-lora merge", description="Fuse LoRAs into the base transformer and save it.")
    parser.add_argument("--base", required=True, help="diffusers folder of the pipeline (or of its transformer)")
    parser.add_argument(
        "--lora", required=True, action="append", type=_lora_and_scale, metavar="FILE[:SCALE]",
        help="LoRA file, any supported format, with an optional strength (default 1.0); repeat to merge several",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file (bfl)")
    parser.add_argument("--format", default="diffusers", choices=["diffusers", "bfl"], help="what to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    return parser


def merge_main(argv: list[str]) -> int:
    """`kontext-lora merge --base DIR --lora FILE[:SCALE] ... --out PATH [--format diffusers|bfl]`."""

    def body(args: argparse.Namespace) -> int:
        import torch
        from diffusers import FluxTransformer2DModel

        from kontext_lora.export.formats import read_adapter
        from kontext_lora.export.merge import merge_loras, save_merged

        base = Path(args.base)
        if not base.is_dir():
            raise FormatError(f"{base}: not a folder (give the diffusers folder of the base model)")
        adapters = [(read_adapter(path), scale) for path, scale in args.lora]  # read all before the slow load
        subfolder = "transformer" if (base / "transformer").is_dir() else None
        try:
            transformer = FluxTransformer2DModel.from_pretrained(
                base, subfolder=subfolder, torch_dtype=getattr(torch, args.dtype)
            )
        except (OSError, ValueError) as exc:
            raise FormatError(f"{base}: cannot load a FLUX transformer ({str(exc).splitlines()[0]})") from None
        merge_loras(transformer, adapters)
        loras = [{"file": path, "scale": scale} for path, scale in args.lora]
        record = {"base_model": str(base), "loras": loras, "dtype": args.dtype}
        print(save_merged(transformer, args.out, args.format, record))
        return 0

    return _run("kontext-lora merge", merge_parser(), argv, body)


# ------------------------------------------------------------------------------------------------ resize


def resize_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kontext-lora resize", description="Change a LoRA's rank by SVD; reports the energy kept.")
    parser.add_argument("--lora", required=True, help="LoRA safetensors file, any supported format")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="new rank of every module")
    target.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction (e.g. 0.99)")
    parser.add_argument("--out", required=True, help="output .safetensors file (diffusers format)")
    return parser


def resize_main(argv: list[str]) -> int:
    """`kontext-lora resize --lora IN (--rank K | --energy F) --out FILE`; prints the energy kept."""

    def body(args: argparse.Namespace) -> int:
        from kontext_lora.export.formats import read_adapter, write_format
        from kontext_lora.export.merge import resize_adapter

        resized, report = resize_adapter(read_adapter(args.lora), rank=args.rank, energy=args.energy)
        print(report.summary())
        print(write_format(resized, "diffusers", args.out))
        return 0

    return _run("kontext-lora resize", resize_parser(), argv, body)
