"""The networks: autoencoders, U-Net, conditioners, checkpoint interop and FLOP counting."""

from ldmscale.models.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    VQModel,
    build_autoencoder,
    estimate_scale_and_shift,
    estimate_scale_factor,
    scale_latents,
    unscale_latents,
)
from ldmscale.models.conditioners import (
    ClassEmbedder,
    LayoutEncoder,
    TextEncoder,
    TextEncoding,
    build_text_encoder,
    drop_conditions,
    null_conditions,
)

__all__ = [
    "AutoencoderKL", "DiagonalGaussian", "VQModel", "build_autoencoder", "estimate_scale_and_shift",
    "estimate_scale_factor", "scale_latents", "unscale_latents", "ClassEmbedder", "LayoutEncoder", "TextEncoder",
    "TextEncoding", "build_text_encoder", "drop_conditions", "null_conditions",
]
