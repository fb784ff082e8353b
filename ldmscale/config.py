"""The typed config tree: one dataclass per config group, composed by Hydra from conf/.

Each section is handed to the code that owns it (`build_unet(cfg.model)`), never the
whole tree. Unknown keys and wrong types fail at compose time with the key's full path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

# conf/ sits beside the package in a source checkout; a wheel carries it as ldmscale/conf.
_PKG_DIR = Path(__file__).resolve().parent
CONF_DIR = next(
    (p for p in (_PKG_DIR / "conf", _PKG_DIR.parent / "conf") if (p / "config.yaml").is_file()),
    _PKG_DIR.parent / "conf",
)


# ---------------------------------------------------------------------------- model
@dataclass
class UNetConfig:
    """The latent denoiser (LDM/SD U-Net)."""

    preset: str = "tiny"
    in_channels: int = 4  # latent channels + concatenated conditioning channels
    out_channels: int = 4
    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [1, 2])  # downsample factors
    num_heads: int = -1
    num_head_channels: int = 16
    transformer_depth: list[int] = field(default_factory=lambda: [1])  # per level; one value broadcasts
    transformer_depth_middle: Optional[int] = None  # None: the last level's depth
    context_dim: Optional[int] = 64
    use_linear_in_transformer: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    dropout: float = 0.0
    num_classes: Optional[int] = None
    adm_in_channels: Optional[int] = None  # vector conditioning (SDXL: pooled text + size embeddings)
    norm_num_groups: int = 32
    # transformer (SpatialTransformer) | plain (the original AttentionBlock of LDM's unconditional/concat models)
    attention_block: str = "transformer"
    use_new_attention_order: bool = False  # plain blocks: q/k/v split before heads (the original's QKVAttention)
    num_heads_upsample: int = -1  # plain blocks with num_heads: the decoder half's head count (-1: num_heads)
    disable_self_attentions: Optional[list[bool]] = None  # per level: attn1 attends to the context (SD x4 upscaler)
    disable_middle_self_attn: bool = False
    weights: Optional[str] = None  # start from a checkpoint (LDM file, diffusers folder or our export)
    attention_backend: str = "sdpa"  # sdpa | xformers | math
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile each U-Net block (regional) of the denoiser that trains
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: tracing without codegen)


# ---------------------------------------------------------------------------- autoencoder
@dataclass
class AutoencoderConfig:
    """The stage-1 autoencoder (KL or VQ) and how its latents are scaled for stage 2."""

    preset: str = "tiny_kl_f4"
    kind: str = "kl"  # kl | vq
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    dropout: float = 0.0
    resolution: int = 256  # only locates attn_resolutions (given in pixels at each level)
    attn_type: str = "vanilla"  # vanilla | none (LDM's vq-f4-noattn: no attention, not even in the mid block)
    n_embed: int = 256  # VQ codebook size
    beta: float = 0.25  # VQ commitment weight
    # VQ: plain = learned codes (LDM; loads CompVis weights); linear = SimVQ, a learned linear map of frozen
    # random codes, which keeps a codebook trained from scratch in use (exports fold it back to plain)
    codebook: str = "plain"
    # KL only: latents anchored to the bicubic downsample, decoder adds to its upsample (ae_photo; not diffusers)
    bicubic_skip: bool = False
    # null: from data.use_manifest_scale, else the weights' own (a stage-1 run's latent_scale.json), else 1.0/0.0;
    # decided once when the config is built (ldmscale.latent_scale), so config.json holds what training uses
    scale_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    weights: Optional[str] = None  # a file, diffusers folder, or stage-1 run directory


# ---------------------------------------------------------------------------- stage-1 loss
@dataclass
class AutoencoderLossConfig:
    """Stage-1 (autoencoder) training: reconstruction, LPIPS, KL/codebook, PatchGAN and its optimiser."""

    rec_loss: str = "l1"  # l1 | l2
    perceptual_weight: float = 1.0  # 0: no LPIPS (then no weight files are needed)
    lpips_vgg_weights: Optional[str] = None  # torchvision vgg16 state dict (.pth / .safetensors)
    lpips_lin_weights: Optional[str] = None  # lpips package's linear heads (lin0..lin4), e.g. vgg.pth
    kl_weight: float = 1.0e-6  # KL
    sum_over_pixels: bool = True  # LDM: per-sample sums; False: per-pixel means (KL scaled alike)
    logvar_init: float = 0.0
    learn_logvar: bool = False
    codebook_weight: float = 1.0  # VQ: codebook + beta * commitment
    disc_start: int = 50001  # optimizer step at which the discriminator (and the G adversarial term) switch on
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    adaptive_weight: bool = True  # LDM's grad-norm ratio at the decoder's last layer
    disc_in_channels: int = 3
    disc_ndf: int = 64
    disc_num_layers: int = 3
    disc_norm: str = "group"  # group | batch | none (group: no per-rank buffers under ZeRO)
    disc_lr: Optional[float] = None  # None: optim.lr
    eval_shards: list[str] = field(default_factory=list)  # held-out raw shards for PSNR/SSIM
    num_eval_samples: int = 64
    num_grid_samples: int = 8
    estimate_scale_samples: int = 256  # images used to estimate the latent scale factor at the end


# ---------------------------------------------------------------------------- conditioner
@dataclass
class ConditionerConfig:
    """How the U-Net is conditioned: one of `ldmscale.conditioning.KINDS` (text, sdxl, class, layout, sr,
    inpaint, none) and its settings."""

    kind: str = "text"  # a key of ldmscale.conditioning.KINDS
    ucg_rate: float = 0.1  # probability of dropping the condition (for classifier-free guidance)
    # text (open_clip)
    text_model: str = "ldmscale-tiny-text"
    text_weights: Optional[str] = None
    text_layer: str = "last"  # last | penultimate
    context_length: int = 77
    # sdxl: the second tower (OpenCLIP ViT-bigG/14); text_model is the first (CLIP ViT-L/14). text_weights may
    # also be an SDXL sgm single file or a diffusers folder holding both towers.
    text_model_2: str = "ldmscale-tiny-bigg"
    text_weights_2: Optional[str] = None
    ucg_rate_2: Optional[float] = None  # tower 2's own drop rate (None: ucg_rate); dropped independently
    size_embed_dim: int = 256  # each size/crop number's sinusoidal embedding
    # class / layout
    num_classes: int = 0
    max_boxes: int = 4
    layout_dim: int = 64
    # layout: also concatenate the boxes' coverage map (latent resolution) onto x_t. LDM conditions through
    # cross-attention only; a small model trained briefly then learns the classes but not where the boxes are.
    layout_raster: bool = False
    # sr / inpaint
    sr_factor: int = 4
    concat_channels: int = 0  # 0: sr → 3 (the low-res image), inpaint → latent channels + 1 (mask)


# ---------------------------------------------------------------------------- diffusion
@dataclass
class ScheduleConfig:
    """Noise schedule (betas) of the forward process."""

    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | cosine
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False


@dataclass
class DiffusionConfig:
    """The training objective and the default sampler."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction_type: str = "eps"  # eps | v | x0
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "uniform"  # uniform | min_snr
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    sampler: str = "ddim"
    num_sampling_steps: int = 50
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0
    timestep_spacing: str = "leading"  # leading | trailing | linspace
    eta: float = 0.0
    karras_sigmas: bool = False  # Karras et al. (2022) sigma spacing for dpmpp_2m / euler


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Where batches come from and how big they are (see ldmscale/data/)."""

    kind: str = "cached"  # cached | online
    # cached: shard URLs or a cache folder (its manifest.json lists the shards); online: raw shard URLs.
    # Brace patterns, local folders and `pipe:` commands are expanded (ldmscale.data.shards.expand_urls).
    train_shards: list[str] = field(default_factory=list)
    shard_weights: list[float] = field(default_factory=list)  # one per train_shards entry; empty: natural sizes
    resolution: int = 32
    buckets: list[list[int]] = field(default_factory=list)  # [[h, w], ...]; empty: see aspect_buckets
    aspect_buckets: bool = False  # generate equal-area buckets around `resolution` (else square only)
    bucket_step: int = 64  # bucket sides are multiples of this
    max_bucket_aspect: float = 2.0  # generated buckets span aspect ratios 1/x .. x
    micro_batch_size: int = 32
    global_batch_size: int = 32
    num_workers: int = 0
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000  # online path only: samples shuffled in a streaming buffer
    # cached path: samples are shuffled within windows of this many shards (after a shard permutation);
    # bigger = closer to a global shuffle, but more index memory and open files per worker (README)
    shuffle_window: int = 64
    samples_per_epoch: int = 0  # online path: samples per epoch over all ranks (0: one pass, 1 rank only)
    # Raw-image limits (cache job and online path), read from the header before any pixel is decoded:
    min_size: Optional[int] = None  # short side below this: "too_small"; None: a quarter of resolution; 0: off
    max_aspect_ratio: float = 4.0  # long/short side above this: "extreme_aspect" (0: no limit)
    max_pixels: int = 50_000_000  # width*height above this: "too_many_pixels" (a 12000² PNG decodes to 2 GB)
    max_caption_bytes: int = 2048  # captions are cut to this many UTF-8 bytes before encoding/storing
    filters: list[str] = field(default_factory=list)  # e.g. ["aesthetic >= 5", "pwatermark < 0.5"]
    random_crop: bool = False
    random_flip: bool = False
    use_manifest_scale: bool = False  # take scale/shift from the cache manifest's latent statistics


# ---------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    fused: bool = False  # DeepSpeed's fused Adam (GPU); torch AdamW otherwise
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0


# ---------------------------------------------------------------------------- deepspeed
@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs the optimisation; `extra` passes raw DeepSpeed keys through."""

    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_clipping: float = 1.0
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    nvme_path: str = "/local_nvme"
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    zero3_init: bool = False  # build the model already partitioned (deepspeed.zero.Init) at stage 3
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """W&B and console logging."""

    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "ldmscale"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True
    run_name: Optional[str] = None  # W&B run name; default: cfg.name


