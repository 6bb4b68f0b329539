"""FID of a dataset or of samples (`scgcm.eval.fid`):

    python -m scgcm.fid ref [--source S] [--split train] [--out stats.npz] [--network auto|inception|digits]
    python -m scgcm.fid calc SAMPLES [--ref stats.npz | --source S] [--network auto|inception|digits]

SAMPLES is an `.npz` (key "images", else its first array) or a folder of PNGs; image arrays follow
`scgcm.data.images.as_nhwc_uint8` (uint8 NHWC or NCHW, 1 or 3 channels, any size: Inception resizes to
299×299; samples in [-1, 1] go through `scgcm.data.images.to_uint8` first). Reference statistics of a
dataset are cached next to the weights, keyed by the data's content (`scgcm.eval.statcache`). Fewer than
2 images are refused; fewer than 2,048 give a biased FID, with a warning. See fid.md for the standard.
`calc` also prints improved precision/recall (k = 3) when the reference holds real features (those
of a dataset, or a file written by `ref --out`), and labels a FID of fewer than 50,000 samples.
`--network digits` (the default for `--source digits` and for a `--ref` of its 64 features) measures with the digits
classifier (`scgcm.eval.digits`) instead of Inception, and `calc` also prints its confident share, classes
and memorisation.
"""

import functools
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from scgcm.errors import UserError, run_cli
from scgcm.eval import digits as digits_net, inception
from scgcm.eval.fid import (
    MIN_SAMPLES,
    FeatureExtractor,
    check_sample_count,
    feature_scores,
    few_samples_message,
    fid_label,
    load_samples,
    read_reference,
    reference,
)
from scgcm.eval.precision_recall import K
from scgcm.eval.statcache import save_statistics

Network = Literal["auto", "inception", "digits"]


@dataclass(frozen=True)
class Ref:
    """Compute (or read from the cache) the reference statistics of a dataset split."""

    source: str | None = None
    """Dataset source for `scgcm.data.load_images`; None is its default dataset, CIFAR-10."""
    split: str = "train"
    """Dataset split."""
    out: Path | None = None
    """Also write the statistics to this .npz."""
    batch_size: int | None = None
    """Images per step, over all local devices (default: 256 on GPU/TPU, 32 on CPU)."""
    network: Network = "auto"
    """Feature network: Inception, or the digits classifier; 'auto': digits for --source digits."""


@dataclass(frozen=True)
class Calc:
    """FID of generated samples against reference statistics."""

    samples: tyro.conf.Positional[Path]
    """An .npz (key "images" or its first array; uint8 NHWC or NCHW, 1 or 3 channels, any size) or a folder of PNGs."""
    ref: Path | None = None
    """Reference statistics .npz (from `ref --out`); if absent, computed from --source/--split."""
    source: str | None = None
    """Dataset source for the reference statistics when --ref is not given."""
    split: str = "train"
    """Dataset split for the reference statistics when --ref is not given."""
    batch_size: int | None = None
    """Images per step, over all local devices (default: 256 on GPU/TPU, 32 on CPU)."""
    network: Network = "auto"
    """Feature network: Inception, or the digits classifier; 'auto': digits for --source digits, or for a --ref
    of the classifier's 64 features."""


def chosen_network(network: Network, source: str | None, ref_dim: int | None = None) -> str:
    """'inception' or 'digits': `network`, with 'auto' resolved by the data: digits for `--source digits`, or
    for reference statistics of the digits classifier's feature size (Inception never sees 8×8 digits)."""
    if network == "auto" and ref_dim == digits_net.HIDDEN:
        return "digits"
    return digits_net.resolve_network(network, source)


def cli(args: Sequence[str] | None = None) -> Ref | Calc:
    """Parse `ref …` or `calc …` from `args` (default: the command line)."""
    return tyro.extras.subcommand_cli_from_dict({"ref": Ref, "calc": Calc}, prog="python -m scgcm.fid",
                                                description=__doc__.splitlines()[0], args=args)


