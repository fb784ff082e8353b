"""Autoencoders: shapes, posterior maths, VQ straight-through, latent scaling."""

import pytest
import torch

from ldmscale.config import AutoencoderConfig, ConfigError, compose
from ldmscale.models import (
    AutoencoderKL,
    DiagonalGaussian,
    VQModel,
    build_autoencoder,
    estimate_scale_and_shift,
    estimate_scale_factor,
    scale_latents,
    unscale_latents,
)
from ldmscale.models.interop import load_autoencoder, save_autoencoder

TINY = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16)


def test_kl_contract_shapes_and_seeded_sampling():
    ae = build_autoencoder(AutoencoderConfig())
    assert isinstance(ae, AutoencoderKL) and ae.downsample_factor == 4 and ae.latent_channels == 4
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = ae.encode_moments(pixels)
    assert moments.shape == (2, 8, 8, 8)
    z1 = ae.latent_from_moments(moments, generator=torch.Generator().manual_seed(3))
    z2 = ae.latent_from_moments(moments, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and z1.shape == (2, 4, 8, 8)
    assert ae.decode(z1).shape == pixels.shape
    recon, posterior = ae(pixels)
    assert recon.shape == pixels.shape and posterior.kl().shape == (2,)


def test_downsample_factor_follows_ch_mult():
    for mult, f in (([1, 2, 4], 4), ([1, 2, 4, 4], 8), ([1, 1, 2, 2, 4], 16)):
        ae = AutoencoderKL(ch=8, ch_mult=mult, num_res_blocks=1, resolution=32)
        assert ae.downsample_factor == f
        assert ae.encode_moments(torch.zeros(1, 3, 32, 32)).shape[-1] == 32 // f


def test_diagonal_gaussian_kl_and_nll_match_torch_distributions():
    moments = torch.randn(3, 4, 2, 2)
    post = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, 1)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref_kl = torch.distributions.kl_divergence(q, p).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), ref_kl, rtol=1e-5, atol=1e-5)
    x = torch.randn_like(mean)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum((1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert torch.equal(post.mode(), mean)


def test_vq_roundtrip_usage_and_straight_through_gradients():
    torch.manual_seed(0)
    vq = VQModel(z_channels=3, embed_dim=3, n_embed=32, **TINY)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vq(pixels)
    assert out.reconstruction.shape == pixels.shape and out.indices.shape == (2, 8, 8)
    assert 1.0 <= out.perplexity.item() <= 32 and 0 < out.codebook_usage.item() <= 1
    assert out.codebook_usage.item() == out.indices.unique().numel() / 32
    # encode → quantise → decode: decoding the codes gives the forward's reconstruction
    torch.testing.assert_close(vq.decode_code(out.indices), out.reconstruction)
    latents = vq.latent_from_moments(vq.encode_moments(pixels))
    torch.testing.assert_close(vq.decode(latents), out.reconstruction)
    # quantising a codebook vector is the identity
    codes = vq.quantize.codes_to_latents(out.indices)
    assert torch.equal(vq.quantize.lookup(codes), out.indices)
    (out.reconstruction.square().mean() + out.qloss).backward()
    enc_grad = vq.encoder.conv_in.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # flowed through the straight-through estimator
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0  # codebook term trains the codes


def test_build_vq_from_config():
    vq = build_autoencoder(AutoencoderConfig(kind="vq", double_z=False, ch=8, ch_mult=[1, 2, 2], z_channels=3,
                                             embed_dim=3, n_embed=16))
    assert isinstance(vq, VQModel) and vq.downsample_factor == 4
    assert vq.encode_moments(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 4, 4)


def test_linear_codebook_trains_its_map_and_folds_to_the_same_codes(tmp_path):
    torch.manual_seed(0)
    vq = VQModel(z_channels=3, embed_dim=3, n_embed=32, codebook="linear", **TINY)
    q = vq.quantize
    torch.testing.assert_close(q.codebook(), q.embedding.weight @ q.codebook_proj.weight.t())
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vq(pixels)
    (out.reconstruction.square().mean() + out.qloss).backward()
    assert q.embedding.weight.grad is None  # the random basis is frozen ...
    assert q.codebook_proj.weight.grad.abs().sum() > 0  # ... the map from it to the codes is learned
    assert "quantize.codebook_proj.weight" in vq.state_dict()
    # export folds the map into plain codes: a plain VQModel with identical codes and reconstructions
    save_autoencoder(vq, tmp_path / "ae")
    assert vq.quantize.codebook_proj is not None and vq.config["codebook"] == "linear"  # not mutated
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.quantize.codebook_proj is None and loaded.config["codebook"] == "plain"
    assert "quantize.codebook_proj.weight" not in loaded.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded.quantize.codebook(), vq.quantize.codebook())
        ref = vq(pixels)
        got = loaded(pixels)
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.reconstruction, ref.reconstruction)
    # the training config (codebook=linear) pointed at the folded export, as the cache job does
    cfg = AutoencoderConfig(kind="vq", double_z=False, z_channels=3, embed_dim=3, n_embed=32, codebook="linear",
                            weights=str(tmp_path / "ae"), **TINY)
    rebuilt = build_autoencoder(cfg)
    torch.testing.assert_close(rebuilt.quantize.codebook(), vq.quantize.codebook())


def test_bf16_lookup_finds_the_exact_nearest_code():
    torch.manual_seed(0)
    q = VQModel(n_embed=1024, embed_dim=3, z_channels=3, **TINY).quantize.to(torch.bfloat16)
    q.embedding.weight.data.normal_()  # trained-codebook scale, where bf16 distances tie and misorder
    z = torch.randn(4, 3, 16, 16).to(torch.bfloat16)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3).double()
    exact = torch.cdist(flat, q.codebook().double()).argmin(1).reshape(4, 16, 16)
    assert torch.equal(q.lookup(z), exact)


def test_codebook_choice_is_validated():
    with pytest.raises(ValueError, match="codebook='cosine'"):
        VQModel(n_embed=8, codebook="cosine", **TINY)
    with pytest.raises(ConfigError, match="autoencoder.codebook"):
        compose(["+experiment=ae_vq_f4", "autoencoder.codebook=cosine"])


def test_latent_scaling_roundtrip_and_estimate():
    latents = torch.randn(64, 4, 8, 8) * 5.0 + 2.0
    scale = estimate_scale_factor(latents)
    assert abs(scale - 0.2) < 0.01
    s, shift = estimate_scale_and_shift(latents)
    z = scale_latents(latents, s, shift)
    assert abs(z.std().item() - 1) < 1e-3 and abs(z.mean().item()) < 1e-4
    torch.testing.assert_close(unscale_latents(z, s, shift), latents)
    ae = AutoencoderKL(ch=8, ch_mult=[1, 2], num_res_blocks=1, scale_factor=0.18215)
    torch.testing.assert_close(ae.unscale_latents(ae.scale_latents(latents)), latents)
    torch.testing.assert_close(ae.scale_latents(latents), latents * 0.18215)