# ---------------------------------------------------------------------------- launcher
@dataclass
class LauncherConfig:
    """Where the job runs: here (local) or on SLURM through submitit (ldmscale/launch/slurm.py)."""

    kind: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 0  # 0: no GRES request at all (a GRES request on a node without GRES fails)
    tasks_per_node: int = 0  # 0: one task per GPU (one task without GPUs)
    cpus_per_task: int = 1
    mem_gb: int = 0  # per node; 0: the partition's default
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 60  # below 50, submitit counts every signal (even preemption) as a timeout
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time to save a checkpoint
    max_num_timeout: int = 3  # requeues after a timeout (preemptions do not count)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # raw sbatch keys
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda"
    job_name: str = "ldmscale"
    folder: str = "${run_dir}/slurm"  # sbatch scripts, pickles and logs (%j = job id, %t = task)
    array_parallelism: int = 16  # array tasks running at once (cache arrays, sweeps)
    shards_per_task: int = 1  # cache arrays: input shards per array task


# ---------------------------------------------------------------------------- trainer & friends
@dataclass
class TrainerConfig:
    """How long to train and how often to report."""

    max_steps: int = 100
    log_every_steps: int = 10
    sample_every_steps: int = 0  # 0: never during training
    max_nonfinite_steps: int = 10
    peak_flops: float = 0.0  # per device; 0: detect from the GPU (CPU: MFU reported against 1 TFLOP/s)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red circle in the top left", "a blue square in the bottom right",
        "a green triangle in the top right", "a yellow circle in the bottom left"])
    sample_seed: int = 0
    sample_steps: int = 20  # sampler steps for the periodic grids


