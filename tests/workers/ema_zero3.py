"""2-rank worker: EMA on ZeRO-3 shards equals EMA computed on the gathered parameters."""

import sys

import torch
from torch import nn

from ldmscale.config import DeepSpeedConfig, OptimConfig
from ldmscale.distributed import engine as eng
from ldmscale.distributed import env
from ldmscale.ema import PartitionedEMA


def main(stage: int) -> None:
    dist = env.setup("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 33), nn.SiLU(), nn.Linear(33, 5))
    engine = eng.initialize(model, DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2),
                            micro_batch_size=4, global_batch_size=4 * dist.world_size,
                            world_size=dist.world_size, max_steps=10)
    ema = PartitionedEMA(engine.module, decay=0.9, start_step=2)
    with engine.gathered_parameters():
        reference = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    gen = torch.Generator().manual_seed(dist.rank)
    for step in range(6):
        x = torch.randn(4, 7, generator=gen)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(step)
        d = ema.current_decay(step)
        with engine.gathered_parameters():
            for n, p in engine.module.named_parameters():
                reference[n] = d * reference[n] + (1 - d) * p.detach().float()
    full = ema.full_state_dict()
    worst = max((full[n] - reference[n]).abs().max().item() for n in reference)
    sizes = sum(s.numel() for s in ema.shadow)
    total = sum(v.numel() for v in reference.values())
    env.print0(f"RESULT stage={stage} max_abs_diff={worst:.3e} local={sizes} total={total}")
    assert worst < 1e-6, worst
    assert sizes < total, "EMA must hold only this rank's partition"
    engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
