"""Stage-1 losses: LPIPS loading and behaviour, PatchGAN, GAN losses, the adaptive weight against its formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ldmscale.config import AutoencoderLossConfig
from ldmscale.models import losses


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random (not pretrained) weight files in the two formats LPIPS loads."""
    from torchvision.models import vgg16

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg_path, lin_path = root / "vgg16.pth", root / "vgg_lin.pth"
    torch.save(vgg16(weights=None).state_dict(), vgg_path)
    # The lpips package's layout: NetLinLayer = Sequential(Dropout, Conv2d(C, 1, 1, bias=False)).
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(losses._VGG_CHANNELS)}
    torch.save(lin, lin_path)
    return vgg_path, lin_path, lin


def test_lpips_loads_local_files_and_is_a_distance(lpips_files):
    vgg_path, lin_path, lin = lpips_files
    model = losses.LPIPS(vgg_path, lin_path)
    assert torch.equal(model.lins[3].weight, lin["lin3.model.1.weight"])
    vgg_state = torch.load(vgg_path, weights_only=True)
    assert torch.equal(model.slices[0][0].weight, vgg_state["features.0.weight"])
    assert torch.equal(model.slices[4][-2].weight, vgg_state["features.28.weight"])  # last conv (relu5_3)
    assert not any(p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert model(x, x).shape == (2, 1, 1, 1)
    assert torch.all(model(x, x) == 0)
    d = model(x, y)
    assert torch.all(d > 0)
    assert torch.allclose(d, model(y, x), rtol=1e-5)
    assert torch.all(model(x, x + 0.01 * (y - x)) < d)  # closer images, smaller distance


def test_lpips_gradient_flows_to_the_input(lpips_files):
    model = losses.LPIPS(*lpips_files[:2])
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    model(x, torch.ones(1, 3, 16, 16) * 0.5).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_lpips_weights_fail_with_the_file_name(tmp_path, lpips_files):
    with pytest.raises(losses.LPIPSWeightsError, match="nope.pth"):
        losses.LPIPS(tmp_path / "nope.pth", lpips_files[1])
    with pytest.raises(losses.LPIPSWeightsError, match="ae_loss.lpips_vgg_weights"):
        losses.AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=1.0))
    bad = tmp_path / "bad_lin.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, bad)
    with pytest.raises(losses.LPIPSWeightsError, match="lin1"):
        losses.LPIPS(lpips_files[0], bad)
    # perceptual_weight=0 needs no files at all.
    assert losses.AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=0.0)).perceptual is None


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patchgan_shapes(norm):
    disc = losses.NLayerDiscriminator(3, ndf=8, num_layers=3, norm=norm)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 → 32 → 16 → 8 → 7 → 6 (taming's PatchGAN)
    if norm == "group":
        assert not list(disc.buffers())  # nothing rank-local under DeepSpeed


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    expect = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert losses.vanilla_d_loss(real, fake).item() == pytest.approx(expect.item())
    assert losses.generator_adv_loss(fake, "hinge").item() == pytest.approx(0.75)
    assert losses.adopt_weight(1.0, 9, 10) == 0.0 and losses.adopt_weight(1.0, 10, 10) == 1.0


def test_adaptive_weight_matches_the_formula():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    target, probe = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def nll_of(out):
        return (out - target).abs().sum() / 2

    def g_of(out):
        return -(out * probe).mean() * 3

    out = last(h)
    got = losses.adaptive_disc_weight(nll_of(out), g_of(out), last.weight, disc_weight=0.5)
    # The formula, from gradients taken in two independent passes:
    # λ = disc_weight * clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4).
    w = last.weight.detach().clone().requires_grad_(True)
    (grad_nll,) = torch.autograd.grad(nll_of(nn.functional.conv2d(h, w, last.bias, padding=1)), w)
    (grad_g,) = torch.autograd.grad(g_of(nn.functional.conv2d(h, w, last.bias, padding=1)), w)
    expect = 0.5 * torch.clamp(grad_nll.norm() / (grad_g.norm() + 1e-4), 0, 1e4)
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)
    assert not got.requires_grad
    # The clamp: a vanishing G gradient gives max_weight.
    tiny = losses.adaptive_disc_weight(nll_of(out), out.sum() * 1e-12, last.weight, max_weight=1e4)
    assert tiny.item() == pytest.approx(1e4)


def test_generator_loss_switches_the_discriminator_on_at_disc_start():
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=5, kl_weight=1e-3)
    loss_fn = losses.AutoencoderLoss(cfg, kind="kl")
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = last(torch.randn(2, 4, 8, 8))
    kl = torch.rand(2)
    logits = recon.mean(dim=1, keepdim=True)
    before = loss_fn.generator_loss(pixels, recon, kl, logits, step=4, last_layer=last.weight)
    nll = (pixels - recon).abs().sum() / 2
    assert before.loss.item() == pytest.approx((nll + 1e-3 * kl.sum() / 2).item(), rel=1e-6)
    assert "g_loss" not in before.logs
    after = loss_fn.generator_loss(pixels, recon, kl, logits, step=5, last_layer=last.weight)
    d_weight = losses.adaptive_disc_weight(nll, -logits.mean(), last.weight, 0.5)
    assert after.logs["d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert after.loss.item() == pytest.approx((before.loss - d_weight * logits.mean()).item(), rel=1e-5)
    d = loss_fn.discriminator_loss(torch.ones(2), -torch.ones(2), step=4)
    assert d.loss.item() == 0.0  # off before disc_start


def test_vq_loss_and_l2():
    cfg = dataclasses.replace(AutoencoderLossConfig(perceptual_weight=0.0), rec_loss="l2", codebook_weight=2.0)
    loss_fn = losses.AutoencoderLoss(cfg, kind="vq")
    pixels, recon = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    out = loss_fn.generator_loss(pixels, recon, torch.tensor(0.1), None, step=0, last_layer=None)
    assert out.loss.item() == pytest.approx(0.25 + 2.0 * 0.1)
    with pytest.raises(ValueError, match="ae_loss.rec_loss"):
        losses.AutoencoderLoss(dataclasses.replace(cfg, rec_loss="l3"))


def test_adaptive_weight_from_output_gradients_equals_autograd():
    """The Task's path (gradients at the decoder output → conv weight gradient) gives the same λ."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 3, padding=1)
    h = torch.randn(2, 8, 8, 8)
    out = conv(h)
    target, probe = torch.randn_like(out), torch.randn_like(out)
    nll, g = (out - target).abs().sum() / 2, -(out * probe).mean()
    expect = losses.adaptive_disc_weight(nll, g, conv.weight, 0.5)
    leaf = out.detach().requires_grad_(True)
    grad_nll = torch.autograd.grad((leaf - target).abs().sum() / 2, leaf)[0]
    grad_g = torch.autograd.grad(-(leaf * probe).mean(), leaf)[0]
    got = losses.adaptive_weight_from_grads(losses.conv_weight_grad(conv, h, grad_nll),
                                            losses.conv_weight_grad(conv, h, grad_g), 0.5)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
