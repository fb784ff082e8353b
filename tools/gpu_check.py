"""GPU check: DeepSpeed over NCCL trains the SD2-size U-Net in bf16 with SDPA; prints img/s and MFU.

    bash tools/gpu_check.sh                      # one GPU: 256/512 px, compiled, diffusers ratio (< 12 min)
    python tools/gpu_check.py --device cpu --preset tiny --resolution 32 --micro-batch 2 --steps 2   # CPU, gloo

It checks, and exits non-zero if one fails:
  1. SDPA: our attention() runs under the FLASH backend alone (bf16, the U-Net's head size), matching the
     math backend; whether masked cross-attention (padded text) can use it is reported, not required;
  2. the real training step (DiffusionTask → DeepSpeed ZeRO engine → EMA) on random latents/text: finite
     losses, then img/s, step time, MFU against the GPU's peak bf16 FLOP/s, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def sdpa_flash_check(device: torch.device, dtype: torch.dtype, *, heads: int = 5, head_dim: int = 64,
                     tokens: int = 1024, context: int = 77, batch: int = 2) -> dict[str, Any]:
    """Does ldmscale's attention() run on the flash kernel at these shapes, and does it match math?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldmscale.models.attention import attention

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, k, v = rand(batch, heads, tokens, head_dim), rand(batch, heads, tokens, head_dim), rand(batch, heads, tokens, head_dim)
    ck, cv = rand(batch, heads, context, head_dim), rand(batch, heads, context, head_dim)
    mask = torch.arange(context, device=device)[None].expand(batch, -1) < torch.tensor([[12], [40]], device=device)
    report: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "head_dim": head_dim}

    def runs_on(backend: SDPBackend, *args: Any) -> bool:
        try:
            with sdpa_kernel([backend]):
                attention(*args, backend="sdpa")
            return True
        except RuntimeError:  # "No available kernel": this backend cannot take these inputs
            return False

    with sdpa_kernel([SDPBackend.MATH]):
        reference = attention(q, k, v, None, backend="sdpa").float()
    report["self_attention_flash"] = runs_on(SDPBackend.FLASH_ATTENTION, q, k, v, None)
    report["cross_attention_flash"] = runs_on(SDPBackend.FLASH_ATTENTION, q, ck, cv, None)
    report["masked_cross_attention_flash"] = runs_on(SDPBackend.FLASH_ATTENTION, q, ck, cv, mask)
    report["masked_cross_attention_efficient"] = runs_on(SDPBackend.EFFICIENT_ATTENTION, q, ck, cv, mask)
    if report["self_attention_flash"]:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = attention(q, k, v, None, backend="sdpa").float()
        report["flash_vs_math_max_abs"] = (flash - reference).abs().max().item()
    report["ok"] = bool(report["self_attention_flash"] and report["cross_attention_flash"]
                        and report.get("flash_vs_math_max_abs", 1.0) < 2e-2)
    return report


