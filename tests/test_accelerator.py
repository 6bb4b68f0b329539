"""The one line training prints about the machine: no accelerator for the paper preset, an accelerator
plugin that found no device, a device too small for the batch. The machines are simulated by passing
the facts (`accelerator.Platform`); one CLI run checks what a user on a CPU sees and that it goes on."""

import logging

import pytest
from cli import run_train
from tiny import MICRO_MODEL, tiny_config

from scgcm.errors import UserError
from scgcm.run import accelerator
from scgcm.run.accelerator import Platform
from scgcm.run.config import SMOKE

CPU = Platform(backend="cpu", device_kind="cpu", num_devices=1)
CPU_WITH_CUDA_PLUGIN = Platform(backend="cpu", device_kind="cpu", num_devices=1, plugins=("cuda12",))
GPU = Platform(backend="gpu", device_kind="NVIDIA A10G", num_devices=1, plugins=("cuda12",), bytes_limit=16 * 2**30)
CPU_PRESETS = ("smoke", "cpu")


def test_cpu_with_paper_preset_names_platform_time_and_both_ways_out():
    line = accelerator.no_accelerator_notice(CPU, "paper", 5400.0, CPU_PRESETS)
    assert "\n" not in line
    assert line.startswith("no accelerator found: training runs on 1 CPU device (cpu)")
    assert "about 1.5 h per update here (estimated)" in line
    assert "pip install -e '.[cuda12]'" in line and "'.[tpu]'" in line
    assert "--config.preset smoke|cpu" in line and line.endswith("going on")


def test_cpu_presets_and_accelerators_get_no_line():
    assert accelerator.no_accelerator_notice(CPU, "smoke", 0.1, CPU_PRESETS) is None
    assert accelerator.no_accelerator_notice(CPU, "cpu", None, CPU_PRESETS) is None
    assert accelerator.no_accelerator_notice(GPU, "paper", None, CPU_PRESETS) is None


def test_cuda_plugin_without_gpu_is_said_for_any_preset():
    small = accelerator.no_accelerator_notice(CPU_WITH_CUDA_PLUGIN, "smoke", None, CPU_PRESETS)
    assert small.startswith("JAX's cuda12 plugin is installed but found no GPU, so training runs on 1 CPU device")
    assert "nvidia-smi" in small and small.endswith("; going on") and "Ways out" not in small
    paper = accelerator.no_accelerator_notice(CPU_WITH_CUDA_PLUGIN, "paper", 90.0, CPU_PRESETS)
    assert paper.startswith("JAX's cuda12 plugin is installed but found no GPU")
    assert "about 2 min per update" in paper and "--config.preset smoke|cpu" in paper


def test_memory_error_names_the_sizes_and_the_flags():
    assert accelerator.memory_error(GPU, 15 * 2**30, 256, 1) is None
    assert accelerator.memory_error(CPU, 10**15, 256, 1) is None  # a CPU reports no limit
    line = accelerator.memory_error(GPU, 40 * 2**30, 256, 2)
    assert line.startswith("the batch does not fit: one update at 256 images per device needs 40.0 GiB")
    assert "the NVIDIA A10G holds 16.0 GiB" in line and "--config.grad-accum 4" in line
    assert "--config.remat" in line and "--config.batch-size" in line


@pytest.mark.parametrize("s, text", [(3.24, "3.2 s"), (42, "42 s"), (900, "15 min"), (9000, "2.5 h"),
                                     (3 * 86400, "3.0 days")])
def test_format_seconds(s, text):
    assert accelerator.format_seconds(s) == text


def test_check_platform_too_small_gpu_is_one_user_error():
    """XLA's real plan of the micro model's update (compiled here, on the CPU) against a 1 MiB 'GPU'."""
    cfg = tiny_config(model=MICRO_MODEL, preset="paper")
    tiny_gpu = Platform(backend="gpu", device_kind="tiny GPU", num_devices=1, bytes_limit=2**20)
    with pytest.raises(UserError, match=r"^the batch does not fit: one update at 8 images per device needs .* "
                                        r"the tiny GPU holds 0.0 GiB; use --config.grad-accum 2"):
        accelerator.check_platform(cfg, logging.getLogger("test"), tiny_gpu)
    roomy = Platform(backend="gpu", device_kind="big GPU", num_devices=1, bytes_limit=2**40)
    assert accelerator.check_platform(cfg, logging.getLogger("test"), roomy) is roomy


def test_check_platform_estimates_the_time_on_a_cpu(caplog):
    cfg = tiny_config(model=MICRO_MODEL, preset="paper")
    with caplog.at_level(logging.WARNING, logger="test"):
        accelerator.check_platform(cfg, logging.getLogger("test"), CPU)
    [record] = caplog.records
    assert record.getMessage().startswith("no accelerator found") and "per update here (estimated)" in record.getMessage()


def test_cli_paper_preset_on_cpu_prints_the_line_and_trains(smoke_run, tmp_path):  # smoke_run: programs in the cache
    # the default preset (the last --config.preset wins), shrunk to the micro model and given the smoke
    # preset's constants, so that its programs are the CLI tests' (in the compilation cache): its own width
    # (nf 128, 4 blocks per level) took two CPU-minutes to compile and train
    t, h, o = SMOKE.model.torso, SMOKE.model.head, SMOKE.optim
    micro = [f"--config.{k}={v}" for k, v in (("model.torso.nf", t.nf), ("model.torso.num-res-blocks", t.num_res_blocks),
             ("model.head.model-channels", h.model_channels), ("ict.s1", SMOKE.ict.s1), ("optim.torso-lr", o.torso_lr),
             ("optim.head-lr", o.head_lr), ("optim.ema-decay", o.ema_decay))]
    result = run_train(tmp_path / "run", "--config.preset", "paper", *micro, "--config.data.source", "synthetic",
                       "--config.fid.no-enabled", "--config.stop-at", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "no accelerator found" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "--config.preset smoke|cpu" in lines[0]
    # --config.stop-at: one checkpoint, at that step
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["2"]