@dataclass
class EvalConfig:
    """Sample quality of stage 2 (FID with pytorch-fid's Inception, CLIP score), in the loop and offline
    (tools/evaluate.py); stage 1's rFID uses the same Inception (inception_weights)."""

    every_steps: int = 0  # in-loop evaluation of the EMA weights; 0: never
    num_images: int = 1000  # generated images per evaluation; image i uses seed `seed + i`
    seed: int = 0
    batch_size: int = 25  # generation and feature batch per rank
    num_steps: int = 0  # sampler steps; 0: diffusion.num_sampling_steps
    prompts: list[str] = field(default_factory=list)  # image i gets prompt i mod P; empty: trainer.sample_prompts
    prompts_file: Optional[str] = None  # one prompt a line (instead of prompts)
    reference_stats: Optional[str] = None  # pytorch-fid .npz (mu, sigma) from tools/fid_stats.py: FID needs it
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors); unset: pytorch-fid's own cache
    # file ($TORCH_HOME/hub/checkpoints) when present, else no FID/rFID
    inception_weights: Optional[str] = None
    clip_model: str = "ViT-L-14"  # an open_clip architecture, or ldmscale-tiny-clip (fixed random weights)
    clip_weights: Optional[str] = None  # open_clip weights file; unset: no CLIP score (tiny model aside)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 500
    keep_last: int = 3
    resume: bool = True
    load_weights_only: Optional[str] = None  # a consolidated checkpoint to start from
    dir: str = "${run_dir}/checkpoints"
    save_at_end: bool = True
    # How often (steps) ranks agree on signals (SIGUSR1/SIGTERM) and count non-finite steps: each check is a
    # host sync and, with several ranks, an all-reduce; logged and checkpoint steps check as well.
    signal_check_steps: int = 10


