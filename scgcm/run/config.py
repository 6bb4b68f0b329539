"""Run configuration: frozen tyro dataclasses whose defaults are the paper's run (method.md §6).

Each field's docstring is its `--help` text. The configs stop at the CLI: `build_*` functions
unpack them into constructor arguments, so no module below sees a config object.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr
import optax

from scgcm.core.ema import gamma_to_sigma_rel
from scgcm.core.ict import ICTSchedule
from scgcm.core.losses import HuberForm, JointLoss, Variant, default_huber_c
from scgcm.core.state import TrainState, init_state
from scgcm.nn.head import ScoreHead
from scgcm.nn.model import SCGCM
from scgcm.nn.torso import NCSNpp

Preset = Literal["paper", "smoke", "cpu", "digits"]
Recipe = Literal["reference", "ict"]


@dataclass(frozen=True)
class TorsoConfig:
    nf: int = 128
    """Base channel count of NCSN++."""
    ch_mult: tuple[int, ...] = (2, 2, 2)
    """Channel multiplier per resolution level."""
    num_res_blocks: int = 4
    """Residual blocks per level on the way down."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Resolutions with self-attention."""
    dropout: float = 0.3
    """Dropout rate in the residual blocks."""
    fourier_scale: float = 0.02
    """Std of the frozen Gaussian-Fourier weights."""


@dataclass(frozen=True)
class HeadConfig:
    model_channels: int = 128
    """Base channel count of the score head's UNet."""
    channel_mult: tuple[int, ...] = (2, 2, 2)
    """Channel multiplier per level of the head."""
    num_blocks: int = 1
    """UNet blocks per level of the head."""
    attn_levels: tuple[int, ...] = (1,)
    """Levels of the head with attention."""


