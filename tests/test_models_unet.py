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


def _norm_and_conv_inputs(unet: UNet, *args) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
             for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.Conv2d))]
    try:
        unet(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("linear", [True, False])
def test_memory_format_is_kept_through_the_transformers(linear):
    """NCHW in → every GroupNorm/conv sees NCHW (the token layout must not leak: NHWC GroupNorm is ~3x
    slower on CPU); channels_last in → channels_last throughout (the GPU fast path)."""
    unet = tiny_unet(use_linear_in_transformer=linear)
    x, t, context = inputs()
    seen = _norm_and_conv_inputs(unet, x, t, context)
    assert len(seen) > 10 and all(s.is_contiguous() for s in seen)
    assert unet(x, t, context).is_contiguous()
    ref = unet(x, t, context)
    unet = unet.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    seen = _norm_and_conv_inputs(unet, x_cl, t, context)
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in seen)
    out = unet(x_cl, t, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_groupnorm32_matches_float32_statistics_in_bf16_and_autocast():
    from ldmscale.models.unet import GroupNorm32

    norm = randomize(GroupNorm32(8, 32))
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(3)) * 4 + 2
    upcast = torch.nn.functional.group_norm(x.bfloat16().float(), 8, norm.weight.bfloat16().float(),
                                            norm.bias.bfloat16().float(), norm.eps).bfloat16()
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, upcast)  # same numbers without the fp32 copy
    norm = norm.float()
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # fp32 params, bf16 activations: computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16


def _compiled_matches_eager(backend: str) -> None:
    unet = tiny_unet(channels_last=True)
    x, t, context = inputs()
    x = x.contiguous(memory_format=torch.channels_last)
    ref = unet(x, t, context)
    ref.square().mean().backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)
    compiled = torch.compile(unet, backend=backend, fullgraph=True)  # no graph breaks in the U-Net
    out = compiled(x, t, context)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for p, g in zip(unet.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_traces_the_whole_unet():
    _compiled_matches_eager("aot_eager")  # Dynamo + AOTAutograd without codegen: 10-20 s


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    _compiled_matches_eager("inductor")  # C++ codegen on CPU: minutes
