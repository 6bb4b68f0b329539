"""The training and sampling CLIs end to end on the tiny configuration (issue 3)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from scgcm.run.rundir import compile_cache_dir

# smoke_run: conftest.py


def test_smoke_run_outputs(smoke_run):
    assert sorted(p.name for p in (smoke_run / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["4", "8"]
    lines = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    for r in lines:
        assert np.isfinite([r["loss_ct"], r["loss_dsm"], r["grad_norm"], r["update_distance"]]).all()
    assert {"num_scales", "images_per_sec", "kimg", "lr_torso"} <= set(lines[0])
    # the first call compiles: its time is not throughput (its interval has none), the later ones are
    assert lines[0]["images_per_sec"] is None and all(r["images_per_sec"] > 0 for r in lines[1:])
    for mode in ("onestep", "heun"):
        assert (smoke_run / "samples" / f"{mode}_0000004.png").exists()
    final = np.load(smoke_run / "samples" / "final_onestep.npz")["images"]
    assert final.shape == (8, 8, 8, 3) and final.dtype == np.uint8
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["config"]["total_steps"] == 8 and "jax_version" in config
    log = (smoke_run / "log.txt").read_text()
    assert "parameters: torso" in log and "first call done" in log
    assert f"XLA compilation cache: {os.environ['JAX_COMPILATION_CACHE_DIR']}" in log  # 'auto' takes JAX's variable


def test_compile_cache_dir(tmp_path):
    assert compile_cache_dir("off", {"JAX_COMPILATION_CACHE_DIR": "/x"}) is None
    assert compile_cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "/x", "SCGCM_CACHE": "/y"}) == Path("/x")
    assert compile_cache_dir("auto", {"SCGCM_CACHE": "/y", "XDG_CACHE_HOME": "/z"}) == Path("/y/xla")
    assert compile_cache_dir("auto", {"XDG_CACHE_HOME": "/z"}) == Path("/z/scgcm/xla")
    assert compile_cache_dir("auto", {}) == Path.home() / ".cache" / "scgcm" / "xla"
    assert compile_cache_dir(str(tmp_path / "c"), {"JAX_COMPILATION_CACHE_DIR": "/x"}) == tmp_path / "c"
    assert compile_cache_dir("~/c", {}) == Path.home() / "c"


@pytest.fixture(scope="module")
def sample(smoke_run, tmp_path_factory):
    from scgcm.sample import main

    out_dir = tmp_path_factory.mktemp("samples")

    def run(name, *args):
        out = out_dir / f"{name}.npz"
        assert main(["--workdir", str(smoke_run), "--out", str(out), "--num", "6", "--batch-size", "8", *args]) == 0
        return np.load(out)["images"]

    return run


@pytest.mark.parametrize("mode,args", [
    ("onestep", []),
    ("twostep", ["--two-step-sigma", "0.821"]),
    ("multistep", ["--sigmas", "80", "2", "0.3"]),
    ("heun", ["--heun-steps", "4"]),
])
def test_sampler_modes(sample, mode, args):
    images = sample(mode, "--mode", mode, *args)
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert images.std() > 0


def test_sampler_is_reproducible_and_seeded(sample, smoke_run, tmp_path):
    a = sample("a", "--seed", "3", "--checkpoint", "4")
    b = sample("b", "--seed", "3", "--checkpoint", "4", "--png-dir", str(tmp_path / "pngs"))
    c = sample("c", "--seed", "4", "--checkpoint", "4")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 6
    raw = sample("raw", "--seed", "3", "--checkpoint", "4", "--no-ema")
    assert not np.array_equal(a, raw)


def test_sampler_rejects_bad_sigmas(sample):
    with pytest.raises(ValueError, match="multistep sigmas"):
        sample("bad", "--mode", "multistep", "--sigmas", "0.3", "80")
