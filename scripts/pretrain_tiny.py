"""Pretrain the embedded tiny Kontext editor: the weights shipped in kontext_lora/model/tiny_editor/.

Usage: python scripts/pretrain_tiny.py [--out kontext_lora/model/tiny_editor] [--seed 0] [--stage all|vae|transformer]

FLUX.1-Kontext-dev is a pretrained editor: it follows its control image and a LoRA only teaches it a new edit.
The tiny model the examples and tests build is made to behave like that, in miniature:
1. the VAE is trained as an autoencoder on 128^2 images (generated shapes and gradients, and crops of the
   example photos, a fifth of them grey), so that images decode close to themselves; its shift_factor /
   scaling_factor are then calibrated so that latents have mean 0 and std 1, as FLUX.1's constants do for its VAE;
2. the transformer is trained with the project's own Kontext flow-matching objective
   (kontext_lora/train/objective.py) on captioned generic edits of those images: "keep it the same", shifts by
   whole tokens, colour-channel swaps, hue rotation, darker / brighter, warmer / cooler, inverted colours. No edit
   lowers saturation (each pair is checked), so black-and-white is left for a LoRA to learn.
The text encoders stay random (seeded); their embeddings still tell the captions apart. All four model
components are written as float16 safetensors (the tokenizers are built in code).

Everything is seeded; the same command, seed, device and library versions give the same weights. The shipped weights
come from the defaults (`python scripts/pretrain_tiny.py`, seed 0) on one CUDA GPU in float32 with TF32 off: about
7 minutes on an H200 (torch 2.11), where the VAE reconstructs unseen 128^2 images at 28 dB and the transformer
samples "keep it the same" at 31 dB. On a CPU (`--device cpu`, one thread) the same recipe takes many hours.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from kontext_lora.config import LossConfig
from kontext_lora.model.tiny import EDITOR_TRANSFORMER, EDITOR_VAE, build_tiny_pipeline
from kontext_lora.train.objective import LatentBatch, flow_matching_loss, sample_sigmas

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "kontext_lora" / "model" / "tiny_editor"
PHOTOS = REPO / "data_examples" / "bw" / "control"
SIZE = 128  # the example's resolution: 16x16 latents, 8x8 = 64 target tokens
TOKEN = 16  # pixels per transformer token (8x VAE compression x 2x2 patches)
MAX_SEQUENCE_LENGTH = 32  # the example config's model.max_sequence_length
COMPONENTS = ("vae", "transformer", "text_encoder", "text_encoder_2")


# ------------------------------------------------------------------------------------------------------ images


def generated_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field or gradient with 1-6 filled shapes on it: (SIZE, SIZE, 3) float32 in [0, 1]."""
    if rng.random() < 0.5:
        grid = (rng.random((rng.integers(2, 6), rng.integers(2, 6), 3)) * 255).astype(np.uint8)
        background = Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC)
    else:
        start, end = rng.random(3), rng.random(3)
        angle = rng.random() * 2 * math.pi
        y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
        ramp = np.clip((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5, 0, 1)[..., None]
        background = Image.fromarray(((start + (end - start) * ramp) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(background)
    for _ in range(rng.integers(1, 7)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.integers(-16, SIZE, 2)
        w, h = rng.integers(12, 72, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    return np.asarray(background, dtype=np.float32) / 255.0


def photo_crop(photos: list[Image.Image], rng: np.random.Generator) -> np.ndarray:
    """A random square crop (96-256 px, maybe mirrored) of an example photo, resized to SIZE: (SIZE, SIZE, 3)."""
    photo = photos[rng.integers(len(photos))]
    side = int(rng.integers(96, photo.width + 1))
    left, top = (int(v) for v in rng.integers(0, photo.width - side + 1, 2))
    crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32) / 255.0


def image_set(count: int, photo_share: float, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """`count` images, a `photo_share` of them photo crops: (count, size, size, 3) float32 in [0, 1]."""
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]
    images = np.stack([photo_crop(photos, rng) if rng.random() < photo_share else generated_image(rng)
                       for _ in range(count)])  # fmt: skip
    if size != SIZE:  # box-filter downsampling: SIZE / size pixels average into one
        factor = SIZE // size
        images = images.reshape(count, size, factor, size, factor, 3).mean(axis=(2, 4))
    return images


def greyed(images: np.ndarray, rng: np.random.Generator, share: float = 0.2) -> np.ndarray:
    """`images` (N, H, W, 3) with a `share` of them turned grey (luma): an autoencoder, unlike the editor, sees
    every kind of image, black and white included, as the real FLUX VAE did."""
    grey = rng.random(len(images)) < share
    luma = images @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    images = images.copy()
    images[grey] = luma[grey][..., None]
    return images


# ------------------------------------------------------------------------------------------------------- edits


def _hue_rotation(degrees: float) -> np.ndarray:
    """The 3x3 RGB matrix rotating hue about the grey axis (keeps grey grey and, up to clipping, saturation)."""
    theta = math.radians(degrees)
    cos, sin, third = math.cos(theta), math.sin(theta), 1.0 / 3.0
    root = math.sqrt(third)
    return np.array([
        [cos + (1 - cos) * third, third * (1 - cos) - root * sin, third * (1 - cos) + root * sin],
        [third * (1 - cos) + root * sin, cos + third * (1 - cos), third * (1 - cos) - root * sin],
        [third * (1 - cos) - root * sin, third * (1 - cos) + root * sin, cos + third * (1 - cos)],
    ], dtype=np.float32)  # fmt: skip


def _roll(dy: int, dx: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: np.roll(image, (dy * TOKEN, dx * TOKEN), axis=(0, 1))


def _matrix(matrix: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: np.clip(image @ matrix.T, 0.0, 1.0)


# name -> (captions, edit of an (H, W, 3) image in [0, 1]); a pair's caption is drawn from its edit's list.
EDITS: dict[str, tuple[list[str], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (["keep it the same", "leave it unchanged", "no change"], lambda image: image),
    "right": (["move it right", "shift it to the right"], _roll(0, 1)),
    "left": (["move it left", "shift it to the left"], _roll(0, -1)),
    "down": (["move it down", "shift it down"], _roll(1, 0)),
    "up": (["move it up", "shift it up"], _roll(-1, 0)),
    "swap_rb": (["swap red and blue", "exchange the red and blue channels"], lambda image: image[..., ::-1]),
    "hue_120": (["rotate the hue", "shift the colours round"], _matrix(_hue_rotation(120.0))),
    "hue_240": (["rotate the hue backwards", "shift the colours back"], _matrix(_hue_rotation(240.0))),
    "darker": (["make it darker", "darken it"], lambda image: image * 0.6),
    "brighter": (["make it brighter", "brighten it"], lambda image: np.clip(image * 1.5, 0.0, 1.0)),
    "warmer": (["make it warmer", "give it a warm tint"], lambda image: np.clip(image * [1.25, 1.0, 0.75], 0, 1)),
    "cooler": (["make it cooler", "give it a cool tint"], lambda image: np.clip(image * [0.75, 1.0, 1.25], 0, 1)),
    "invert": (["invert the colours", "make a negative"], lambda image: 1.0 - image),
}
IDENTITY_SHARE = 0.25  # "keep it the same" a quarter of the time: the base must above all follow its control


def saturation(images: np.ndarray) -> float:
    """Mean HSV saturation (max - min) / max over RGB of (..., 3) images in [0, 1] (0 where max is 0)."""
    high, low = images.max(axis=-1), images.min(axis=-1)
    return float(np.where(high > 1e-3, (high - low) / np.maximum(high, 1e-3), 0.0).mean())


def edit_pairs(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """One edit per image: (targets like `images`, captions). An edit that would lower the image's saturation below
    80% of the control's (clipping can) is redrawn, so no pair teaches desaturation."""
    names = [name for name in EDITS if name != "identity"]
    targets, captions = np.empty_like(images), []
    for i, image in enumerate(images):
        name = "identity" if rng.random() < IDENTITY_SHARE else names[rng.integers(len(names))]
        while saturation(EDITS[name][1](image)) < 0.8 * saturation(image):
            name = names[rng.integers(len(names))]
        captions_of, edit = EDITS[name]
        targets[i] = edit(image)
        captions.append(captions_of[rng.integers(len(captions_of))])
    return targets, captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of pixels in [-1, 1], taken in [0, 1]."""
    mse = (((a.clamp(-1, 1) - b) / 2) ** 2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-10))


# ---------------------------------------------------------------------------------------------------------- VAE


def train_vae(vae, seed: int, steps: int, batch_size: int, crop: int, lr: float = 2e-3, count: int = 6000) -> None:
    """Autoencoder training on random `crop`^2 crops of `count` images (the VAE is convolutional: it then works at
    SIZE too).

    Loss: L1 + MSE of the reconstruction from the posterior mean with a little noise added (so the decoder also
    renders the slightly-off latents a transformer predicts). The KL term is left out: latents are encoded with
    the distribution's mode and normalised by the calibrated constants, so their scale needs no prior.
    """
    rng = np.random.default_rng(seed)
    device = next(vae.parameters()).device
    images = to_pixels(greyed(image_set(count, 0.3, rng), rng)).to(device)  # (count, 3, SIZE, SIZE)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator).to(device)
        top, left = (int(v) for v in torch.randint(SIZE - crop + 1, (2,), generator=generator))
        batch = images[index][:, :, top : top + crop, left : left + crop]
        latents = vae.encode(batch).latent_dist.mode()
        jitter = torch.randn(latents.shape, generator=generator).to(device)
        latents = latents + 0.05 * latents.detach().std() * jitter
        decoded = vae.decode(latents).sample
        loss = (decoded - batch).abs().mean() + ((decoded - batch) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step:5d} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    vae.eval()


@torch.no_grad()
def calibrate_vae(vae, images: torch.Tensor) -> None:
    """shift_factor / scaling_factor from the raw latents of `images` (N, 3, SIZE, SIZE): mean 0, std 1."""
    images = images.to(next(vae.parameters()).device)
    raw = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    vae.register_to_config(shift_factor=round(raw.mean().item(), 6), scaling_factor=round(1.0 / raw.std().item(), 6))


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, SIZE, SIZE) in [-1, 1] -> (N, 16, SIZE/8, SIZE/8) normalised latents, as the trainer encodes."""
    images = images.to(next(vae.parameters()).device)
    raw = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    return (raw - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(latents[i : i + 64] / vae.config.scaling_factor + vae.config.shift_factor).sample
                      for i in range(0, len(latents), 64)])  # fmt: skip


# -------------------------------------------------------------------------------------------------- transformer


def edit_dataset(
    pipe, seed: int, count: int, size: int = SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` captioned edits of size^2 images, encoded: (control latents, target latents, T5 embeddings, CLIP
    pooled)."""
    rng = np.random.default_rng(seed)
    controls = image_set(count, 0.3, rng, size)
    targets, captions = edit_pairs(controls, rng)
    unique = sorted(set(captions))
    with torch.no_grad():
        prompt_embeds, pooled_embeds, _ = pipe.encode_prompt(
            prompt=unique, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    index = torch.tensor([unique.index(caption) for caption in captions], device=prompt_embeds.device)
    return (encode(pipe.vae, to_pixels(controls)), encode(pipe.vae, to_pixels(targets)),
            prompt_embeds[index], pooled_embeds[index])  # fmt: skip


def train_transformer(transformer, data, seed: int, steps: int, batch_size: int, lr: float) -> None:
    """Kontext flow matching (the trainer's own loss, sigmas drawn uniformly) on the encoded edits in `data`."""
    controls, targets, prompt_embeds, pooled_embeds = data
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    loss_config = LossConfig(timestep_sampling="uniform")  # a base must denoise well at every noise level
    transformer.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        index = torch.randint(len(targets), (batch_size,), generator=generator)
        batch = LatentBatch(targets[index], [controls[index]], prompt_embeds[index], pooled_embeds[index]).to(device)
        noise = torch.randn(batch.target_latents.shape, generator=generator).to(device)
        sigmas = sample_sigmas(batch_size, generator, loss=loss_config).to(device)
        loss = flow_matching_loss(transformer, batch, sigmas, noise, guidance=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 100 == 0 or step == steps - 1:
            print(f"transformer step {step + 1:5d} loss {running / ((step % 100) + 1):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            running = 0.0
    transformer.eval()


@torch.no_grad()
def heldout_losses(transformer, data) -> tuple[float, float]:
    """Flow-matching loss on held-out edits at fixed sigmas and noise: (with its own control, with another's)."""
    controls, targets, prompt_embeds, pooled_embeds = data
    noise = torch.randn(targets.shape, generator=torch.Generator().manual_seed(123)).to(targets.device)
    own, other = 0.0, 0.0
    for sigma in (0.25, 0.5, 0.75):
        sigmas = torch.full((len(targets),), sigma, device=targets.device)
        for shift, name in ((0, "own"), (1, "other")):
            batch = LatentBatch(targets, [controls.roll(shift, dims=0)], prompt_embeds, pooled_embeds)
            value = flow_matching_loss(transformer, batch, sigmas, noise, guidance=1.0).item() / 3
            own, other = (own + value, other) if name == "own" else (own, other + value)
    return own, other


# ------------------------------------------------------------------------------------------------------- saving


def save_component(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {key: value.detach().to("cpu", torch.float16).contiguous() for key, value in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_component(module: torch.nn.Module, path: Path) -> None:
    module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the four .safetensors files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=("all", "vae", "transformer"), default="all",
                        help="transformer: reuse the VAE and text encoders already in --out")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-crop", type=int, default=64, help="side of the random crops the VAE trains on")
    parser.add_argument("--small-steps", type=int, default=5000, help="transformer steps on 64^2 edits (4x4 tokens)")
    parser.add_argument("--small-batch", type=int, default=128)
    parser.add_argument("--small-pairs", type=int, default=24000, help="captioned 64^2 edits")
    parser.add_argument("--transformer-steps", type=int, default=3000, help="then transformer steps on 128^2 edits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8000, help="captioned 128^2 edits")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one thread: the same float sums on every machine (and faster on a shared CPU)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on a CPU
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = build_tiny_pipeline(args.seed, EDITOR_TRANSFORMER, EDITOR_VAE).to(args.device)  # random text encoders
    if args.stage in ("all", "vae"):
        start = time.perf_counter()
        train_vae(pipe.vae, args.seed, args.vae_steps, batch_size=args.vae_batch, crop=args.vae_crop)
        check = to_pixels(image_set(256, 0.3, np.random.default_rng(args.seed + 1000)))  # unseen images
        calibrate_vae(pipe.vae, check)
        save_component(pipe.vae, args.out / "vae.safetensors", {
            "shift_factor": str(pipe.vae.config.shift_factor), "scaling_factor": str(pipe.vae.config.scaling_factor),
        })  # fmt: skip
        for name in ("text_encoder", "text_encoder_2"):
            save_component(getattr(pipe, name), args.out / f"{name}.safetensors")
        print(f"vae trained in {time.perf_counter() - start:.0f} s", flush=True)
    # Continue from the saved float16 weights, exactly what the shipped pipeline will hold.
    vae_file = args.out / "vae.safetensors"
    load_component(pipe.vae, vae_file)
    from safetensors import safe_open

    with safe_open(str(vae_file), "pt") as handle:
        meta = handle.metadata()
    pipe.vae.register_to_config(shift_factor=float(meta["shift_factor"]), scaling_factor=float(meta["scaling_factor"]))
    for name in ("text_encoder", "text_encoder_2"):
        load_component(getattr(pipe, name), args.out / f"{name}.safetensors")
    pipe.vae.eval()
    rng = np.random.default_rng(args.seed + 1000)
    check = to_pixels(image_set(64, 0.3, rng))
    grey = to_pixels(greyed(image_set(64, 0.3, rng), rng, share=1.0))
    print(
        f"vae: PSNR {psnr(decode(pipe.vae, encode(pipe.vae, check)).cpu(), check):.1f} dB on unseen images, "
        f"{psnr(decode(pipe.vae, encode(pipe.vae, grey)).cpu(), grey):.1f} dB on grey ones",
        flush=True,
    )
    if args.stage == "vae":
        return

    heldout = edit_dataset(pipe, args.seed + 2, 64)
    phases = (
        (SIZE // 2, args.small_steps, args.small_pairs, args.small_batch, 1e-3),
        (SIZE, args.transformer_steps, args.pairs, args.batch, 5e-4),
    )
    for size, steps, pairs, batch_size, lr in phases:
        start = time.perf_counter()
        train_data = edit_dataset(pipe, args.seed + size, pairs, size)
        print(f"encoded {pairs} edits at {size}^2 in {time.perf_counter() - start:.0f} s", flush=True)
        train_transformer(pipe.transformer, train_data, args.seed + size, steps, batch_size=batch_size, lr=lr)
        own, other = heldout_losses(pipe.transformer, heldout)
        print(f"after {size}^2: held-out loss {own:.4f} with its own control, {other:.4f} with another's", flush=True)
        save_component(pipe.transformer, args.out / "transformer.safetensors")  # each phase's result, in case
    load_component(pipe.transformer, args.out / "transformer.safetensors")
    own, other = heldout_losses(pipe.transformer, heldout)
    print(f"transformer: held-out loss {own:.4f} with its own control, {other:.4f} with another's "
          f"({other / own:.2f}x)")  # fmt: skip
    print(f"sampled 'keep it the same' (8 steps): PSNR {sampled_identity_psnr(pipe):.1f} dB to the control")


@torch.no_grad()
def sampled_identity_psnr(pipe, count: int = 8, steps: int = 8) -> float:
    """Mean PSNR of `count` unseen images against what the pipeline samples for them with "keep it the same":
    how well the base follows its control when it edits, as validation and `infer` run it."""
    images = image_set(count, 0.5, np.random.default_rng(7))
    pipe.set_progress_bar_config(disable=True)
    scores = []
    for i, image in enumerate(images):
        output = pipe(
            image=Image.fromarray((image * 255).round().astype(np.uint8)), prompt="keep it the same", height=SIZE,
            width=SIZE, max_area=SIZE * SIZE, _auto_resize=False, num_inference_steps=steps, guidance_scale=1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np", generator=torch.Generator().manual_seed(i),
        ).images[0]  # fmt: skip
        scores.append(psnr(to_pixels(output[None].astype(np.float32)), to_pixels(image[None])))
    return float(np.mean(scores))


if __name__ == "__main__":
    main()