@dataclass(frozen=True)
class ModelConfig:
    torso: TorsoConfig = field(default_factory=TorsoConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image_size: int = 32
    """Image height and width."""
    channels: int = 3
    """Image channels."""
    sigma_min: float = 0.002
    """Smallest noise level (boundary condition)."""
    sigma_max: float = 80.0
    """Largest noise level."""
    sigma_data: float = 0.5
    """Data standard deviation in the preconditioning."""
    noise_scale: float = 1.0
    """c_noise = noise_scale·ln(σ)/4. Reference 1 (quirk Q2); CM/iCT code 1000."""


@dataclass(frozen=True)
class ICTConfig:
    s0: int = 10
    """Initial number of discretisation steps."""
    s1: int = 1280
    """Final number of discretisation steps."""
    rho: float = 7.0
    """Karras grid exponent."""
    p_mean: float = -1.1
    """Mean of the discrete lognormal over ln σ."""
    p_std: float = 2.0
    """Std of the discrete lognormal over ln σ."""


@dataclass(frozen=True)
class LossConfig:
    huber_form: HuberForm = "elementwise"
    """Pseudo-Huber over pixels ('elementwise', reference, quirk Q1) or over the image ('per_image', iCT)."""
    huber_c: float | None = None
    """Pseudo-Huber c; None = the form's published value (0.003, or 0.00054·sqrt(dim) for per_image)."""
    dsm_weight: float = 0.3
    """Weight of the head's denoising score-matching loss."""


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["radam", "adam"] = "radam"
    """Optax's RAdam (the method's; its rectification damps roughly the first thousand updates), or Adam."""
    torso_lr: float = 1e-4
    """Learning rate of the torso."""
    head_lr: float = 1e-4
    """Learning rate of the head."""
    ema_decay: float = 0.99993
    """EMA rate of torso and head (used for sampling only)."""
    ema_copy_steps: int = 2
    """The EMA copies the weights for updates 1..ema_copy_steps (reference rule)."""


@dataclass(frozen=True)
class DataConfig:
    source: str | None = None
    """CIFAR-10 via Hugging Face (None), or a path: python batches folder, cifar-10-python.tar.gz, .npz, image folder, saved dataset. 'synthetic' makes a toy set."""  # noqa: E501
    split: str = "train"
    """Dataset split."""
    synthetic_size: int = 2048
    """Number of images when source is 'synthetic'."""
    flip: bool = True
    """Mirror half of the training images left-right at random (the method's CIFAR-10 augmentation); off in the digits preset: a mirrored 2 is no digit."""  # noqa: E501


@dataclass(frozen=True)
class SampleConfig:
    sampling_step: int = 1000
    """Write sample grids every this many updates."""
    grid_size: int = 64
    """Images per sample grid."""
    two_step_sigma: float = 0.661
    """Intermediate σ of two-step sampling (reference 0.661, iCT 0.821; quirk Q6)."""
    heun_steps: int = 18
    """Noise levels of EDM's Heun sampler through the score head."""
    batch_size: int = 256
    """Sampling batch size (global)."""
    final_sampling: bool = True
    """After training, sample `final_num` one-step images (and FID them if enabled)."""
    final_num: int = 50_000
    """Number of images of the final sampling."""


FIDMode = Literal["onestep", "twostep", "heun"]


@dataclass(frozen=True)
class FIDConfig:
    enabled: bool = True
    """FID at every saving_step and at the end of training (the reference computes it; method.md §8)."""
    num: int = 50_000
    """Samples per sampling mode and evaluation."""
    modes: tuple[FIDMode, ...] = ("onestep", "twostep", "heun")
    """Sampling modes evaluated; each keeps its lowest-FID checkpoint in checkpoints/best_<mode>."""
    batch_size: int = 256
    """Sampling and Inception batch (global, over all devices)."""
    seed: int = 42
    """Seed of the evaluation latents, the same at every evaluation (reference: PRNGKey(42))."""
    ref: str | None = None
    """Reference statistics .npz (`python -m scgcm.fid ref --out`); None: computed from the training data, cached."""
    at_start: bool = False
    """Also evaluate the untrained model (step 0) of a new run: the baseline every later FID is read against."""
    final_num: int | None = None
    """Samples per mode of the evaluation at the end of training (None: `num`)."""
    final_modes: tuple[FIDMode, ...] | None = None
    """Modes evaluated at the end of training (None: `modes`)."""
    network: Literal["auto", "inception", "digits"] = "auto"
    """Feature network of the FID: the standard Inception, or the digits classifier (`scgcm.eval.digits`: its
    Fréchet distance, confident share, classes, memorisation); 'auto': digits for --config.data.source digits."""


@dataclass(frozen=True)
class TrainConfig:
    variant: Variant = "score"
    """'score': the head's gradient reaches the torso; 'vanilla': plain iCT (the head is a passive probe)."""
    preset: Preset = "paper"
    """Defaults to start from: 'paper' (the method's run), 'digits' (legible 8×8 digits in ~10 min on 2 CPU cores),
    'cpu' (the most a 2-core CPU learns of CIFAR-10 in ~25 min) or 'smoke' (tiny model, minutes)."""
    recipe: Recipe = "reference"
    """'reference': the original code's choices; 'ict': the iCT paper's where they differ (quirks Q1, Q2, Q6):
    per-image pseudo-Huber with c = 0.00054·sqrt(d), c_noise = 1000·ln(σ)/4, two-step σ 0.821."""
    workdir: str = "runs/score"
    """Run directory; an existing one is resumed from its latest checkpoint."""
    seed: int = 42
    """Seed of initialisation and of all training randomness."""
    total_steps: int = 400_000
    """Number of optimizer updates (K of the curriculum)."""
    batch_size: int = 1024
    """Global batch per update, over all devices and hosts."""
    steps_per_call: int = 4
    """Updates per jitted call (a lax.scan)."""
    saving_step: int = 10_000
    """Checkpoint (and FID) every this many updates."""
    keep_checkpoints: int = 3
    """Latest checkpoints kept."""
    stop_at: int | None = None
    """Stop (with a checkpoint) after this many updates without changing the schedule; resume later."""
    log_every: int = 100
    """Append metrics to metrics.jsonl every this many updates."""
    grad_accum: int = 1
    """Micro-batches per update (gradient accumulation); the update equals the full batch's."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the networks' compute; parameters, optimizer state, EMA and loss reductions stay float32."""
    remat: bool = False
    """Rematerialise torso blocks in the backward pass (less memory, more compute)."""
    device_data_mb: float = 1024.0
    """Keep the training set on every device when its uint8 images take at most this many MiB (CIFAR-10: 147);
    each call's images are then drawn inside the jitted step (the same batches); 0: always the host loader."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto' ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/scgcm/xla),
    a folder, or 'off'. A resumed run, or a rerun of the same configuration, then skips most compilation."""
    phema: bool = False
    """Also keep power-function EMAs of --config.phema-sigma-rels and snapshot them at every checkpoint
    (checkpoints/phema/<step>, all kept), for post-hoc EMA with `python -m scgcm.phema` (EDM2, §3)."""
    phema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    """Relative standard deviations of the power-function EMAs kept with --config.phema (EDM2's)."""
    skip_nonfinite: bool = False
    """Skip (and count) updates with a non-finite loss or gradient instead of stopping."""
    restart_from_scratch: bool = False
    """If every checkpoint in the run directory is unreadable, move them aside and start again from step 0
    (without it such a run is refused, so an unmounted or unreadable disk never restarts a long run)."""
    allow_config_change: bool = False
    """Resume even if seed, batch, schedule, model, loss, optimizer or data differ from the run's last start."""
    tensorboard: bool = False
    """Also log scalars to TensorBoard (needs tensorboardX)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb)."""
    distributed: Literal["auto", "on", "off"] = "auto"
    """Multi-process: 'auto' joins a run when the flags below, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, or a SLURM step, MPI job or TPU worker list of several processes say so; 'on' always calls
    jax.distributed.initialize (a TPU pod slice: the same command on every worker); 'off' never."""
    coordinator: str | None = None
    """Multi-process: process 0's address host:port (else JAX_COORDINATOR_ADDRESS, else found by JAX on SLURM/TPU)."""
    num_processes: int | None = None
    """Multi-process: number of processes (else JAX_NUM_PROCESSES, else found by JAX on SLURM/TPU)."""
    process_id: int | None = None
    """Multi-process: index of this process (else JAX_PROCESS_ID, else found by JAX on SLURM/TPU)."""
    distributed_timeout: int = 300
    """Multi-process: seconds a process waits for all the others to join before it stops with an error."""
    heartbeat_timeout: int = 100
    """Multi-process: seconds without a heartbeat after which a process (killed, host down) is declared dead and
    every other process is stopped."""
    model: ModelConfig = field(default_factory=ModelConfig)
    ict: ICTConfig = field(default_factory=ICTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)


SMOKE = TrainConfig(
    preset="smoke",
    workdir="runs/smoke",
    total_steps=200,
    batch_size=8,
    steps_per_call=4,
    saving_step=100,
    log_every=20,
    model=ModelConfig(
        torso=TorsoConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,)),
        head=HeadConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,)),
    ),
    ict=ICTConfig(s0=10, s1=40),
    optim=OptimConfig(torso_lr=2e-4, head_lr=2e-4, ema_decay=0.99),
    data=DataConfig(source="synthetic", synthetic_size=512),
    sample=SampleConfig(sampling_step=100, grid_size=16, batch_size=16, heun_steps=6, final_num=64),
    fid=FIDConfig(enabled=False, num=256, batch_size=64),  # Inception runs at ~5 images/s on a CPU
)