@dataclass
class EMAConfig:
    """Moving average of the trained weights: exponential, or EDM2's power function (length chosen post hoc)."""

    enabled: bool = True
    kind: str = "exponential"  # exponential | power (EDM2: tools/posthoc_ema.py picks σ_rel after training)
    decay: float = 0.999  # exponential only
    start_step: int = 0  # exponential only: before it the EMA copies the weights
    # power only: one tracked profile per relative width σ_rel (EDM2's pair); the first is the live EMA
    # (sample grids, export, eval). Snapshots of all profiles every snapshot_every_steps (and at the last
    # step) go to checkpoint.dir/ema_snapshots as fp16 safetensors; 0 = none (no post-hoc EMA).
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every_steps: int = 1000
    # power only: the σ_rel values the demo (stage=demo) reconstructs after stage 2 and evaluates each of
    posthoc_sigma_rels: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.08, 0.12, 0.2])


@dataclass
class CacheConfig:
    """The offline latent/text-embedding cache job (tools/cache_latents.py, ldmscale/data/cache.py)."""

    # Raw shard URLs: brace patterns, folders, `pipe:` commands; several separated by whitespace or "::".
    input: str = ""
    output: str = ""  # folder of cached shards + manifest.json
    num_workers: int = 1  # local mode: worker processes (one per GPU when device is cuda)
    batch_size: int = 32  # encoder batch (samples of one bucket)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    latent_dtype: str = "bf16"  # bf16 | fp16 | fp32: how KL moments / VQ latents are stored
    text_dtype: str = "fp16"  # fp16 | bf16 | fp32
    # embeddings: store the real tokens' embeddings; tokens: store token ids only and run the frozen text
    # tower(s) in the training process (see README, "Text in the cache")
    text: str = "embeddings"
    max_failure_rate: float = 0.05  # skipped/read above this → the job exits non-zero
    # a stream (pipe:, URL) that delivers no byte for this long is killed; its shard stays incomplete
    read_timeout_s: float = 600.0
    progress: bool = True


