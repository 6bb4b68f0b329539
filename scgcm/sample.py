"""`python -m scgcm.sample --workdir DIR [--mode onestep|twostep|multistep|heun] [--num N] [--out FILE.npz]`

Loads a checkpoint of a run (the latest, the best by FID of a mode, or a given step), takes its EMA
weights (or the raw ones with --no-ema), and writes uint8 images [N, h, w, c] to an .npz, a PNG grid
and optionally a folder of PNGs. Image i depends only on (seed, i). With --fid it also prints their
FID (the computation of `scgcm.fid` and of training) and improved precision/recall (k = 3), against
--fid-ref, --fid-source or the run's data.

The protocol of the papers: `--fid --repeats 3 --num 50000` evaluates the disjoint image ranges
0–49,999, 50,000–99,999 and 100,000–149,999 (or --seed-starts), prints each FID, their minimum
(what EDM reports) and mean ± std, and writes them to <out>.fid.json. `--search-two-step-sigma`
searches the intermediate σ of two-step sampling for the lowest FID (golden-section search in log σ
over --search-range, --search-probes FIDs of --num images each), and writes each probe to
DIR/samples/two_step_sigma_<step>.json and a plot of FID against σ beside it.
`--checkpoint phema_0.080` samples an EMA reconstructed by `python -m scgcm.phema`.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from PIL import Image

from scgcm.errors import UserError
from scgcm.eval import fid
from scgcm.eval.fid import Scores
from scgcm.eval.plot import plot_lines
from scgcm.eval.protocol import golden_section_search, seed_ranges, summarize
from scgcm.eval.scores import describe_scores, image_scores
from scgcm.parallel import distributed as distributed_lib
from scgcm.parallel.generate import Mode, generate
from scgcm.parallel.mesh import make_mesh, replicate
from scgcm.run.config import TrainConfig
from scgcm.run.load import load_run_config, load_state, run_extractor, run_network, run_reference, run_sampler
from scgcm.run.rundir import dumps_finite, save_grid, use_compile_cache


@dataclass(frozen=True)
class SampleArgs:
    workdir: str
    """Run directory written by scgcm.train."""
    checkpoint: str = "latest"
    """'latest', 'best' (lowest FID of --mode; 'best_onestep' etc. names a mode), a step number, or
    'phema_<σ_rel>' (an EMA reconstructed by `python -m scgcm.phema`)."""
    ema: bool = True
    """Use the EMA weights (--no-ema for the raw ones)."""
    mode: Mode = "onestep"
    """Sampler: one consistency step, two steps, several steps through --sigmas, or EDM Heun through the score head."""
    two_step_sigma: float | None = None
    """Intermediate σ of two-step sampling (default: the run's, reference 0.661; iCT 0.821)."""
    sigmas: tuple[float, ...] = (80.0, 0.661)
    """Decreasing σ levels of multistep sampling."""
    heun_steps: int | None = None
    """Noise levels of the Heun sampler (default: the run's, 18)."""
    num: int = 64
    """Number of images."""
    batch_size: int = 256
    """Images per device batch (global)."""
    seed: int = 0
    """Seed: image i comes from fold_in(key(seed), i)."""
    out: str | None = None
    """.npz of uint8 images [N, h, w, c] (default: DIR/samples/<mode>_<step>_seed<seed>.npz); with
    --repeats R it holds the R ranges one after the other, and --fid writes <out>.fid.json beside it."""
    png_dir: str | None = None
    """Also write each image as a PNG into this folder."""
    grid: str | None = None
    """PNG grid of the first 64 images (default: next to --out)."""
    fid: bool = False
    """Also print the FID of the images (standard Inception features; comparable numbers need --num 50000)."""
    fid_ref: str | None = None
    """Reference statistics .npz for --fid (from `python -m scgcm.fid ref --out`)."""
    repeats: int = 1
    """With --fid: evaluate this many disjoint ranges of --num images (EDM reports the minimum of 3)."""
    seed_starts: tuple[int, ...] = ()
    """First image index of each repeat (default 0, num, 2·num, …); image i comes from fold_in(key(seed), i)."""
    search_two_step_sigma: bool = False
    """Search the two-step intermediate σ with the lowest FID of --num images (implies --fid and twostep)."""
    search_range: tuple[float, float] = (0.1, 5.0)
    """Interval of σ for --search-two-step-sigma."""
    search_probes: int = 10
    """FID evaluations of --search-two-step-sigma (the bracket shrinks by 0.618 per probe)."""
    fid_source: str | None = None
    """Without --fid-ref: dataset whose train split gives the reference (default: the run's training data); cached."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto' ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/scgcm/xla), a folder, or 'off'."""
    distributed: distributed_lib.Mode = "auto"
    """Join a multi-process run (as scgcm.train's --config.distributed): every process samples its share of
    the images on its devices, all gather them, process 0 writes and prints."""
    coordinator: str | None = None
    """Multi-process: process 0's HOST:PORT (or JAX_COORDINATOR_ADDRESS)."""
    num_processes: int | None = None
    """Multi-process: the number of processes (or JAX_NUM_PROCESSES)."""
    process_id: int | None = None
    """Multi-process: this process's index (or JAX_PROCESS_ID)."""
    distributed_timeout: int = 300
    """Multi-process: seconds to wait for every process to join."""


def reference(args: SampleArgs, cfg: TrainConfig, extractor: fid.Extractor) -> tuple[fid.Stats, np.ndarray | None, str]:
    """`run_reference` of --fid-ref or --fid-source (which exclude each other)."""
    if args.fid_ref and args.fid_source:
        raise UserError("--fid-ref and --fid-source exclude each other: the reference is either a file or a dataset")
    return run_reference(cfg, extractor, args.fid_ref, args.fid_source)


def search_two_step_sigma(args: SampleArgs, cfg: TrainConfig, model, step: int, workdir: Path,
                          scorer: Callable[[np.ndarray], Scores], mesh=None) -> int:
    """The σ search: each probe samples --num two-step images and scores them; prints, JSON, plot (process 0).
    Every process scores every probe: the next probe's σ, and so the next collective, depends on it."""
    say = print if jax.process_index() == 0 else lambda *a, **k: None
    label = fid.fid_label(args.num, run_network(cfg))
    probes = []

    def objective(sigma: float) -> float:
        sampler = run_sampler(cfg, "twostep", two_step_sigma=jnp.asarray(sigma, jnp.float32))  # traced: one compile
        images = generate(model, sampler, seed=args.seed, num=args.num, batch_size=args.batch_size, progress=True,
                          mesh=mesh)
        result = scorer(images)
        probes.append({"sigma": sigma, **result})
        say(f"σ {sigma:.4f}: {label} {describe_scores({'twostep': result})}", flush=True)
        return result["fid"]

    best, value, _ = golden_section_search(objective, *args.search_range, probes=args.search_probes)
    if jax.process_index() != 0:
        return 0
    out = workdir / "samples" / f"two_step_sigma_{step:07d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps_finite({"step": step, "num": args.num, "seed": args.seed, "range": list(args.search_range),
                                 "probes": probes, "best_sigma": best, "best_fid": value}, indent=2) + "\n")
    plot_lines({"twostep": [(p["sigma"], p["fid"]) for p in probes]}, out.with_suffix(".png"),
               xlabel="two-step intermediate σ", ylabel=f"{label}, step {step}")
    print(f"best two-step σ {best:.4f}: {label} {value:.4f} ({len(probes)} probes) -> {out}, {out.with_suffix('.png')}")
    return 0