# The most real CIFAR-10 structure 2 CPU cores learn in about 25 minutes a run, shared with other jobs
# (on a quiet machine ~10 min training, ~6 min FID, ~3 min compiling):
# sizes measured with experiments/choose_cpu_preset.py (reasoning in experiments/RESULTS.md, "CPU
# study"): doubling nf costs 4.5× the time here, so the smoke torso's width (nf 8, three levels) and
# more updates beat a wider net. Data: the 1,017 real test images in ../shared/data/cifar10-subset.
# FID: 250 one-step samples at steps 0, 100 and 200, and 1,000 one- and two-step samples at the end
# (Inception runs at ~5-10 images/s here), all against the training images.
CPU = TrainConfig(
    preset="cpu",
    workdir="runs/cpu",
    total_steps=300,
    batch_size=32,
    steps_per_call=4,
    saving_step=100,
    log_every=20,
    model=ModelConfig(
        torso=TorsoConfig(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
        head=HeadConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
    ),
    ict=ICTConfig(s0=10, s1=160),
    optim=OptimConfig(torso_lr=4e-4, head_lr=4e-4, ema_decay=0.99),
    data=DataConfig(source="../shared/data/cifar10-subset", split="test"),
    sample=SampleConfig(sampling_step=50, grid_size=64, batch_size=64, heun_steps=10, final_num=64),
    fid=FIDConfig(num=250, modes=("onestep",), batch_size=25, at_start=True, final_num=1000, final_modes=("onestep", "twostep")),
)

# Legible 8×8 digits in about 10 minutes on 2 CPU cores (scikit-learn's digits, `scgcm.data.digits`): chosen
# by measurement (experiments/RESULTS.md, "Digits preset"). FID network: the digits classifier (`auto`).
DIGITS = TrainConfig(
    preset="digits",
    workdir="runs/digits",
    total_steps=1200,
    batch_size=32,
    steps_per_call=4,
    saving_step=400,
    log_every=20,
    model=ModelConfig(
        image_size=8,
        channels=1,
        torso=TorsoConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
        head=HeadConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
    ),
    ict=ICTConfig(s0=10, s1=160),
    optim=OptimConfig(torso_lr=3e-3, head_lr=3e-3, ema_decay=0.99),
    data=DataConfig(source="digits", flip=False),
    sample=SampleConfig(sampling_step=400, grid_size=100, batch_size=100, heun_steps=10, final_num=500),
    fid=FIDConfig(num=500, batch_size=250, at_start=True),
)

PRESETS: dict[str, TrainConfig] = {"paper": TrainConfig(), "smoke": SMOKE, "cpu": CPU, "digits": DIGITS}


def apply_recipe(cfg: TrainConfig, recipe: Recipe) -> TrainConfig:
    """`cfg` with the choices of `recipe`: 'ict' changes exactly quirks Q1 (per-image pseudo-Huber with
    the published c = 0.00054·sqrt(d)), Q2 (c_noise = 1000·ln(σ)/4) and Q6 (two-step σ 0.821)."""
    if recipe == "reference":
        return dataclasses.replace(cfg, recipe=recipe)
    return dataclasses.replace(
        cfg, recipe=recipe,
        loss=dataclasses.replace(cfg.loss, huber_form="per_image", huber_c=None),
        model=dataclasses.replace(cfg.model, noise_scale=1000.0),
        sample=dataclasses.replace(cfg.sample, two_step_sigma=0.821),
    )


def build_model(cfg: ModelConfig, *, key, remat: bool = False) -> SCGCM:
    """`remat` (TrainConfig.remat) recomputes the torso blocks' activations in the backward pass."""
    torso_key, head_key = jr.split(key)
    t = cfg.torso
    torso = NCSNpp(
        in_channels=cfg.channels,
        nf=t.nf,
        ch_mult=t.ch_mult,
        num_res_blocks=t.num_res_blocks,
        attn_resolutions=t.attn_resolutions,
        image_size=cfg.image_size,
        dropout=t.dropout,
        fourier_scale=t.fourier_scale,
        remat=remat,
        key=torso_key,
    )
    h = cfg.head
    head = ScoreHead(
        image_channels=cfg.channels,
        feature_channels=torso.feature_channels,
        temb_dim=torso.temb_dim,
        model_channels=h.model_channels,
        channel_mult=h.channel_mult,
        num_blocks=h.num_blocks,
        attn_levels=h.attn_levels,
        key=head_key,
    )
    return SCGCM(torso, head, sigma_min=cfg.sigma_min, sigma_data=cfg.sigma_data, noise_scale=cfg.noise_scale)


def build_state(cfg: "TrainConfig", optim: optax.GradientTransformation) -> TrainState:
    """The run's initial state: the model from the first key of split(key(seed)), the training key the second.

    Built by one compiled program rather than op by op: XLA's persistent cache keeps that program,
    so a rerun or a resumed run initialises in about a second (op-by-op initialisation compiles
    hundreds of small programs, which no cache keeps: ~10 s on CPU even for the smoke model)."""
    model_key, train_key = jr.split(jr.key(cfg.seed))
    return _initial_state(cfg.model, cfg.remat, optim, model_key, train_key, num_phema(cfg))


def num_phema(cfg: "TrainConfig") -> int:
    """Power-function EMAs in the run's TrainState (0 without --config.phema)."""
    return len(cfg.phema_sigma_rels) if cfg.phema else 0


@eqx.filter_jit
def _initial_state(model: "ModelConfig", remat: bool, optim, model_key, train_key, phema: int = 0) -> TrainState:
    return init_state(build_model(model, key=model_key, remat=remat), optim, train_key, phema)


def build_schedule(cfg: TrainConfig) -> ICTSchedule:
    m, i = cfg.model, cfg.ict
    return ICTSchedule(m.sigma_min, m.sigma_max, i.rho, i.s0, i.s1, cfg.total_steps, i.p_mean, i.p_std)


def build_loss(cfg: TrainConfig) -> JointLoss:
    dim = cfg.model.channels * cfg.model.image_size**2
    c = cfg.loss.huber_c if cfg.loss.huber_c is not None else default_huber_c(cfg.loss.huber_form, dim)
    return JointLoss(cfg.variant, cfg.loss.huber_form, c, cfg.loss.dsm_weight)


def with_variant_workdir(cfg: TrainConfig) -> TrainConfig:
    """The default workdir follows the variant (runs/score, runs/vanilla, runs/smoke-vanilla…)."""
    default = PRESETS[cfg.preset].workdir
    if cfg.workdir == default and cfg.variant != "score":
        return dataclasses.replace(cfg, workdir=f"{default}-{cfg.variant}" if cfg.preset != "paper" else f"runs/{cfg.variant}")
    return cfg


def validate_config(cfg: TrainConfig, num_devices: int) -> list[str]:
    """Every problem with the configuration, one line each naming the field (checked before any compile)."""
    errors = []
    positive = {
        "total_steps": cfg.total_steps, "batch_size": cfg.batch_size, "steps_per_call": cfg.steps_per_call,
        "saving_step": cfg.saving_step, "keep_checkpoints": cfg.keep_checkpoints, "log_every": cfg.log_every,
        "grad_accum": cfg.grad_accum, "optim.torso_lr": cfg.optim.torso_lr, "optim.head_lr": cfg.optim.head_lr,
        "ict.s0": cfg.ict.s0, "ict.s1": cfg.ict.s1, "ict.p_std": cfg.ict.p_std, "ict.rho": cfg.ict.rho,
        "model.sigma_min": cfg.model.sigma_min, "model.sigma_data": cfg.model.sigma_data,
        "model.image_size": cfg.model.image_size, "model.channels": cfg.model.channels,
        "model.torso.nf": cfg.model.torso.nf, "model.head.model_channels": cfg.model.head.model_channels,
        "sample.sampling_step": cfg.sample.sampling_step, "sample.batch_size": cfg.sample.batch_size,
        "sample.grid_size": cfg.sample.grid_size, "sample.heun_steps": cfg.sample.heun_steps,
        "sample.final_num": cfg.sample.final_num, "data.synthetic_size": cfg.data.synthetic_size,
        "loss.dsm_weight": cfg.loss.dsm_weight,
    }
    errors += [f"--config.{k.replace('_', '-')} must be positive (got {v})" for k, v in positive.items() if not v > 0]
    if cfg.stop_at is not None and cfg.stop_at <= 0:
        errors.append(f"--config.stop-at must be positive (got {cfg.stop_at})")
    if cfg.steps_per_call > 0:  # updates go steps_per_call at a time: these would be rounded up (logs and
        # grids, at the first call boundary after their step, may fall between)
        counts = {"total-steps": cfg.total_steps, "saving-step": cfg.saving_step, "stop-at": cfg.stop_at}
        errors += [f"--config.{k} ({v}) must be a multiple of --config.steps-per-call ({cfg.steps_per_call})"
                   for k, v in counts.items() if v is not None and v > 0 and v % cfg.steps_per_call]
    shards = num_devices * cfg.grad_accum
    if cfg.batch_size > 0 and cfg.grad_accum > 0 and cfg.batch_size % shards:
        errors.append(f"--config.batch-size {cfg.batch_size} must be divisible by devices × grad-accum = "
                      f"{num_devices} × {cfg.grad_accum} = {shards}")
    if cfg.ict.s0 > cfg.ict.s1:
        errors.append(f"--config.ict.s0 ({cfg.ict.s0}) must not exceed --config.ict.s1 ({cfg.ict.s1})")
    if not cfg.model.sigma_min < cfg.model.sigma_max:
        errors.append(f"--config.model.sigma-min ({cfg.model.sigma_min}) must be below "
                      f"--config.model.sigma-max ({cfg.model.sigma_max})")
    elif not cfg.model.sigma_min < cfg.sample.two_step_sigma < cfg.model.sigma_max:
        errors.append(f"--config.sample.two-step-sigma ({cfg.sample.two_step_sigma}) must lie between sigma-min and sigma-max")
    if not 0 <= cfg.optim.ema_decay < 1:
        errors.append(f"--config.optim.ema-decay must be in [0, 1) (got {cfg.optim.ema_decay})")
    if not 0 <= cfg.model.torso.dropout < 1:
        errors.append(f"--config.model.torso.dropout must be in [0, 1) (got {cfg.model.torso.dropout})")
    if cfg.loss.huber_c is not None and cfg.loss.huber_c <= 0:
        errors.append(f"--config.loss.huber-c must be positive (got {cfg.loss.huber_c})")
    if cfg.fid.enabled:

        if cfg.fid.num < 2:
            errors.append(f"--config.fid.num must be at least 2 (got {cfg.fid.num})")
        if cfg.fid.batch_size <= 0:
            errors.append(f"--config.fid.batch-size must be positive (got {cfg.fid.batch_size})")
        if not cfg.fid.modes or len(set(cfg.fid.modes)) != len(cfg.fid.modes):
            errors.append(f"--config.fid.modes must name distinct modes, at least one (got {cfg.fid.modes})")
        if cfg.fid.ref is not None and not Path(cfg.fid.ref).is_file():
            errors.append(f"--config.fid.ref {cfg.fid.ref}: no such file")
    if cfg.phema:
        widest = gamma_to_sigma_rel(0.0)
        if not cfg.phema_sigma_rels or any(not 0 < s < widest for s in cfg.phema_sigma_rels) \
                or len(set(cfg.phema_sigma_rels)) != len(cfg.phema_sigma_rels):
            errors.append(f"--config.phema-sigma-rels must be distinct values in (0, {widest:.4f}) "
                          f"(got {cfg.phema_sigma_rels})")
    if cfg.model.image_size > 0 and cfg.model.image_size % 2 ** (len(cfg.model.torso.ch_mult) - 1):
        errors.append(f"--config.model.image-size {cfg.model.image_size} must be divisible by 2^(levels-1)")
    errors += _workdir_errors(cfg.workdir)
    return errors


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are allowed but most likely a mistake, one line each (logged at the start of training)."""
    warnings = []
    if cfg.data.flip and cfg.data.source == "digits":
        warnings.append("digits mirrored left-right are mostly not digits: --config.data.no-flip (the digits preset's) "
                        "trains on them as they are")
    return warnings


def _workdir_errors(workdir: str) -> list[str]:

    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"--config.workdir {workdir}: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"--config.workdir {workdir}: {existing} is not writable"]
    return []