@dataclass
class PipelineConfig:
    """The end-to-end demo (stage=demo): synthetic shards → stage-1 autoencoder → cache → U-Net → eval.

    Each step writes into run_dir and is skipped or resumed when re-run, so Ctrl-C loses nothing.
    """

    num_train_samples: int = 10000
    num_val_samples: int = 256
    shard_size: int = 2500
    holdout: list[str] = field(default_factory=lambda: ["blue triangle"])  # never trained; reported apart
    autoencoder_experiment: str = "ae_demo"  # stage 1 = this experiment + the demo's own overrides
    autoencoder_overrides: list[str] = field(default_factory=list)  # then these, for stage 1 only
    eval_seeds_per_prompt: int = 2
    eval_batch_size: int = 72


@dataclass
class Config:
    """The whole run. Public keys are documented in the README."""

    name: str = "demo"
    run_dir: str = "runs/${name}"
    seed: int = 0
    stage: str = "diffusion"  # diffusion (stage 2) | autoencoder (stage 1) | demo (the whole pipeline)
    dry_run: bool = False
    model: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ae_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key's full path."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "stage": ("diffusion", "autoencoder", "demo"),
    "autoencoder.kind": ("kl", "vq"),
    "autoencoder.codebook": ("plain", "linear"),
    "cache.text": ("embeddings", "tokens"),
    "conditioner.text_layer": ("last", "penultimate"),
    "diffusion.prediction_type": ("eps", "v", "x0"),
    "diffusion.timestep_sampling": ("uniform", "logit_normal"),
    "diffusion.weighting": ("uniform", "min_snr"),
    "diffusion.timestep_spacing": ("leading", "trailing", "linspace"),
    "diffusion.sampler": ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"),
    "diffusion.schedule.beta_schedule": ("linear", "scaled_linear", "cosine"),
    "data.kind": ("cached", "online"),
    "optim.lr_schedule": ("constant", "cosine"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "deepspeed.offload_optimizer": ("none", "cpu", "nvme"),
    "deepspeed.offload_param": ("none", "cpu", "nvme"),
    "deepspeed.backend": ("auto", "nccl", "gloo"),
    "logger.wandb_mode": ("offline", "online", "disabled"),
    "launcher.kind": ("local", "slurm"),
    "ema.kind": ("exponential", "power"),
    "model.attention_backend": ("sdpa", "xformers", "math"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot; raise ConfigError naming the key."""
    from ldmscale.conditioning import KINDS

    for key, choices in {**_CHOICES, "conditioner.kind": tuple(KINDS)}.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    for key in ("data.micro_batch_size", "data.global_batch_size", "trainer.max_steps",
                "trainer.log_every_steps", "checkpoint.every_steps", "checkpoint.signal_check_steps"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    for key in ("launcher.nodes", "launcher.cpus_per_task", "launcher.timeout_min",
                "launcher.array_parallelism", "launcher.shards_per_task"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    for key in ("data.shuffle_window", "cache.read_timeout_s"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    for key in ("eval.num_images", "eval.batch_size"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    if cfg.eval.every_steps and cfg.conditioner.kind not in ("text", "sdxl", "class", "none"):
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps}: in-loop FID needs a fixed prompt/class set, "
                          f"which conditioner.kind={cfg.conditioner.kind!r} cannot use; set eval.every_steps=0")
    if cfg.eval.every_steps and not (cfg.eval.reference_stats or cfg.eval.clip_weights
                                     or cfg.eval.clip_model == "ldmscale-tiny-clip"):
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} measures nothing: set eval.reference_stats "
                          "(FID, from tools/fid_stats.py) and/or eval.clip_weights (CLIP score)")
    for key in ("launcher.gpus_per_node", "launcher.tasks_per_node", "launcher.mem_gb",
                "launcher.signal_delay_s", "launcher.max_num_timeout"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    for key in ("data.num_workers", "data.max_aspect_ratio", "data.max_pixels", "data.max_caption_bytes",
                "optim.lr", "optim.eps", "optim.weight_decay", "optim.warmup_steps", "trainer.max_nonfinite_steps"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    if cfg.data.min_size is not None and cfg.data.min_size < 0:
        raise ConfigError(f"data.min_size={cfg.data.min_size} must be >= 0 (or null: a quarter of data.resolution)")
    if 0 < cfg.data.max_aspect_ratio < 1:
        raise ConfigError(f"data.max_aspect_ratio={cfg.data.max_aspect_ratio} must be >= 1 (or 0: no limit)")
    if not all(0 <= b < 1 for b in cfg.optim.betas) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    _validate_ema(cfg.ema)
    if cfg.data.global_batch_size % cfg.data.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of "
            f"data.micro_batch_size={cfg.data.micro_batch_size}"
        )
    return cfg


def _validate_ema(ema: EMAConfig) -> None:
    if ema.snapshot_every_steps < 0:
        raise ConfigError(f"ema.snapshot_every_steps={ema.snapshot_every_steps} must be >= 0 (0: no snapshots)")
    if ema.kind == "power" and not ema.sigma_rels:
        raise ConfigError("ema.sigma_rels is empty: ema.kind=power tracks one profile per σ_rel")
    limit = (1 / 12) ** 0.5  # σ_rel of the flattest profile (γ → 0)
    for key in ("ema.sigma_rels", "ema.posthoc_sigma_rels"):
        for value in getattr(ema, key.split(".")[1]):
            if not 0 < value < limit:
                raise ConfigError(f"{key} holds {value}: every σ_rel must lie in (0, {limit:.4f})")


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of a composed config that the schema does not have, as full dotted paths (free-form dict
    fields such as deepspeed.extra take anything). `+key=value` overrides bypass Hydra's own check."""
    import typing

    hints = typing.get_type_hints(schema)
    found = []
    for key in node:
        if prefix == "" and key == "hydra":
            continue
        if key not in hints:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return found


def check_paths(cfg: Config) -> None:
    """Fail at start, naming the key, on paths a run would otherwise trip on later (or deep in a library):
    run_dir and checkpoint.dir must be creatable, writable folders; local data.train_shards must exist."""
    import os

    for key in ("run_dir", "checkpoint.dir"):
        path = Path(creatable_dir(str(_get(cfg, key)), key))
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{key}={str(path)!r} is not writable")
    for i, url in enumerate(cfg.data.train_shards):
        if any(mark in url for mark in ("pipe:", "://", "::")):
            continue  # streams and remote URLs are checked when opened
        path = Path(url.split("{")[0]).parent if "{" in url else Path(url)
        if not path.exists():
            raise ConfigError(f"data.train_shards[{i}]={url!r}: {str(path)!r} does not exist (conf/experiment/"
                              f"{cfg.name}.yaml says how to make its data; caches come from tools/cache_latents.py)")


def to_object(cfg: DictConfig | Config) -> Config:
    """Turn a composed DictConfig into the typed `Config` (interpolations resolved)."""
    if isinstance(cfg, Config):
        return cfg
    from ldmscale.latent_scale import resolve

    unknown = unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}: not in the schema (ldmscale/config.py); "
                          "check the spelling, or the section it belongs to")
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return resolve(validate(OmegaConf.to_object(merged)))  # type: ignore[arg-type]