def random_batch(cfg: Any, batch: int, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """Latents and conditions with the training batch's keys and shapes (all real tokens)."""
    from ldmscale.train import example_inputs

    latents, _, cond = example_inputs(cfg, batch=batch, device="cpu")
    out: dict[str, Any] = {"latents": torch.randn(latents.shape, generator=generator)}
    for key, value in cond.items():
        out[key] = torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
    if "context" in out:
        out["context_mask"] = torch.ones(out["context"].shape[:2], dtype=torch.bool)
    return {k: v.to(device) for k, v in out.items()}


def train_check(cfg: Any, *, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Time DiffusionTask.train_step through the DeepSpeed engine at cfg's model, batch and precision."""
    from ldmscale.diffusion.objective import DiffusionObjective
    from ldmscale.distributed import engine as eng
    from ldmscale.distributed import env
    from ldmscale.ema import PartitionedEMA
    from ldmscale.metrics import detect_peak_flops, mfu, peak_memory_gb
    from ldmscale.models import build_denoiser
    from ldmscale.train import flops_per_image
    from ldmscale.trainer import DiffusionTask

    dist = env.setup(cfg.deepspeed.backend)
    try:
        torch.manual_seed(cfg.seed)
        denoiser = build_denoiser(cfg.model, cfg.conditioner)
        params = sum(p.numel() for p in denoiser.parameters())
        flops = flops_per_image(cfg)
        engine = eng.initialize(denoiser.to(device), cfg.deepspeed, cfg.optim,
                                micro_batch_size=cfg.data.micro_batch_size,
                                global_batch_size=cfg.data.global_batch_size, world_size=dist.world_size,
                                max_steps=warmup + steps)
        ema = PartitionedEMA(engine.module, cfg.ema.decay, cfg.ema.start_step)
        task = DiffusionTask(engine, DiffusionObjective(cfg.diffusion), ema, conditioning=denoiser.conditioning,
                             ucg_rate=cfg.conditioner.ucg_rate, seed=cfg.seed, rank=dist.rank)
        batch = random_batch(cfg, cfg.data.micro_batch_size, engine.device, torch.Generator().manual_seed(0))
        micro = [batch] * engine.gradient_accumulation_steps
        losses = []

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for step in range(warmup):
            losses.append(task.train_step(micro, step)["loss"])
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            losses.append(task.train_step(micro, step)["loss"])
        sync()
        elapsed = time.perf_counter() - start
        images = steps * cfg.data.global_batch_size
        images_per_sec = images / elapsed
        peak = detect_peak_flops(cfg.trainer.peak_flops)
        loss_values = [float(x) for x in torch.stack(losses).cpu()]  # one host sync, at the end
        report = {
            "params": params, "flops_per_image_fwd": flops, "micro_batch": cfg.data.micro_batch_size,
            "zero_stage": engine.zero_stage, "precision": cfg.deepspeed.precision, "backend": cfg.deepspeed.backend,
            "world_size": dist.world_size, "steps": steps, "step_time_s": elapsed / steps,
            "images_per_sec": images_per_sec, "peak_flops": peak,
            "mfu": mfu(images_per_sec, flops, dist.world_size, peak), "peak_mem_gb": peak_memory_gb(),
            "losses": loss_values, "ok": all(map(lambda x: x == x and abs(x) < 1e4, loss_values)),
        }
        engine.destroy()
        return report
    finally:
        env.teardown()


def build_config(args: argparse.Namespace) -> Any:
    from ldmscale.config import compose

    cuda = args.device == "cuda"
    overrides = [f"model={args.preset}", f"data.resolution={args.resolution}",
                 f"data.micro_batch_size={args.micro_batch}", f"data.global_batch_size={args.micro_batch}",
                 f"deepspeed.zero_stage={args.zero_stage}", f"deepspeed.precision={args.precision}",
                 f"deepspeed.backend={'nccl' if cuda else 'gloo'}", "model.attention_backend=sdpa",
                 "optim.fused=false", "optim.lr=1e-5", "logger.wandb_mode=disabled"]
    if args.compile:  # the training path's regional compilation (ldmscale.models.unet.compile_blocks)
        overrides.append("model.compile=true")
    if args.preset != "tiny":  # the SD2 pairing: KL-f8 latents, OpenCLIP ViT-H/14 text width (1024)
        overrides += ["autoencoder=kl_f8", "conditioner=openclip_vit_h14"]
    return compose(overrides + list(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="sd2", help="model preset (conf/model): sd2, sd15, tiny, ...")
    parser.add_argument("--resolution", type=int, default=256, help="pixels (latents: /8 for KL-f8)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="model.compile=true (warm-up steps compile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (use --device cpu for the CPU path)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}: torch {torch.__version__}", flush=True)

    cfg = build_config(args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    head_dim = cfg.model.num_head_channels if cfg.model.num_head_channels > 0 else 64
    side = args.resolution // 2 ** (len(cfg.autoencoder.ch_mult) - 1)
    sdpa = sdpa_flash_check(device, dtype, head_dim=head_dim, tokens=side * side,
                            context=cfg.conditioner.context_length)
    print("SDPA " + ", ".join(f"{k}={v}" for k, v in sdpa.items()), flush=True)

    train = train_check(cfg, steps=args.steps, warmup=args.warmup, device=device)
    print(f"train {args.preset} {args.resolution}px{' compiled' if args.compile else ''} "
          f"{train['params'] / 1e6:.0f}M params, "
          f"{train['flops_per_image_fwd'] / 1e9:.1f} GFLOP/img fwd, ZeRO-{train['zero_stage']} {train['precision']} "
          f"over {train['backend']}, micro batch {train['micro_batch']}: {train['images_per_sec']:.1f} img/s, "
          f"{train['step_time_s'] * 1e3:.0f} ms/step, MFU {100 * train['mfu']:.1f}% "
          f"(peak {train['peak_flops'] / 1e12:.0f} TFLOP/s), peak mem {train['peak_mem_gb']:.1f} GB, "
          f"loss {train['losses'][0]:.4f} → {train['losses'][-1]:.4f}", flush=True)
    report = {"device": name, "sdpa": sdpa, "train": train, "resolution": args.resolution, "compile": args.compile}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = sdpa["ok"] and train["ok"]
    print("gpu_check: " + ("PASS" if ok else "FAIL"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
