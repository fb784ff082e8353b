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
    SDXLTextEncoder,
    TextEncoder,
    TextEncoding,
    build_text_encoder,
    drop_conditions,
    null_conditions,
    size_embedding,
)
from ldmscale.models.flops import count_flops
from ldmscale.models.interop import load_autoencoder, load_unet, save_autoencoder, save_unet
from ldmscale.models.unet import Denoiser, UNet, build_denoiser, build_unet

__all__ = [
    "AutoencoderKL", "DiagonalGaussian", "VQModel", "build_autoencoder", "estimate_scale_and_shift",
    "estimate_scale_factor", "scale_latents", "unscale_latents", "ClassEmbedder", "LayoutEncoder", "SDXLTextEncoder",
    "TextEncoder", "size_embedding",
    "TextEncoding", "build_text_encoder", "drop_conditions", "null_conditions", "Denoiser", "UNet", "build_denoiser",
    "build_unet", "count_flops", "load_autoencoder", "load_unet", "save_autoencoder", "save_unet",
]