def default_run_dir(single: str) -> str:
    """`run_dir`'s default (`${ldmscale.run_dir:runs/${name}}` in conf/config.yaml): `single` for one
    run; in a Hydra multirun, each sweep job's own output folder (hydra.sweep.dir/hydra.sweep.subdir),
    so sweep points never share checkpoints (and resume from each other), while re-running the same
    sweep resumes every point from its own folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.runtime.get("output_dir"):
            return str(hydra_cfg.runtime.output_dir)
    return single


def register_configs() -> None:
    """Register the schema so conf/config.yaml can name it first in its defaults list, and the
    `ldmscale.run_dir` resolver it uses."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ldmscale_schema", node=Config)
    if not OmegaConf.has_resolver("ldmscale.run_dir"):
        OmegaConf.register_new_resolver("ldmscale.run_dir", default_run_dir)
    if not OmegaConf.has_resolver("ldmscale.creatable"):
        OmegaConf.register_new_resolver("ldmscale.creatable", creatable_dir)


def creatable_dir(path: str, key: str = "run_dir") -> str:
    """`path` unchanged if it is (or can be made) a folder; else a ConfigError naming `key`. Hydra makes
    hydra.run.dir (= run_dir) before any of our code runs, so the check sits in that interpolation."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={path!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}={path!r} cannot be created: {err.strerror or err}") from None
    return path


def compose(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose the config as `python -m ldmscale.train OVERRIDES` would (also from inside a Hydra app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    overrides = normalize_overrides(list(overrides or []))
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main: reuse its search path
        return to_object(hydra_compose(config_name, overrides=overrides))
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        composed = hydra_compose(config_name, overrides=overrides)
    return to_object(composed)


def quote_override_value(value: str) -> str:
    """Quote a string for a Hydra override, so paths with braces, commas or spaces pass through."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _schema_kind(dotted: str) -> Optional[str]:
    """'str' or 'list' for a string or list key of the schema, else None (unknown keys, numbers, dicts)."""
    import typing

    node: Any = Config
    hint: Any = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        node = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    origin = typing.get_origin(node)
    if node is str:
        return "str"
    if origin is list and typing.get_args(node) in ((str,), ()):
        return "list"
    return None


