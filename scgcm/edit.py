"""`python -m scgcm.edit --workdir RUN --task T [--input IMAGES] [--mask ...] [--factor ...] --seed S --out edited.npz`

Zero-shot editing with a trained run (Song et al. 2023, Algorithm 4; `scgcm.core.editing` holds the math,
`scgcm.parallel.editing` the batches):
inpaint, colorize, superres (the output keeps the known pixels, luminance or block means exactly),
stroke (SDEdit from a coarse painting), denoise (Gaussian noise of a known σ) and interpolate
(spherical interpolation between two latents). `--sampler heun` runs the same projections through the
score head's Heun sampler. Writes an .npz (results as `images`, plus `inputs`, `given`, `index` and `known`,
1 where a coefficient of A·y is kept; all uint8 [N, H, W, C]) and a PNG grid with one row per image: input,
what the model was given, result. A grey image file in an --input folder for an RGB model is decoded with
its grey level in every channel, and a one-line warning says so.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from scgcm.core import editing as E
from scgcm.data.images import ImageArrayError, read_image_file, to_model_range, to_uint8_nhwc
from scgcm.data.sources import DataError, load_images
from scgcm.errors import UserError, run_cli
from scgcm.parallel.editing import edit_images, interpolate_rows
from scgcm.run.load import check_checkpoint_name, load_run_config, load_state
from scgcm.run.rundir import save_grid, use_compile_cache

Task = Literal["inpaint", "colorize", "superres", "stroke", "interpolate", "denoise"]
REGIONS = ("center", "left", "right", "top", "bottom")
MASK_STREAM = 2**31 - 1  # fold_in index of the random-mask key (edit noise uses 0, 1, 2, …)


@dataclass(frozen=True)
class EditArgs:
    workdir: str
    """Run directory written by scgcm.train."""
    task: Task
    """inpaint, colorize, superres, stroke (SDEdit), denoise, or interpolate (needs no --input)."""
    input: str | None = None
    """Images to edit, any source the trainer reads: .npz of uint8 images, image folder, cifar-10-batches-py, tar.gz."""
    split: str = "test"
    """Split of --input when it has several (CIFAR-10 batches)."""
    index: tuple[int, ...] = ()
    """Indices of the images in --input (default: the first --num)."""
    num: int = 8
    """Number of images (the first ones) when --index is not given; rows of --task interpolate."""
    mask: str = "center"
    """inpaint: the missing region, center (half-size box), left, right, top, bottom, random (--mask-rate),
    or an image file the size of the model's images (white = missing)."""
    mask_rate: float = 0.5
    """--mask random: fraction of pixels missing (each image its own mask, from the seed and its index)."""
    factor: int | None = None
    """superres: downsampling factor, 2 or 4 (default 2); stroke: block size of the coarse painting (default 4)."""
    stroke_input: bool = False
    """stroke: --input images are the paintings (default: paintings made from them: block means, 4 levels per channel)."""
    noise_sigma: float | None = None
    """stroke: noise level the painting starts from (default 1.5); denoise: σ of the noise added to --input (default 0.3)."""
    num_frames: int = 8
    """interpolate: frames per row, the two ends included."""
    sampler: Literal["consistency", "heun"] = "consistency"
    """consistency steps (Algorithm 4) or EDM's Heun sampler through the score head, projected after every step."""
    sigmas: tuple[float, ...] | None = None
    """Decreasing σ of the consistency steps (default: the first 17 of the 18-level Karras grid, 80 … 0.0075
    for the run's σ range; interpolate: σ_max only). stroke/denoise start at --noise-sigma and use those below it."""
    heun_steps: int | None = None
    """Noise levels of the Heun sampler (default: the run's)."""
    checkpoint: str = "latest"
    """'latest', 'best' or 'best_<mode>' (lowest FID), or a step number."""
    ema: bool = True
    """Use the EMA weights (--no-ema for the raw ones)."""
    seed: int = 0
    """Seed: image i of --input uses fold_in(key(seed), i); interpolation row i goes from one-step sample 2i to 2i + 1."""
    batch_size: int = 64
    """Images per batch (global)."""
    out: str | None = None
    """.npz to write (default: RUN/edits/<task>_<sampler>_<step>_seed<seed>.npz)."""
    grid: str | None = None
    """PNG grid (default: next to --out)."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto', a folder, or 'off'."""


