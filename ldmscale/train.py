"""Entry point: `python -m ldmscale.train [+experiment=NAME] [overrides]` (compose → validate → run)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmscale.config import CONF_DIR, Config, register_configs, to_object


def run(cfg: Config) -> None:
    """Run one job described by `cfg` in this process (under python, torchrun, deepspeed or srun)."""
    if cfg.stage == "autoencoder":
        from ldmscale.stage1 import train_autoencoder

        train_autoencoder(cfg)
        return
    from ldmscale.config import save_resolved
    from ldmscale.distributed import env

    dist = env.detect()
    if dist.rank == 0:
        save_resolved(cfg, cfg.run_dir)
    print(f"[ldmscale] composed config for {cfg.name!r}; run_dir={cfg.run_dir}")


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    run(to_object(composed))


if __name__ == "__main__":
    main()