def _split_items(text: str) -> list[str]:
    """Top-level comma-separated items of a list override (commas inside {a,b} braces stay)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [item.strip() for item in [*items, current] if item.strip()]


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Shell-friendly overrides for Hydra's grammar, which reads `{...}` as a dict and needs lists in
    brackets. For string and list-of-string keys only: a value with braces, commas or spaces is
    quoted, and a list key given a bare value becomes a one-item list, so all of these work:
    `data.train_shards=DIR/x-{000000..000007}.tar`, `data.train_shards=[DIR/x-{000000..000007}.tar,DIR2]`,
    `cache.input=DIR/x-{000000..000007}.tar`. Values already quoted, and every other key, pass unchanged."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        plain = sep and not key.startswith("-") and "${" not in value and value not in ("null", "")
        kind = _schema_kind(key.lstrip("+~")) if plain else None
        if kind == "str" and value[:1] not in "'\"" and any(ch in value for ch in "{}[], "):
            override = f"{key}={quote_override_value(value)}"
        elif kind == "list" and value[:1] not in "'\"":
            bracketed = value.startswith("[") and value.endswith("]")
            if not bracketed or "{" in value:
                items = _split_items(value[1:-1] if bracketed else value)
                quoted = [i if i[:1] in "'\"" else quote_override_value(i) for i in items]
                override = f"{key}=[{','.join(quoted)}]"
        out.append(override)
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`key.path=value` settings onto an already composed config (a run's config.json, an export's). Config
    groups and experiments (`model=tiny`, `+experiment=X`) cannot be re-composed there: refused by name."""
    if not overrides:
        return cfg
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or key.startswith(("+", "~")) or "." not in key:
            raise ConfigError(f"override {override!r}: this config is already composed (a run or an export), so "
                              "only key.path=value settings apply (e.g. autoencoder.weights=PATH), not config "
                              "groups, experiments or additions")
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    return to_object(merged)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config beside the checkpoints (run_dir/config.yaml and .json)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    as_dict = to_dict(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict)))
    path = run_dir / "config.json"
    path.write_text(json.dumps(as_dict, indent=2))
    return path
