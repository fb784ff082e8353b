"""U-Net and Denoiser: forward/backward, activation checkpointing, attention backends, conditioning kinds."""

import pytest
import torch

from ldmscale.config import ConditionerConfig, UNetConfig
from ldmscale.models import build_denoiser, build_unet, null_conditions
from ldmscale.models.unet import UNet, timestep_embedding


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LDM zero-inits output convs and proj_out; give every weight a value so each path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return randomize(build_unet(UNetConfig(**overrides)))


def inputs(batch=2, ctx=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([3, 999])[:batch],
            torch.randn(batch, 7, ctx, generator=g))


def test_forward_backward_shapes_and_float_or_long_timesteps():
    unet = tiny_unet()
    x, t, context = inputs()
    out = unet(x, t, context)
    assert out.shape == x.shape
    torch.testing.assert_close(unet(x, t.float(), context), out)
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


def test_activation_checkpointing_gives_identical_gradients():
    x, t, context = inputs()
    grads = []
    for ckpt in (False, True):
        unet = tiny_unet(gradient_checkpointing=ckpt, dropout=0.0).train()
        unet(x, t, context).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_attention_backends_agree_with_and_without_mask():
    x, t, context = inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    unet = tiny_unet().eval()
    with torch.no_grad():
        ref = unet(x, t, context, mask)
        unet.set_attention_backend("math")
        torch.testing.assert_close(unet(x, t, context, mask), ref, atol=1e-5, rtol=1e-5)
        unmasked = unet(x, t, context)
    assert not torch.allclose(unmasked, ref)  # the mask matters
    # masking out tokens equals removing them
    with torch.no_grad():
        torch.testing.assert_close(unet(x[:1], t[:1], context[:1, :4]), ref[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        unet.set_attention_backend("flash9")


def test_scale_shift_resblock_updown_and_class_conditioning():
    unet = tiny_unet(use_scale_shift_norm=True, resblock_updown=True, num_classes=5, context_dim=None)
    x, t, _ = inputs()
    out = unet(x, t, y=torch.tensor([0, 4]))
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, y=torch.tensor([1, 4])))


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    assert emb.shape == (2, 8) and torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(4))


def test_denoiser_text_and_null_condition():
    torch.manual_seed(0)
    den = randomize(build_denoiser(UNetConfig(), ConditionerConfig(kind="text")))
    x, t, context = inputs()
    cond = {"context": context, "context_mask": torch.ones(2, 7, dtype=torch.bool)}
    out = den(x, t, cond)
    torch.testing.assert_close(out, den.unet(x, t, context))
    assert torch.isfinite(den(x, t, null_conditions(cond, "text"))).all()


def test_denoiser_class_layout_and_concat_kinds():
    x, t, _ = inputs()
    den = randomize(build_denoiser(UNetConfig(), ConditionerConfig(kind="class", num_classes=10)))
    assert den.unet.context_dim is None  # class models self-attend only (LDM's cin models)
    null = den(x, t, {"class_labels": torch.tensor([-1, -1])})
    torch.testing.assert_close(null, den(x, t, {"class_labels": torch.tensor([10, 10])}))
    assert not torch.allclose(null, den(x, t, {"class_labels": torch.tensor([3, 3])}))
    den = randomize(build_denoiser(UNetConfig(), ConditionerConfig(kind="layout", num_classes=6)))
    boxes, classes = torch.rand(2, 3, 4), torch.tensor([[1, 2, -1], [0, -1, -1]])
    out = den(x, t, {"boxes": boxes, "box_classes": classes})
    assert out.shape == x.shape
    out.square().mean().backward()
    assert den.layout_encoder.class_embedding.weight.grad is not None  # trained with the U-Net
    assert torch.isfinite(den(x, t, null_conditions({"boxes": boxes, "box_classes": classes}, "layout"))).all()
    den = build_denoiser(UNetConfig(), ConditionerConfig(kind="inpaint"))
    assert den.unet.in_channels == 9 and den.unet.context_dim is None
    assert den(x, t, {"concat": torch.randn(2, 5, 8, 8)}).shape == x.shape
    with pytest.raises(ValueError, match="concat"):
        den(x, t, {})
    with pytest.raises(ValueError, match="model.in_channels=6"):
        build_denoiser(UNetConfig(in_channels=6), ConditionerConfig(kind="sr"))
