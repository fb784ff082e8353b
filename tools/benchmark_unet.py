"""Time a forward+backward step of our U-Net against diffusers' UNet2DConditionModel at an identical config.

CPU: a small config, fp32, ratio = diffusers time / ours time (>1 means ours is faster); goal >= 1.0x.
On a shared machine run it single-threaded (`--threads 1`, OMP_NUM_THREADS=1) and with `--repeats 3`:
oversubscribed threads swamp the difference between the two models.
GPU: the SD2-size U-Net at 256 and 512 px in bf16, img/s and MFU (FLOPs from count_flops), with our best
settings (SDPA, channels_last, torch.compile) against diffusers with SDPA (and compile when --compile);
goal >= 1.25x.

The last line printed is `ours/diffusers speed ratio: R.RRx (goal >= G.Gx)`, R the worst resolution's
ratio (each the median over --repeats interleaved timings)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmscale.models import count_flops, load_unet, save_unet  # noqa: E402
from ldmscale.models.unet import UNet, compile_blocks  # noqa: E402

SMALL = dict(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[1, 2, 4],
             num_heads=-1, num_head_channels=32, context_dim=128, use_linear_in_transformer=True)
SD2 = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
           num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fns, params, device, warmup: int, iters: int) -> list[float]:
    """Median seconds of one forward+backward step of each fn, interleaved so load drifts hit both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for k, fn in enumerate(fns):
            for p in params[k]:
                p.grad = None
            _sync(device)
            start = time.perf_counter()
            fn().float().square().mean().backward()
            _sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def build_pair(config: dict, tmp: Path, device, dtype):
    """Ours and diffusers' with identical weights (ours → diffusers folder → both)."""
    import diffusers

    ours = UNet(**config)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    save_unet(ours, tmp / "unet", "diffusers")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp / "unet")
    ours = load_unet(tmp / "unet")
    return ours.to(device, dtype).train(), theirs.to(device, dtype).train()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="0: 4 on CPU, 8 on GPU")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolutions", type=int, nargs="*", default=None, help="pixels (latent = px/8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (GPU)")
    parser.add_argument("--compile-ours", action="store_true",
                        help="torch.compile only ours: our best settings against diffusers' defaults (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved timings per resolution; the ratio reported is their median")
    args = parser.parse_args(argv)
    import tempfile

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SD2 if gpu else SMALL
    dtype = torch.bfloat16 if gpu else torch.float32
    resolutions = args.resolutions or ([256, 512] if gpu else [128])
    batch = args.batch or (8 if gpu else 4)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ours, theirs = build_pair(config, Path(tmp), device, dtype)
    if gpu:
        ours = ours.to(memory_format=torch.channels_last)
        theirs = theirs.to(memory_format=torch.channels_last)
        if args.compile or args.compile_ours:
            compile_blocks(ours)  # what model.compile=true does in training
        if args.compile:
            theirs.compile()
    for px in resolutions:
        h = px // 8
        x = torch.randn(batch, 4, h, h, device=device, dtype=dtype)
        if gpu:
            x = x.to(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (batch,), device=device)
        ctx = torch.randn(batch, 77, config["context_dim"], device=device, dtype=dtype)
        runs = [time_steps(
            [lambda x=x, t=t, ctx=ctx: ours(x, t, ctx),
             lambda x=x, t=t, ctx=ctx: theirs(x, t, encoder_hidden_states=ctx).sample],
            [list(ours.parameters()), list(theirs.parameters())], device, args.warmup if r == 0 else 1, args.iters)
            for r in range(max(1, args.repeats))]
        ratios = [b / a for a, b in runs]
        ratio = statistics.median(ratios)
        t_ours, t_theirs = (statistics.median(ts) for ts in zip(*runs))
        with torch.device("meta"):
            skeleton = UNet(**config)
        flops = 3 * count_flops(skeleton, torch.zeros(batch, 4, h, h), torch.zeros(batch), torch.zeros(batch, 77,
                                                                                                     config["context_dim"]))
        line = (f"{device.type} {px}px (latent {h}x{h}) batch {batch} {str(dtype).replace('torch.', '')}: "
                f"ours {t_ours * 1e3:.1f} ms, diffusers {t_theirs * 1e3:.1f} ms, ratio (diffusers/ours) "
                f"{ratio:.3f}x; ours {batch / t_ours:.1f} img/s, diffusers {batch / t_theirs:.1f} img/s")
        if gpu:
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
            if peak:
                line += f"; MFU ours {flops / t_ours / peak:.1%}, diffusers {flops / t_theirs / peak:.1%}"
        if len(ratios) > 1:
            line += f"; ratios of the {len(ratios)} repeats " + ", ".join(f"{r:.3f}" for r in ratios)
        print(line, flush=True)
        results[px] = dict(ours_s=t_ours, diffusers_s=t_theirs, ratio=ratio, ratios=ratios, flops=flops)
    worst = min(results, key=lambda px: results[px]["ratio"])
    where = f" (worst of {', '.join(f'{px}px' for px in results)}: {worst}px)" if len(results) > 1 else ""
    print(f"ours/diffusers speed ratio: {results[worst]['ratio']:.3f}x (goal >= {1.25 if gpu else 1.0}x){where}",
          flush=True)
    return results


if __name__ == "__main__":
    main()
