"""Worker: one process, ZeRO-0, fp32. The Engine (which skips DeepSpeed's gradient all-reduce when alone)
must train exactly as torch AdamW with the same accumulation and clipping. Prints JSON."""

import copy
import json

import torch
from torch import nn

from ldmscale.config import DeepSpeedConfig, OptimConfig
from ldmscale.distributed import engine as eng
from ldmscale.distributed import env


def main() -> None:
    env.setup("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    optim = OptimConfig(lr=1e-2, weight_decay=0.01)
    engine = eng.initialize(model, DeepSpeedConfig(zero_stage=0, gradient_clipping=0.05), optim,
                            micro_batch_size=4, global_batch_size=8, world_size=1, max_steps=10)
    ref_opt = torch.optim.AdamW(eng.param_groups(reference, optim.weight_decay), lr=optim.lr,
                                betas=tuple(optim.betas), eps=optim.eps)
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(5):
        micro = [torch.randn(4, 6, generator=g) for _ in range(2)]
        for x in micro:
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        sum(reference(x).pow(2).mean() / 2 for x in micro).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item())
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    diff = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), reference.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), initial.parameters()))
    print(json.dumps({"allreduce": bool(engine._ds.enable_backward_allreduce), "max_abs_diff": diff,
                      "steps": engine.global_steps, "moved": moved,
                      "min_grad_norm": min(norms)}))
    engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
