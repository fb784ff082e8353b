"""Stage-1 quality against the clock: train an autoencoder for a wall-time budget, report held-out PSNR.

    python tools/stage1_quality.py --experiment ae_demo --train 'data/shapes32/shapes-{000000..000003}.tar' \
        --val data/shapes32_val/shapes-000000.tar --seconds 180 --out psnr.json

The same model, loss (ldmscale.models.losses), pixel loader and metrics as `ldmscale.train
stage=autoencoder`, in a plain single-process torch loop (no DeepSpeed), so that it also runs where
DeepSpeed is not installed and its clock holds only the training. Prints PSNR/SSIM (and VQ codebook
usage) every --eval-every seconds, with wall and process CPU time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ae_demo")
    parser.add_argument("--train", required=True, help="raw training shards (brace ranges allowed)")
    parser.add_argument("--val", required=True, help="held-out raw shards")
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-clock training budget")
    parser.add_argument("--eval-every", type=float, default=15.0, help="seconds between evaluations")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps instead (0: by time)")
    parser.add_argument("--eval-every-steps", type=int, default=100, help="with --max-steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the curve as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=2e-3")
    args = parser.parse_args(argv)

    from ldmscale import evaluation
    from ldmscale.config import compose
    from ldmscale.data.pixels import PixelLoader, PixelShardDataset
    from ldmscale.models import VQModel, build_autoencoder
    from ldmscale.models.losses import AutoencoderLoss
    from ldmscale.stage1 import bicubic_roundtrip

    torch.set_num_threads(args.threads)
    cfg = compose([f"+experiment={args.experiment}", *args.overrides])
    torch.manual_seed(cfg.seed)
    model = build_autoencoder(cfg.autoencoder)
    loss_fn = AutoencoderLoss(cfg.ae_loss, kind=cfg.autoencoder.kind)
    params = [p for p in list(model.parameters()) + [loss_fn.logvar] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    loader = PixelLoader(PixelShardDataset([args.train], cfg.data.resolution), cfg.data.micro_batch_size,
                         seed=cfg.seed).endless()
    val = torch.stack(list(PixelShardDataset([args.val], cfg.data.resolution)))
    factor = model.downsample_factor
    baseline = float(evaluation.psnr(val, bicubic_roundtrip(val, factor)).mean())  # what the latent size must beat
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.experiment}: {n_params / 1e6:.2f}M params, {cfg.data.resolution}px, batch "
          f"{cfg.data.micro_batch_size}, {len(val)} held-out images, {args.threads} threads", flush=True)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            if isinstance(model, VQModel):
                out = model(val)
                recon, stats = out.reconstruction, evaluation.codebook_stats(out.indices, model.quantize.n_embed)
            else:
                recon, stats = model(val, sample_posterior=False)[0], {}
        model.train()
        return {"psnr": float(evaluation.psnr(val, recon).mean()), "ssim": float(evaluation.ssim(val, recon).mean()),
                f"psnr_bicubic{factor}x": baseline, **stats}

    curve = []
    step, start, cpu0 = 0, time.perf_counter(), time.process_time()
    next_eval = args.eval_every
    while True:
        elapsed = time.perf_counter() - start
        if args.max_steps:
            due, done = step % args.eval_every_steps == 0 and step > 0, step >= args.max_steps
        else:
            due, done = elapsed >= next_eval, elapsed >= args.seconds
        if due or done:
            point = {"step": step, "wall_s": round(elapsed, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                     **evaluate()}
            curve.append(point)
            print(json.dumps(point), flush=True)
            next_eval += args.eval_every
            start += time.perf_counter() - start - elapsed  # evaluation is not training time
            if done:
                break
        pixels = next(loader)["pixels"]
        if isinstance(model, VQModel):
            out = model(pixels)
            recon, reg = out.reconstruction, out.qloss
        else:
            recon, posterior = model(pixels)
            reg = posterior.kl()
        loss = loss_fn.generator_loss(pixels, recon, reg, None, step, None).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    result = {"experiment": args.experiment, "overrides": args.overrides, "params": n_params, "curve": curve}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