def main(command: Ref | Calc | Sequence[str] | None = None) -> int:
    """Run a parsed command (or parse `command` as arguments). Every input is checked, and the
    samples read, before the network is loaded or reference statistics are computed."""
    if command is None or not isinstance(command, (Ref, Calc)):
        command = cli(command)
    if command.batch_size is not None and command.batch_size < 1:
        raise UserError(f"--batch-size must be positive (got {command.batch_size})")
    match command:
        case Ref(source=source, split=split, out=out):
            if out is not None and out.is_dir():
                raise UserError(f"--out {out} is a folder; give a file name ending in .npz")
            extractor = _extractor(chosen_network(command.network, source), command.batch_size)
            (mu, sigma), features = reference(source, extractor, split=split, flag="--source",
                                              need_features=out is not None)
            if out is not None:
                save_statistics(out, mu, sigma, features=features, source=str(source), split=split)
                print(f"wrote {out}", file=sys.stderr)
        case Calc(samples=samples, ref=ref, source=source, split=split):
            if ref is not None and source is not None:
                raise UserError("--ref and --source exclude each other: the reference is either a file or a dataset")
            images = load_samples(samples)  # every input first, then the network
            check_sample_count(len(images), str(samples), warn=False)  # the warning comes with the number
            if ref is not None:  # the file's feature size tells which network made it ('auto')
                ref_stats, ref_features = read_reference(ref, need_features=True)
                network = chosen_network(command.network, source, len(ref_stats[0]))
                extractor = _extractor(network, command.batch_size)
            else:
                network = chosen_network(command.network, source)
                extractor = _extractor(network, command.batch_size)
                ref_stats, ref_features = reference(source, extractor, split=split, flag="--source", need_features=True)
            _calc(samples, images, network, extractor, ref_stats, ref_features, ref)
    return 0


def _extractor(network: str, batch_size: int | None):
    """The digits classifier (small: built now), or a function that builds Inception when first needed."""
    if network == "digits":
        return digits_net.load_network()
    return functools.cache(lambda: FeatureExtractor(inception.load_inception(), batch_size=batch_size, progress=True))


def _calc(samples: Path, images, network: str, extractor, ref_stats, ref_features, ref: Path | None) -> None:
    """Print the scores of `images` (the distance alone on stdout)."""
    print(f"{len(images)} samples from {samples}", file=sys.stderr)
    net = extractor if network == "digits" else extractor()
    dim = getattr(net, "feature_dim", MIN_SAMPLES)
    if len(images) < dim:
        warnings.warn(few_samples_message(len(images), dim), stacklevel=1)
    features = net.features(images)
    if features.shape[1] != len(ref_stats[0]):
        raise UserError(f"{ref}: statistics of {len(ref_stats[0]):,}-dimensional features, but the {network} network's "
                        f"have {features.shape[1]:,} (make them with `ref --network {network}`)")
    try:
        scores = feature_scores(features, ref_stats, ref_features)
        if network == "digits":
            scores.update(net.image_scores(images))
    except ValueError as e:
        raise UserError(f"FID of {samples} against {ref or 'the reference'} is undefined: {e}") from None
    if "precision" in scores:
        print(f"precision {scores['precision']:.4f}, recall {scores['recall']:.4f} "
              f"(k={K}, {len(ref_features)} real features)", file=sys.stderr)
    if network == "digits":
        print(f"confident {scores['confident']:.3f}, classes {scores['classes']:.0f}, "
              f"memorised {scores['memorised']:.3f} (digits classifier)", file=sys.stderr)
    print(f"{fid_label(len(images), network)}:", file=sys.stderr)
    print(f"{scores['fid']:.4f}")


def _print_warnings_on_one_line() -> None:
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    _print_warnings_on_one_line()
    sys.exit(run_cli(main))