def check_args(args: SampleArgs) -> None:
    """Each bad input is a one-line UserError naming its flag, raised before anything is loaded."""
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--heun-steps", args.heun_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if args.fid or args.search_two_step_sigma:
        fid.check_sample_count(args.num, "--num")
    if args.repeats != 1 and not args.fid:
        raise UserError("--repeats needs --fid")
    seed_ranges(args.num, args.repeats, args.seed_starts)
    if args.search_two_step_sigma:
        lo, hi = args.search_range
        if not 0 < lo < hi:
            raise UserError(f"--search-range must be 0 < LO < HI (got {lo} {hi})")
        if args.search_probes < 2:
            raise UserError(f"--search-probes must be at least 2 (got {args.search_probes})")
        if args.repeats != 1:
            raise UserError("--search-two-step-sigma takes one range of --num images; drop --repeats")
    if not Path(args.workdir).is_dir():
        raise UserError(f"--workdir {args.workdir}: no such directory")


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input raises UserError (run through scgcm.errors.run_cli: one line, exit code 2)."""
    args = tyro.cli(SampleArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    check_args(args)
    workdir = Path(args.workdir)
    cfg = load_run_config(workdir)
    use_compile_cache(args.compile_cache)
    distributed_lib.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id,
                               init_timeout=args.distributed_timeout)
    state, step = load_state(workdir, cfg, args.checkpoint, args.mode)  # a missing step stops us before any network
    if args.fid or args.search_two_step_sigma:  # the reference before sampling: a missing file or dataset stops us first
        extractor = run_extractor(cfg, args.batch_size)  # Inception: built only when features are needed
        ref_stats, ref_features, ref_name = reference(args, cfg, extractor)
        scorer = lambda images: image_scores(images, ref_stats, fid.resolve(extractor), ref_features)
    model = state.ema if args.ema else state.model
    mesh = None  # one process: all its devices
    if jax.process_count() > 1:  # every process's devices, the weights replicated on all of them
        mesh = make_mesh()
        model = replicate(model, mesh)
    if args.search_two_step_sigma:
        return search_two_step_sigma(args, cfg, model, step, workdir, scorer, mesh)
    sampler = run_sampler(cfg, args.mode, two_step_sigma=args.two_step_sigma, sigmas=args.sigmas,
                          heun_steps=args.heun_steps)
    ranges = seed_ranges(args.num, args.repeats, args.seed_starts)
    per_range = [generate(model, sampler, seed=args.seed, num=args.num, batch_size=args.batch_size, progress=True,
                          start=first, mesh=mesh) for first, _ in ranges]
    images = np.concatenate(per_range)
    if jax.process_index() != 0:  # every process holds all the images: process 0 scores and writes them
        return 0

    out = Path(args.out) if args.out else workdir / "samples" / f"{args.mode}_{step:07d}_seed{args.seed}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images)
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    save_grid(images[:64], grid)
    if args.png_dir:
        folder = Path(args.png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    print(f"{len(images)} images ({args.mode}, step {step}, {'EMA' if args.ema else 'raw'} weights) -> {out}, grid {grid}")
    if args.fid:
        label = fid.fid_label(args.num, run_network(cfg))
        results = []
        for (first, last), imgs in zip(ranges, per_range):
            result = scorer(imgs)
            results.append({"first": first, "last": last, **result})
            pr = f", precision {result['precision']:.4f}, recall {result['recall']:.4f}" if "precision" in result else ""
            print(f"{label}: {result['fid']:.4f} (images {first}–{last}, {args.mode}, step {step}, against {ref_name}){pr}")
        summary = {name: summarize([r[name] for r in results]) for name in ("fid", "precision", "recall")
                   if all(name in r for r in results)}
        if args.repeats > 1:
            s = summary["fid"]
            print(f"{label} over {args.repeats} ranges: min {s['min']:.4f}, mean {s['mean']:.4f} ± {s['std']:.4f}")
        record = {"checkpoint": args.checkpoint, "step": step, "mode": args.mode, "ema": args.ema, "seed": args.seed,
                  "num": args.num, "label": label, "reference": ref_name, "repeats": results, **summary}
        out.with_suffix(".fid.json").write_text(dumps_finite(record, indent=2) + "\n")
        print(f"wrote {out.with_suffix('.fid.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(distributed_lib.run_cli_or_leave(main))
