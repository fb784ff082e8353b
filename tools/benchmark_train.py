"""Training-loop benchmarks on CPU, as ratios measured in the same run (interleaved rounds, medians):

  (a) overhead: the Trainer's step (DeepSpeed engine, EMA, loss bookkeeping, metrics) against a bare
      forward/backward/clip/fused-AdamW step of the same denoiser on the same batch (goal: ≤ 5%);
  (b) cache: Trainer steps fed by the cached loader against the online path that decodes and encodes
      raw shards in the training process, with a realistic first stage: the KL-f8 SD VAE (random weights)
      at 256 px (goal: ≥ 1.5× faster). It also prints what FLOP counts predict for the SD2 U-Net paired
      with that VAE, where the U-Net's step no longer is tiny beside the encoder.

    PYTHONPATH=. python tools/benchmark_train.py [--micro-batch 16] [--steps 4] [--rounds 5] [--json OUT]

Each contender is timed in wall-clock AND process CPU seconds (one torch thread, everything in this
process): on a shared machine the wall clock swings with other people's jobs, CPU time much less, so the
goals are judged on CPU time and both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldmscale.config import Config, compose  # noqa: E402


def make_data(root: Path, cfg: Config, num_samples: int, shard_size: int) -> tuple[list[str], Path]:
    """Raw synthetic shards and their latent cache (made with cfg's encoders)."""
    from ldmscale.data.cache import run_cache_job
    from ldmscale.data.synthetic import write_shards

    shards = write_shards(root / "raw", num_samples, cfg.data.resolution, shard_size, progress=False)
    cfg.cache.input = f"{root}/raw/shapes-{{000000..{len(shards) - 1:06d}}}.tar"
    cfg.cache.output = str(root / "cache")
    cfg.cache.progress, cfg.cache.device, cfg.cache.num_workers = False, "cpu", 1
    run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
    return [str(p) for p in shards], root / "cache"


class RepeatBatch:
    """The same batch forever: both sides of the overhead ratio see identical inputs and no data cost."""

    def __init__(self, batch: dict[str, Any]):
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


def trainer_for(cfg: Config, task: Any, loader: Any, accumulation: int, flops: float, run_dir: Path) -> Any:
    """A Trainer wired as ldmscale.train.run wires it (metrics logger on, checkpoints out of the way)."""
    from ldmscale import checkpoint as ckpt
    from ldmscale.metrics import build_logger, detect_peak_flops
    from ldmscale.trainer import Trainer

    trainer = Trainer(task, loader, cfg.trainer, checkpointer=ckpt.Checkpointer(cfg.checkpoint, run_dir / "ckpt"),
                      accumulation_steps=accumulation, world_size=1, run_dir=run_dir,
                      flops_per_image=flops, peak_flops=detect_peak_flops(cfg.trainer.peak_flops))
    trainer.logger = build_logger(cfg.logger, run_dir, is_main=True, config=None, total_steps=10**9)
    return trainer


Timing = tuple[float, float]  # (wall, CPU) seconds per step


def _time(fn: Callable[[], Any], steps: int) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def fit_steps(trainer: Any, steps: int) -> Timing:
    """Seconds per step of `steps` more steps of Trainer.fit()."""
    trainer.cfg.max_steps = trainer.step + steps
    wall, cpu = _time(trainer.fit, 1)
    return wall / steps, cpu / steps


def bare_stepper(cfg: Config, batch: dict[str, Any]) -> Callable[[int], Timing]:
    """forward → loss → backward → clip → AdamW, on a plain denoiser (same init, config and batch)."""
    from ldmscale.diffusion.objective import DiffusionObjective
    from ldmscale.models import build_denoiser

    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(cfg.model, cfg.conditioner)
    objective = DiffusionObjective(cfg.diffusion)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = batch["latents"].float()
    conditioning = denoiser.conditioning
    cond_all = {k: batch[k] for k in conditioning.cond_keys if k in batch}

    def step() -> None:
        cond = conditioning.drop(conditioning.prepare(cond_all), cfg.conditioner.ucg_rate, generator)
        loss = objective.loss(denoiser, latents, cond, generator=generator).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.deepspeed.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return lambda steps: _time(step, steps)


def interleaved(runs: dict[str, Callable[[int], Timing]], steps: int, rounds: int) -> dict[str, Timing]:
    """Median (wall, CPU) seconds/step of each contender over `rounds` short rounds, alternating the order."""
    for run in runs.values():
        run(2)  # warm-up: allocator, first-step optimiser state
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(runs[name](steps))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in times.items()}


