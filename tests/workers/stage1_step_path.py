"""Worker: the real stage-1 step path (AutoencoderTask → Trainer.fit, GAN on from step 0) on tiny shards.

usage: stage1_step_path.py SHARDS_DIR RUN_DIR MODE ZERO_STAGE KIND
  syncs     4 non-logged steps under the host-sync counters of step_path.py. Prints JSON.
  nonfinite the last rank feeds NaN pixels in step 2: both players' weights stay unchanged on every rank,
            "skipped" is 1 there; step 3 is finite and trains. Prints JSON.
"""

import json
import sys
from pathlib import Path

import torch

from ldmscale.config import compose
from ldmscale.distributed import env
from ldmscale.stage1 import AutoencoderTask, build_pixel_loader
from tests.workers.step_path import count_host_syncs, fit, trainer_and_batches


def main() -> None:
    shards, run_dir, mode, stage, kind = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    dist = env.setup("gloo")
    never = 10**6
    cfg = compose([
        "+experiment=ae_demo", f"autoencoder={'vq_f4' if kind == 'vq' else 'tiny_kl_f4'}", f"run_dir={run_dir}",
        f"data.train_shards=['{shards}/shapes-{{000000..000001}}.tar']", "data.resolution=16",
        "data.micro_batch_size=2", f"data.global_batch_size={4 * dist.world_size}", "autoencoder.ch=16",
        "autoencoder.ch_mult=[1,2]", "autoencoder.attn_resolutions=[]", "ae_loss.disc_ndf=8",
        "ae_loss.disc_num_layers=2", "ae_loss.disc_start=0", f"deepspeed.zero_stage={stage}",
        f"trainer.max_steps={never}", f"trainer.log_every_steps={never}", "trainer.sample_every_steps=0",
        f"checkpoint.every_steps={never}", f"checkpoint.signal_check_steps={never}", "checkpoint.save_at_end=false",
        "logger=disabled", *(["autoencoder.n_embed=64", "autoencoder.num_res_blocks=1"] if kind == "vq" else []),
    ])
    torch.manual_seed(cfg.seed)
    task = AutoencoderTask(cfg, rank=dist.rank, world_size=dist.world_size)
    loader = build_pixel_loader(cfg.data, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    accumulation = task.g_engine.gradient_accumulation_steps
    trainer, batches = trainer_and_batches(task, loader, cfg, dist, run_dir, accumulation, 2 * accumulation)
    result: dict = {"accumulation": accumulation}
    if mode == "syncs":
        counter = count_host_syncs(trainer, batches, accumulation)
        result.update(steps=trainer.step - 1, counts=dict(counter.counts))
    else:
        def params() -> dict[str, list[torch.Tensor]]:
            return {name: [p.detach().clone() for p in e.module.parameters()] for name, e in task.engines().items()}

        def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
            return all(torch.equal(x, y) for x, y in zip(a, b))

        fit(trainer, batches[:accumulation])
        before = params()
        bad = [dict(b, pixels=torch.full_like(b["pixels"], float("nan"))) if dist.rank == dist.world_size - 1
               else b for b in batches[accumulation:]]
        fit(trainer, bad)  # step 2: NaN on the last rank only
        skipped, during = float(task.g_engine.skipped), params()
        fit(trainer, batches[:accumulation])  # step 3: finite
        after = params()
        result.update(skipped=skipped, unchanged={k: same(before[k], during[k]) for k in before},
                      moved_after={k: not same(before[k], after[k]) for k in before},
                      finite=all(bool(torch.isfinite(p).all()) for ps in after.values() for p in ps))
    env.print0(json.dumps(result))
    for engine in task.engines().values():
        engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
