"""Zero-shot editing (scgcm.edit) and its CLI (scgcm.edit_cli), with a random-weight micro model.

Closed forms: the maps are orthogonal with the luminance / block-mean first coefficient; the edited
outputs keep the known pixels, luminance or block means to float32 round-off; slerp's end points and
right-angle midpoint; interpolation ends equal one-step samples.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from PIL import Image
from tiny import MICRO_MODEL

from scgcm.core import editing as E, samplers
from scgcm.parallel import editing as batched
from scgcm.run.config import build_model

SHAPE = (MICRO_MODEL.channels, MICRO_MODEL.image_size, MICRO_MODEL.image_size)  # (3, 8, 8)
W = np.asarray(E.LUMINANCE)
SIGMA_MIN = MICRO_MODEL.sigma_min
LEVELS = (80.0, 2.0, 0.3)
SIGMAS = jnp.asarray(LEVELS)


@functools.cache
def micro():
    return eqx.nn.inference_mode(build_model(MICRO_MODEL, key=jr.key(0)))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *SHAPE)).astype(np.float32)


def _block_means(x: np.ndarray, p: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).mean(axis=(3, 5))


MAPS = {
    "identity": E.identity_map(3),
    "luminance": E.luminance_map(),
    "block2": E.block_mean_map(3, 2),
    "block4": E.block_mean_map(3, 4),
}


@pytest.mark.parametrize("name", MAPS)
def test_maps_are_orthogonal_with_their_inverse(name):
    amap = MAPS[name]
    basis = jnp.eye(int(np.prod(SHAPE))).reshape(-1, *SHAPE)
    matrix = jax.vmap(amap.forward)(basis).reshape(len(basis), -1).T  # column k = A·e_k
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(len(matrix)), atol=1e-6)
    x = jnp.asarray(_images(1)[0])
    np.testing.assert_allclose(amap.inverse(amap.forward(x)), x, atol=1e-6)
    np.testing.assert_allclose(amap.forward(amap.inverse(x)), x, atol=1e-6)


def test_first_coefficients_are_luminance_and_block_means():
    x = _images(1)[0]
    np.testing.assert_allclose(E.luminance_map().forward(jnp.asarray(x))[0], np.einsum("chw,c->hw", x, W) / np.linalg.norm(W),
                               atol=1e-6)
    for p in (2, 4):
        coef = np.asarray(E.block_mean_map(3, p).forward(jnp.asarray(x)))
        np.testing.assert_allclose(coef[:, ::p, ::p], p * _block_means(x[None], p)[0], atol=1e-5)
    q = E.orthogonal_with_first_column([3.0, 4.0])
    np.testing.assert_allclose(q[:, 0], [0.6, 0.8])
    np.testing.assert_allclose(q @ q.T, np.eye(2), atol=1e-12)


def test_given_images_and_masks():
    y = _images(1)[0]
    block = np.asarray(E.given_image(E.block_mean_map(3, 2), jnp.asarray(y), jnp.asarray(E.block_mean_known(SHAPE, 2))))
    np.testing.assert_allclose(block, np.repeat(np.repeat(_block_means(y[None], 2)[0], 2, 1), 2, 2), atol=1e-6)
    lum = np.asarray(E.given_image(E.luminance_map(), jnp.asarray(y), jnp.asarray(E.luminance_known(SHAPE))))
    np.testing.assert_allclose(np.einsum("chw,c->hw", lum, W), np.einsum("chw,c->hw", y, W), atol=1e-6)
    np.testing.assert_allclose(np.asarray(E.gray(jnp.asarray(y)))[1], np.einsum("chw,c->hw", y, W), atol=1e-6)

    center = E.region_known(SHAPE, "center")
    assert center.sum() == 3 * (64 - 16) and (center[:, 2:6, 2:6] == 0).all()
    left = E.region_known(SHAPE, "left")
    assert (left[:, :, :4] == 0).all() and (left[:, :, 4:] == 1).all()
    rand = np.asarray(E.random_known(jr.key(1), (3, 64, 64), 0.25))
    assert (rand == rand[:1]).all() and abs(1 - rand.mean() - 0.25) < 0.03

    u8 = np.zeros((1, 4, 4, 3), np.uint8)
    u8[0, :2, :2] = [[[0, 100, 250], [0, 100, 250]], [[40, 100, 250], [40, 100, 250]]]  # block means 20, 100, 250
    painting = E.coarse_painting(u8, 2, levels=4)  # levels 0, 85, 170, 255
    np.testing.assert_array_equal(painting[0, :2, :2], np.broadcast_to([0, 85, 255], (2, 2, 3)))
    np.testing.assert_array_equal(painting[0, 2:, 2:], 0)


def _edit(images, known, amap, editor, seed, batch_size=8, mesh=None, indices=None):
    given = jax.vmap(E.given_image, in_axes=(None, 0, 0))(amap, jnp.asarray(images), jnp.asarray(known))
    indices = np.arange(len(images)) if indices is None else indices
    return batched.edit_images(micro(), given, images, known, indices, seed=seed, editor=editor, amap=amap,
                         batch_size=batch_size, mesh=mesh)[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_consistency_edits_keep_the_known_part(seed):
    y = _images(4, seed)
    editor = E.ConsistencyEditor(SIGMAS, SIGMA_MIN)
    known = np.broadcast_to(E.region_known(SHAPE, "center"), y.shape)
    out = _edit(y, known, E.identity_map(3), editor, seed)
    np.testing.assert_allclose(out[known == 1], y[known == 1], atol=1e-6)
    assert np.abs(out[known == 0] - y[known == 0]).mean() > 0.05  # the hole is filled by the model, not copied

    out = _edit(y, np.broadcast_to(E.luminance_known(SHAPE), y.shape), E.luminance_map(), editor, seed)
    np.testing.assert_allclose(np.einsum("nchw,c->nhw", out, W), np.einsum("nchw,c->nhw", y, W), atol=2e-6)
    assert np.abs(out - y).mean() > 0.05

    out = _edit(y, np.broadcast_to(E.block_mean_known(SHAPE, 2), y.shape), E.block_mean_map(3, 2), editor, seed)
    np.testing.assert_allclose(_block_means(out, 2), _block_means(y, 2), atol=2e-6)
    assert np.abs(out - y).mean() > 0.05


def test_heun_edits_keep_the_known_part():
    y = _images(4, 2)
    editor = E.heun_editor(3, SIGMA_MIN, 80.0)
    out = _edit(y, np.broadcast_to(E.luminance_known(SHAPE), y.shape), E.luminance_map(), editor, 0)
    np.testing.assert_allclose(np.einsum("nchw,c->nhw", out, W), np.einsum("nchw,c->nhw", y, W), atol=2e-6)
    known = np.asarray(jax.vmap(lambda k: E.random_known(k, SHAPE, 0.5))(jr.split(jr.key(3), 4)))
    out = _edit(y, known, E.identity_map(3), editor, 0)
    np.testing.assert_allclose(out[known == 1], y[known == 1], atol=1e-6)
    assert np.isfinite(out).all() and np.abs(out[known == 0] - y[known == 0]).mean() > 0.05


def test_same_seed_same_result_whatever_the_batch():
    """Image i's result depends only on (seed, its index): not on the batch size, its batch-mates, its
    position, or padding (10 images in batches of 8 vs 3 of them, reversed, in one padded batch)."""
    y = _images(10, 4)
    known = np.broadcast_to(E.region_known(SHAPE, "right"), y.shape)
    editor = E.ConsistencyEditor(SIGMAS, SIGMA_MIN)
    idx = np.asarray([7, 3, 11, 5, 0, 1, 2, 4, 6, 8])
    ten = _edit(y, known, E.identity_map(3), editor, 5, batch_size=8, indices=idx)
    three = _edit(y[[9, 4, 1]], known[:3], E.identity_map(3), editor, 5, batch_size=3, indices=idx[[9, 4, 1]])
    np.testing.assert_allclose(three, ten[[9, 4, 1]], atol=1e-5)
    other_seed = _edit(y[[9, 4, 1]], known[:3], E.identity_map(3), editor, 6, batch_size=3, indices=idx[[9, 4, 1]])
    assert np.abs(other_seed - three).max() > 1e-3


def test_projection_free_edit_is_multistep_sampling():
    """With nothing known and a zero `given`, Algorithm 4 is multistep sampling with the same noise."""
    key = jr.fold_in(jr.key(9), 2)
    zeros = jnp.zeros(SHAPE)
    editor = E.ConsistencyEditor(SIGMAS, SIGMA_MIN, clip=False)
    both = eqx.filter_jit(lambda m: (
        E.edit(m, key, zeros, zeros, zeros, editor=editor, amap=E.identity_map(3))[1],
        samplers.multistep(m, key, LEVELS, SHAPE, SIGMA_MIN),
    ))
    a, b = both(micro())
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_slerp_closed_forms():
    z1, z2 = jnp.asarray([1.0, 0.0, 0.0]), jnp.asarray([0.0, 2.0, 0.0])
    np.testing.assert_allclose(E.slerp(z1, z2, 0.0), z1, atol=1e-6)
    np.testing.assert_allclose(E.slerp(z1, z2, 1.0), z2, atol=1e-6)
    np.testing.assert_allclose(E.slerp(z1, z2, 0.5), (z1 + z2) / np.sqrt(2), atol=1e-6)  # sin(π/4)/sin(π/2) each
    np.testing.assert_allclose(E.slerp(z1, 3 * z1, 0.5), 2 * z1, atol=1e-6)  # parallel: linear, no NaN


def test_interpolation_ends_are_one_step_samples():
    seed, shape = 6, SHAPE
    editor = E.ConsistencyEditor(jnp.asarray([80.0]), SIGMA_MIN, clip=False)
    frames = batched.interpolate_rows(micro(), 2, 3, seed=seed, editor=editor, shape=shape, batch_size=8)
    assert frames.shape == (2, 3, *shape)
    keys = jax.vmap(lambda i: jr.fold_in(jr.key(seed), i))(jnp.arange(4))
    onestep = eqx.filter_jit(jax.vmap(lambda m, k: samplers.multistep(m, k, (80.0,), shape, SIGMA_MIN), in_axes=(None, 0)))
    samples = np.asarray(onestep(micro(), keys))
    np.testing.assert_allclose(frames[:, 0], samples[0::2], atol=1e-4)
    np.testing.assert_allclose(frames[:, -1], samples[1::2], atol=1e-4)
    assert np.abs(frames[:, 1] - frames[:, 0]).mean() > 1e-3


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def inputs8(tmp_path_factory):
    from scgcm.data.sources import synthetic_images

    folder = tmp_path_factory.mktemp("edit-inputs")
    np.savez(folder / "four.npz", images=synthetic_images(4, image_size=8, seed=3))  # the runs' size
    np.savez(folder / "small.npz", images=synthetic_images(4, image_size=4, seed=3))
    np.savez(folder / "gray.npz", images=synthetic_images(4, image_size=8, seed=3)[..., :1])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "mask4.png")
    return folder


def _cli(argv):
    from scgcm.edit import main
    from scgcm.errors import run_cli

    return run_cli(main, [str(a) for a in argv])


def test_cli_writes_npz_and_grid(smoke_run, inputs8, tmp_path):
    out = tmp_path / "edited.npz"
    rc = _cli(["--workdir", smoke_run, "--task", "inpaint", "--input", inputs8 / "four.npz", "--index", "3", "1",
               "--mask", "left", "--seed", "2", "--out", out, "--grid", tmp_path / "grid.png"])
    assert rc == 0
    with np.load(out) as f:
        images, inputs, given, index, known = f["images"], f["inputs"], f["given"], f["index"], f["known"]
    assert known.shape == images.shape and (known[:, :, 4:] == 1).all() and (known[:, :, :4] == 0).all()  # NHWC
    with np.load(inputs8 / "four.npz") as f:
        np.testing.assert_array_equal(inputs, f["images"][[3, 1]])
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8 and list(index) == [3, 1]
    np.testing.assert_array_equal(images[:, :, 4:], inputs[:, :, 4:])  # the known right half, exactly
    assert (given[:, :, :4] == 128).all()  # the missing half is shown as zeros (mid-gray)
    assert Image.open(tmp_path / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)


BAD = [
    (["--workdir", "{tmp}/nowhere", "--task", "colorize", "--input", "{in}/four.npz"], "--workdir"),
    (["--task", "inpaint"], "--input"),
    (["--task", "inpaint", "--input", "{in}/small.npz"], "--input"),
    (["--task", "colorize", "--input", "{in}/gray.npz"], "--input"),
    (["--task", "inpaint", "--input", "{in}/four.npz", "--num", "2", "--mask", "{in}/mask4.png"], "--mask"),
    (["--task", "inpaint", "--input", "{in}/four.npz", "--mask", "blob"], "--mask"),
    (["--task", "inpaint", "--input", "{in}/four.npz", "--mask", "random", "--mask-rate", "1.5"], "--mask-rate"),
    (["--task", "superres", "--input", "{in}/four.npz", "--factor", "3"], "--factor"),
    (["--task", "stroke", "--input", "{in}/four.npz", "--factor", "5"], "--factor"),
    (["--task", "superres", "--input", "{in}/four.npz", "--index", "4"], "--index"),
    (["--task", "superres", "--input", "{in}/four.npz", "--num", "5"], "--num"),
    (["--task", "superres", "--input", "{in}/four.npz", "--num", "0"], "--num"),
    (["--task", "inpaint", "--input", "{in}/four.npz", "--sigmas", "0.5", "2"], "--sigmas"),
    (["--task", "denoise", "--input", "{in}/four.npz", "--noise-sigma", "0"], "--noise-sigma"),
    (["--task", "interpolate", "--num-frames", "1"], "--num-frames"),
    (["--task", "interpolate", "--checkpoint", "newest"], "--checkpoint"),
]


def test_cli_bad_inputs_fail_in_one_line_before_loading(smoke_run, inputs8, tmp_path, monkeypatch, capsys):
    import scgcm.edit as cli

    def no_model(*a, **k):
        raise AssertionError("the checkpoint must not be loaded for a bad input")

    monkeypatch.setattr(cli, "load_state", no_model)
    for argv, flag in BAD:
        argv = [a.format(tmp=tmp_path, **{"in": inputs8}) for a in argv]
        if "--workdir" not in argv:
            argv = ["--workdir", str(smoke_run), *argv]
        assert _cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err, (argv, err)


def test_cli_input_folder_errors_name_input_and_grey_files_are_said(smoke_run, tmp_path, monkeypatch, capsys):
    """An --input folder without images: one line naming --input (not training's --config.data.source).
    Grey PNGs for the RGB smoke model: decoded with the grey level in every channel, one warning line."""
    import scgcm.edit as cli
    from scgcm.errors import UserError

    def stop(*a, **k):
        raise UserError("stopped here by the test, after the inputs")

    monkeypatch.setattr(cli, "load_state", stop)
    (tmp_path / "empty").mkdir()
    assert _cli(["--workdir", smoke_run, "--task", "inpaint", "--input", tmp_path / "empty"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input" in err and "--config.data.source" not in err, err
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(grey / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(grey / "2.png")
    assert _cli(["--workdir", smoke_run, "--task", "inpaint", "--input", grey, "--num", "3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "error: stopped here by the test, after the inputs", lines
    assert lines[0].startswith(f"warning: {grey}: 2 of 3 images are grey (0.png, …), decoded as RGB"), lines


# ----------------------------------------------------------------------------- the written file keeps the constraint


def _lum(x: np.ndarray) -> np.ndarray:
    """Luminance (BT.601) of [..., c, ...] arrays along axis -3 (channel-first) as float64."""
    return np.einsum("...chw,c->...hw", np.asarray(x, np.float64), W)


def _nearest_luminance_point(x: np.ndarray, target: float) -> np.ndarray:
    """argmin |z − x| over z in [-1, 1]³ with w·z = target: z = clip(x + μ·w), μ by bisection (KKT)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if W @ np.clip(x + mu * W, -1, 1) < target else (lo, mu)
    return np.clip(x + lo * W, -1, 1)


def test_fit_to_range_on_hand_made_arrays():
    """Closed forms of the projection onto (constraint ∩ [-1, 1]) on one pixel or one block; a plain clip
    (what the uint8 conversion did) breaks each constraint."""
    shape = (3, 2, 2)
    # inpainting: the known pixels are those of y, the unknown ones are clipped
    y = np.full(shape, 0.25, np.float32)
    known = np.zeros(shape, np.float32)
    known[:, 0] = 1
    x = np.asarray([[[0.25, 0.25], [1.7, -0.3]]] * 3, np.float32)
    out = np.asarray(E.fit_to_range(E.identity_map(3), jnp.asarray(x), jnp.asarray(y), jnp.asarray(known)))
    np.testing.assert_allclose(out, np.clip(x, -1, 1), atol=1e-6)

    # colourisation: one over-bright pixel, its luminance kept
    y = np.zeros(shape, np.float32)
    y[:, 0, 0] = [0.9, 0.8, 0.7]
    lum_known = np.asarray(E.luminance_known(shape))
    amap = E.luminance_map()
    x = np.asarray(E.project(amap, jnp.zeros(shape).at[:, 0, 0].set(jnp.asarray([1.6, 0.5, 1.4])), jnp.asarray(y),
                             jnp.asarray(lum_known)))
    assert x.max() > 1.2 and abs(_lum(np.clip(x, -1, 1))[0, 0] - _lum(y)[0, 0]) > 0.05  # the clip breaks it
    out = np.asarray(E.fit_to_range(amap, jnp.asarray(x), jnp.asarray(y), jnp.asarray(lum_known)))
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    np.testing.assert_allclose(_lum(out), _lum(y), atol=2e-6)
    np.testing.assert_allclose(out[:, 0, 0], _nearest_luminance_point(x[:, 0, 0].astype(np.float64), _lum(y)[0, 0]),
                               atol=1e-4)

    # super-resolution: one 2×2 block of mean 0.8 with a pixel over 1: the excess spread over the others
    y = np.broadcast_to(np.asarray([[1.0, 1.0], [1.0, 0.2]], np.float32), shape)
    x = np.broadcast_to(np.asarray([[1.4, 1.0], [0.6, 0.2]], np.float32), shape)
    known = np.asarray(E.block_mean_known(shape, 2))
    out = np.asarray(E.fit_to_range(E.block_mean_map(3, 2), jnp.asarray(x), jnp.asarray(y), jnp.asarray(known)))
    np.testing.assert_allclose(out, np.broadcast_to([[1.0, 1.0], [0.8, 0.4]], shape), atol=1e-4)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.8, atol=2e-6)
    assert abs(np.clip(x, -1, 1).mean() - 0.8) > 0.05

    # an x already in range that keeps the constraint comes back unchanged
    inside = np.asarray(E.project(amap, jnp.asarray(_images(1, 5)[0] * 0.3), jnp.asarray(_images(1, 6)[0] * 0.3),
                                  jnp.asarray(E.luminance_known(SHAPE))))
    same = E.fit_to_range(amap, jnp.asarray(inside), jnp.asarray(_images(1, 6)[0] * 0.3), jnp.asarray(E.luminance_known(SHAPE)))
    np.testing.assert_allclose(same, inside, atol=1e-6)


