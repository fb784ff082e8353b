"""The diffusion process, kept apart from the network: schedules, the training objective, samplers + CFG."""

from ldmscale.diffusion.objective import DiffusionObjective, min_snr_weights
from ldmscale.diffusion.samplers import SAMPLERS, generators_for_seeds, guided_model_fn, randn, sample
from ldmscale.diffusion.schedules import Schedule, rescale_zero_terminal_snr

__all__ = [
    "DiffusionObjective", "min_snr_weights", "SAMPLERS", "generators_for_seeds", "guided_model_fn", "randn",
    "sample", "Schedule", "rescale_zero_terminal_snr",
]