def base_config(root: Path, name: str, micro_batch: int, overrides: list[str]) -> Config:
    return compose([f"data.micro_batch_size={micro_batch}", f"data.global_batch_size={micro_batch}",
                    "trainer.log_every_steps=10", "trainer.sample_every_steps=0", "checkpoint.save_at_end=false",
                    "checkpoint.resume=false", f"checkpoint.every_steps={10**9}", "logger.wandb_mode=disabled",
                    "logger.progress_bar=false", f"run_dir={root}/{name}", *overrides])


def predicted_cache_speedup(overrides: list[str]) -> dict[str, float]:
    """FLOP-count estimate of online/cached for the SD2 U-Net with this first stage (text encoder left out):
    (3·U-Net forward + VAE encoder) / (3·U-Net forward), at equal efficiency of both."""
    from ldmscale.models import build_autoencoder, count_flops
    from ldmscale.train import flops_per_image

    cfg = compose(["model=sd2", "conditioner=openclip_vit_h14", *overrides])
    with torch.device("meta"):
        autoencoder = build_autoencoder(cfg.autoencoder)
    side = cfg.data.resolution
    encoder = torch.nn.Sequential(autoencoder.encoder, autoencoder.quant_conv)
    encode = count_flops(encoder, torch.zeros(1, 3, side, side))
    unet = flops_per_image(cfg)
    return {"sd2_unet_fwd_gflop": unet / 1e9, "vae_encode_gflop": encode / 1e9,
            "sd2_predicted_speedup": (3 * unet + encode) / (3 * unet)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=128, help="synthetic samples in the raw shards")
    parser.add_argument("--cache-overrides", nargs="*", default=["autoencoder=kl_f8", "data.resolution=256"],
                        help="(b): the first stage and resolution of the cache comparison")
    parser.add_argument("--cache-micro-batch", type=int, default=1, help="(b): images per step")
    parser.add_argument("--cache-samples", type=int, default=8, help="(b): raw samples (each encoded ~8 s)")
    parser.add_argument("--cache-steps", type=int, default=2, help="(b): steps per timed block")
    parser.add_argument("--cache-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides of both parts (default: the demo config)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # env.setup() sets torch's threads from it
    torch.set_num_threads(args.threads)

    from ldmscale.data.loader import build_loader
    from ldmscale.distributed import env
    from ldmscale.train import build_diffusion_task

    root = Path(tempfile.mkdtemp(prefix="ldmscale-bench-train-"))
    b, cb = args.micro_batch, args.cache_micro_batch
    cfg = base_config(root, "run", b, args.overrides)
    make_data(root / "a", cfg, args.samples, shard_size=max(b, args.samples // 4))
    cfg.data.train_shards = [str(root / "a" / "cache")]
    cache_cfg = base_config(root, "run_b", cb, [*args.overrides, *args.cache_overrides])
    raw, cache = make_data(root / "b", cache_cfg, args.cache_samples, shard_size=max(cb, args.cache_samples // 2))
    cache_cfg.data.train_shards = [str(cache)]
    dist = env.setup("gloo")
    try:
        torch.manual_seed(cfg.seed)
        task, cached_loader, accumulation, flops = build_diffusion_task(cfg, dist)
        batch = next(iter(cached_loader))

        # (a) Trainer vs bare step on one batch; EMA timed alone to show its share.
        same = trainer_for(cfg, task, RepeatBatch(batch), accumulation, flops, root / "same")
        ema_update = (lambda n: _time(lambda: task.ema.update(10**6), n)) if task.ema is not None else None
        runs = {"trainer": lambda n: fit_steps(same, n), "bare": bare_stepper(cfg, batch)}
        if ema_update is not None:
            runs["ema_update"] = ema_update
        a = interleaved(runs, args.steps, args.rounds)
        same.logger.close()
        task.engine.destroy()

        # (b) cached loader vs online encoding (the VAE and text encoder in this process), both through the Trainer.
        torch.manual_seed(cache_cfg.seed)
        task, cached_loader, accumulation, flops = build_diffusion_task(cache_cfg, dist)
        online_cfg = base_config(root, "run_b", cb, ["data.kind=online", f"data.shuffle_buffer={cb}",
                                                     *args.overrides, *args.cache_overrides])
        online_cfg.data.train_shards = raw
        online_loader = build_loader(online_cfg.data, online_cfg.conditioner, online_cfg.autoencoder,
                                     seed=cfg.seed, rank=0, world_size=1)
        cached = trainer_for(cache_cfg, task, cached_loader, accumulation, flops, root / "cached")
        online = trainer_for(cache_cfg, task, online_loader, accumulation, flops, root / "online")
        c = interleaved({"cached": lambda n: fit_steps(cached, n), "online": lambda n: fit_steps(online, n)},
                        args.cache_steps, args.cache_rounds)
        for trainer in (cached, online):
            trainer.logger.close()
        task.engine.destroy()
    finally:
        env.teardown()

    ema = a.get("ema_update", (0.0, 0.0))
    figures: dict[str, Any] = {"micro_batch": b, "steps_per_block": args.steps, "rounds": args.rounds,
                               "cache_setup": {"overrides": args.cache_overrides, "micro_batch": cb},
                               **predicted_cache_speedup(args.cache_overrides)}
    for i, clock in enumerate(("wall", "cpu")):
        figures[clock] = {
            "trainer_step_s": a["trainer"][i], "bare_step_s": a["bare"][i], "ema_update_s": ema[i],
            "trainer_overhead": a["trainer"][i] / a["bare"][i] - 1,
            "trainer_overhead_without_ema": (a["trainer"][i] - ema[i]) / a["bare"][i] - 1,
            "cached_step_s": c["cached"][i], "online_step_s": c["online"][i],
            "cache_speedup": c["online"][i] / c["cached"][i],
        }
    for clock in ("cpu", "wall"):
        f = figures[clock]
        print(f"[{clock:4}] (a) trainer step {f['trainer_step_s'] * 1e3:.1f} ms vs bare fwd/bwd/clip/fused AdamW "
              f"{f['bare_step_s'] * 1e3:.1f} ms (micro batch {b}): overhead {100 * f['trainer_overhead']:+.1f}% "
              f"(goal ≤ +5%; EMA update {f['ema_update_s'] * 1e3:.1f} ms of it → "
              f"{100 * f['trainer_overhead_without_ema']:+.1f}% without)")
        print(f"[{clock:4}] (b) {' '.join(args.cache_overrides)}, micro batch {cb}: cached loader "
              f"{f['cached_step_s'] * 1e3:.1f} ms/step vs online encoding {f['online_step_s'] * 1e3:.1f} ms/step: "
              f"{f['cache_speedup']:.2f}× (goal ≥ 1.5×)")
    print(f"(b) FLOP-count prediction for the SD2 U-Net ({figures['sd2_unet_fwd_gflop']:.0f} GFLOP/img forward) "
          f"with this VAE ({figures['vae_encode_gflop']:.0f} GFLOP/img to encode): "
          f"{figures['sd2_predicted_speedup']:.2f}× (text encoder not counted)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