@pytest.fixture(scope="module")
def real8(tmp_path_factory):
    """8 real CIFAR-10 test images at the smoke run's 8×8 (means of 4×4 blocks), synthetic ones without the subset."""
    from pathlib import Path

    from scgcm.data.sources import load_images, synthetic_images

    batches = Path(__file__).parents[2] / "shared/data/cifar10-subset/cifar-10-batches-py"
    if (batches / "test_batch").is_file():
        images = load_images(str(batches), split="test")[:8].astype(np.float64)
        images = np.round(images.reshape(8, 8, 4, 8, 4, 3).mean(axis=(2, 4))).astype(np.uint8)
    else:
        images = synthetic_images(8, image_size=8, seed=3)
    path = tmp_path_factory.mktemp("real8") / "real8.npz"
    np.savez(path, images=images)
    return path


@pytest.mark.parametrize("sampler", ["consistency", "heun"])
@pytest.mark.parametrize("task,extra", [("inpaint", ["--mask", "center"]), ("colorize", []),
                                        ("superres", ["--factor", "2"])])
def test_written_edits_keep_the_constraint(smoke_run, real8, tmp_path, task, extra, sampler):
    """The .npz and the PNG grid the user gets keep the known pixels exactly, the luminance and the 2×2 block
    means to rounding (≤ 1 level); before the final projection the clip changed them by up to 15 levels."""
    out = tmp_path / "edited.npz"
    argv = ["--workdir", smoke_run, "--task", task, "--input", real8, "--num", "8", *extra, "--sampler", sampler,
            "--seed", "1", "--out", out]
    assert _cli([*argv, *(["--heun-steps", "4"] if sampler == "heun" else [])]) == 0
    with np.load(out) as f:
        result, inputs = f["images"], f["inputs"]
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    tiles = np.stack([grid[2 + r * 10: 2 + r * 10 + 8, 2 + 2 * 10: 2 + 2 * 10 + 8] for r in range(8)])  # column 3
    np.testing.assert_array_equal(tiles, result)  # the PNG shows exactly the .npz's results
    chw = lambda a: a.transpose(0, 3, 1, 2).astype(np.float64)  # noqa: E731
    if task == "inpaint":
        known = E.region_known(SHAPE, "center").transpose(1, 2, 0) == 1
        np.testing.assert_array_equal(result[:, known], inputs[:, known])
        assert np.abs(result[:, ~known].astype(int) - inputs[:, ~known]).mean() > 1  # filled, not copied
    elif task == "colorize":
        assert np.abs(_lum(chw(result)) - _lum(chw(inputs))).max() <= 1.0
    else:
        assert np.abs(_block_means(chw(result), 2) - _block_means(chw(inputs), 2)).max() <= 1.0
    assert np.abs(result.astype(int) - inputs).max() > 8  # the model changed the image


def test_one_checkpoint_name_rule_for_every_cli():
    """`scgcm.edit` and `scgcm.sample` share `run.load.check_checkpoint_name` (edit used to refuse phema_<σ>)."""
    from scgcm.errors import UserError
    from scgcm.run.load import check_checkpoint_name

    for name in ("latest", "best", "best_twostep", "phema_0.080", "120"):
        check_checkpoint_name(name)
    for name in ("newest", "bestx", "phema", "", "-1"):
        with pytest.raises(UserError, match="--checkpoint"):
            check_checkpoint_name(name)