def _check_sigmas(sigmas: tuple[float, ...], sigma_min: float, sigma_max: float) -> None:
    if not sigmas:
        raise UserError("--sigmas: give at least one level")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= sigma_min or sigmas[0] > sigma_max:
        raise UserError(f"--sigmas {' '.join(map(str, sigmas))}: must decrease strictly, within ({sigma_min}, {sigma_max}]")


def _load_mask(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    try:
        missing = read_image_file(path, "L", (w, h))[..., 0] >= 128  # the size is checked before decoding
    except ImageArrayError as e:
        raise UserError(f"--mask {e}") from None
    return np.broadcast_to(1.0 - missing.astype(np.float32), shape).copy()


def validate(args: EditArgs, cfg) -> None:
    """Everything that can be checked without the checkpoint; one line naming the flag."""
    m = cfg.model
    if args.num < 1:
        raise UserError(f"--num {args.num}: must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.task == "interpolate" and args.num_frames < 2:
        raise UserError(f"--num-frames {args.num_frames}: must be at least 2")
    if args.task == "colorize" and m.channels != 3:
        raise UserError(f"--task colorize needs an RGB model; {args.workdir} has {m.channels} channel(s)")
    if args.task == "inpaint" and args.mask == "random" and not 0 < args.mask_rate < 1:
        raise UserError(f"--mask-rate {args.mask_rate}: must be in (0, 1)")
    if args.task == "inpaint" and args.mask not in (*REGIONS, "random") and not Path(args.mask).is_file():
        raise UserError(f"--mask {args.mask}: neither one of {', '.join(REGIONS)}, random nor an image file")
    if args.task == "superres" and (args.factor or 2) not in (2, 4):
        raise UserError(f"--factor {args.factor}: superres supports 2 or 4")
    if args.task == "stroke" and args.factor is not None and args.factor < 1:
        raise UserError(f"--factor {args.factor}: must be at least 1")
    factor = args.factor or (2 if args.task == "superres" else 4)
    if args.task in ("superres", "stroke") and m.image_size % factor != 0:
        raise UserError(f"--factor {factor}: does not divide the image size {m.image_size}")
    if args.noise_sigma is not None and not m.sigma_min < args.noise_sigma <= m.sigma_max:
        raise UserError(f"--noise-sigma {args.noise_sigma}: must be in ({m.sigma_min}, {m.sigma_max}]")
    if args.sigmas is not None:
        _check_sigmas(args.sigmas, m.sigma_min, m.sigma_max)
    if args.heun_steps is not None and args.heun_steps < 2:
        raise UserError(f"--heun-steps {args.heun_steps}: must be at least 2")
    check_checkpoint_name(args.checkpoint)
    if args.out is not None and not args.out.endswith(".npz"):
        raise UserError(f"--out {args.out}: must end in .npz")
    if args.grid is not None and not args.grid.lower().endswith(".png"):
        raise UserError(f"--grid {args.grid}: must end in .png")
    if args.task != "interpolate" and args.input is None:
        raise UserError(f"--input is required by --task {args.task}")


def select_images(args: EditArgs, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, h, w, c] images, their indices in --input), or a one-line error naming --input/--index/--num."""
    m = cfg.model
    try:
        images = load_images(args.input, split=args.split, image_size=m.image_size, channels=m.channels, flag="--input")
    except DataError as e:
        raise UserError(f"--input: {e}") from None
    if args.index:
        bad = [i for i in args.index if not 0 <= i < len(images)]
        if bad:
            raise UserError(f"--index {bad[0]}: out of range, --input {args.input} has {len(images)} images")
        indices = np.asarray(args.index, np.int64)
    else:
        if args.num > len(images):
            raise UserError(f"--num {args.num}: --input {args.input} has only {len(images)} images")
        indices = np.arange(args.num)
    return images[indices], indices


def task_arrays(args: EditArgs, images: np.ndarray, indices: np.ndarray, shape: tuple[int, int, int]):
    """(amap, known, given, y, shown) for a task: float32 [n, c, h, w] arrays; `shown` is what the grid
    shows as the model's input (None: the start itself, for denoising)."""
    c = shape[0]
    y = to_model_range(images)
    amap, known = E.identity_map(c), np.zeros_like(y)
    if args.task == "inpaint":
        if args.mask == "random":
            base = jr.key(args.seed)
            keys = [jr.fold_in(jr.fold_in(base, int(i)), MASK_STREAM) for i in indices]
            known = np.stack([np.asarray(E.random_known(k, shape, args.mask_rate)) for k in keys])
        elif args.mask in REGIONS:
            known = np.broadcast_to(E.region_known(shape, args.mask), y.shape).copy()
        else:
            known = np.broadcast_to(_load_mask(Path(args.mask), shape), y.shape).copy()
    elif args.task == "colorize":
        amap, known = E.luminance_map(), np.broadcast_to(E.luminance_known(shape), y.shape).copy()
    elif args.task == "superres":
        factor = args.factor or 2
        amap, known = E.block_mean_map(c, factor), np.broadcast_to(E.block_mean_known(shape, factor), y.shape).copy()
    if args.task in ("inpaint", "colorize", "superres"):
        given = np.asarray(jax.vmap(E.given_image, in_axes=(None, 0, 0))(amap, jnp.asarray(y), jnp.asarray(known)))
        shown = np.asarray(E.gray(jnp.asarray(y))) if args.task == "colorize" else given
        return amap, known, given, y, shown
    if args.task == "stroke":
        painting = images if args.stroke_input else E.coarse_painting(images, args.factor or 4)
        given = to_model_range(painting)
        return amap, known, given, given, given
    return amap, known, y, y, None  # denoise: start = y + σ·z, shown as given


def make_editor(args: EditArgs, cfg) -> E.Editor:
    m = cfg.model
    start = m.sigma_max
    if args.task in ("stroke", "denoise"):
        start = args.noise_sigma if args.noise_sigma is not None else {"stroke": 1.5, "denoise": 0.3}[args.task]
    if args.sampler == "heun":
        return E.heun_editor(args.heun_steps or cfg.sample.heun_steps, m.sigma_min, start)
    if args.task == "interpolate" and args.sigmas is None:
        sigmas = (m.sigma_max,)
    else:
        sigmas = args.sigmas or E.default_sigmas(m.sigma_min, m.sigma_max)
    if args.task in ("stroke", "denoise"):
        sigmas = (start, *(s for s in sigmas if s < start))
    return E.ConsistencyEditor(jnp.asarray(sigmas, jnp.float32), m.sigma_min)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.asarray(to_uint8_nhwc(jnp.asarray(x)))


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(EditArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        raise UserError(f"--workdir {workdir}: no config.json, not a run directory written by scgcm.train")
    cfg = load_run_config(workdir)
    validate(args, cfg)
    m = cfg.model
    shape = (m.channels, m.image_size, m.image_size)
    if args.task != "interpolate":
        images, indices = select_images(args, cfg)
        amap, known, given, y, shown = task_arrays(args, images, indices, shape)
    editor = make_editor(args, cfg)
    use_compile_cache(args.compile_cache)
    try:
        state, step = load_state(workdir, cfg, args.checkpoint)
    except SystemExit as e:  # load_state's own one-line messages
        raise UserError(str(e.code).removeprefix("error: ")) from None
    model = state.ema if args.ema else state.model

    out = Path(args.out) if args.out else workdir / "edits" / f"{args.task}_{args.sampler}_{step:07d}_seed{args.seed}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    if args.task == "interpolate":
        frames = interpolate_rows(model, args.num, args.num_frames, seed=args.seed, editor=editor, shape=shape,
                                    batch_size=args.batch_size)
        result = _u8(frames.reshape(-1, *shape))
        np.savez_compressed(out, images=result, num_frames=args.num_frames, seed=args.seed)
        save_grid(result, grid, nrow=args.num_frames)
    else:
        start, edited = edit_images(model, given, y, known, indices, seed=args.seed, editor=editor, amap=amap,
                                      batch_size=args.batch_size)
        result, shown_u8 = _u8(edited), _u8(start if shown is None else shown)
        np.savez_compressed(out, images=result, inputs=images, given=shown_u8, index=indices,
                            known=known.astype(np.uint8).transpose(0, 2, 3, 1), seed=args.seed)  # NHWC, as the images
        save_grid(np.stack([images, shown_u8, result], axis=1).reshape(-1, *result.shape[1:]), grid, nrow=3)
    print(f"{args.task} ({args.sampler}, step {step}, {'EMA' if args.ema else 'raw'} weights): "
          f"{len(result)} images -> {out}, grid {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
