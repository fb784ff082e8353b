"""SDXL's text towers against transformers: tiny random CLIPTextModel / CLIPTextModelWithProjection weights,
written in the two real SDXL layouts (diffusers folder, sgm single file), loaded through the project's own
conversion, must give transformers' own forward (penultimate hidden states, bigG's pooled projection)."""

from __future__ import annotations

import pytest
import torch

from ldmscale.models.conditioners import SGM_TOWER_PREFIXES, TINY_TEXT_MODELS, SDXLTextEncoder

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (pyproject `dev`)")

SOT, EOT = 49406, 49407
TOWERS = ("ldmscale-tiny-clip-l", "ldmscale-tiny-bigg")  # the tiny towers of SDXL's two families


def _hf_config(model: str, act: str) -> transformers.CLIPTextConfig:
    """transformers' config with the tiny open_clip tower's shapes (mlp ratio 4, CLIP's BOS/EOS ids)."""
    arch = TINY_TEXT_MODELS[model]
    text = arch["text_cfg"]
    return transformers.CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"], projection_dim=arch["embed_dim"],
        max_position_embeddings=text["context_length"], hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_towers():
    """SDXL's pair as transformers builds it: CLIPTextModel (QuickGELU, no projection) for ViT-L, and
    CLIPTextModelWithProjection (GELU) for bigG; seeded random weights, LayerNorms perturbed off 1/0."""
    torch.manual_seed(16)
    first = transformers.CLIPTextModel(_hf_config(TOWERS[0], "quick_gelu")).eval()
    second = transformers.CLIPTextModelWithProjection(_hf_config(TOWERS[1], "gelu")).eval()
    with torch.no_grad():
        for model in (first, second):
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
    return first, second


def _ids() -> torch.Tensor:
    """Three captions: EOT padding (SDXL's CLIP-L tokenizer), zero padding (its bigG tokenizer and
    open_clip), and a full 77-token row; EOT is the largest id, as both libraries' pooling assumes."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(3, 77, dtype=torch.long)
    ids[:, 0] = SOT
    ids[0, 1:6] = torch.randint(1, SOT, (5,), generator=gen)
    ids[0, 6:] = EOT
    ids[1, 1:12] = torch.randint(1, SOT, (11,), generator=gen)
    ids[1, 12] = EOT
    ids[2, 1:76] = torch.randint(1, SOT, (75,), generator=gen)
    ids[2, 76] = EOT
    return ids


def _write_layouts(tmp_path, first, second) -> dict[str, str]:
    """The diffusers folder as transformers saves it today, and sgm's single file with transformers 4.x
    names (`text_model.` prefix and the old position_ids buffer, as in sd_xl_base_1.0.safetensors)."""
    from safetensors.torch import save_file

    from ldmscale.models.conditioners import open_clip_text_state_from_hf

    first.save_pretrained(tmp_path / "pipe" / "text_encoder")
    second.save_pretrained(tmp_path / "pipe" / "text_encoder_2")
    clip_l = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in first.state_dict().items()}
    clip_l["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sgm = {f"{SGM_TOWER_PREFIXES[0]}{k}": v for k, v in clip_l.items()}
    # sgm's embedder 1 is an open_clip model: its own names (bigG's weights in them), logit_scale included
    sgm.update({f"{SGM_TOWER_PREFIXES[1]}{k}": v
                for k, v in open_clip_text_state_from_hf(second.state_dict()).items()})
    sgm[f"{SGM_TOWER_PREFIXES[1]}logit_scale"] = torch.tensor(4.6)
    save_file({k: v.contiguous() for k, v in sgm.items()}, str(tmp_path / "sd_xl.safetensors"))
    return {"diffusers": str(tmp_path / "pipe"), "sgm": str(tmp_path / "sd_xl.safetensors")}


@pytest.mark.parametrize("layout", ["diffusers", "sgm"])
def test_sdxl_towers_equal_transformers_penultimate_states_and_bigg_text_embeds(hf_towers, tmp_path, layout):
    first, second = hf_towers
    ids = _ids()
    weights = _write_layouts(tmp_path, first, second)[layout]
    ours = SDXLTextEncoder(*TOWERS, weights=weights, device="cpu").encode_ids(ids)
    with torch.no_grad():  # what SDXL runs: no attention mask (causal only), hidden_states[-2]
        ref_1 = first(input_ids=ids, output_hidden_states=True)
        ref_2 = second(input_ids=ids, output_hidden_states=True)
    width_1 = first.config.hidden_size
    tol = dict(atol=1e-5, rtol=0)
    # every position, padding included: our causal mask is transformers' (a bidirectional one differs)
    torch.testing.assert_close(ours.tokens[..., :width_1], ref_1.hidden_states[-2], **tol)
    torch.testing.assert_close(ours.tokens[..., width_1:], ref_2.hidden_states[-2], **tol)
    torch.testing.assert_close(ours.pooled, ref_2.text_embeds, **tol)  # bigG pooled, projected (1280 in SDXL)
    assert ours.lengths.tolist() == [7, 13, 77]
    if layout == "diffusers":
        # a padding mask changes nothing on the real tokens: causal attention already hides what follows
        with torch.no_grad():
            masked = first(input_ids=ids, attention_mask=ours.mask.long(), output_hidden_states=True)
        for row, length in enumerate(ours.lengths.tolist()):
            torch.testing.assert_close(ours.tokens[row, :length, :width_1],
                                       masked.hidden_states[-2][row, :length], **tol)


def test_transformers_comparison_sees_clip_l_activation(hf_towers, tmp_path):
    """The check above can fail: the same weights under GELU instead of CLIP-L's QuickGELU move the
    penultimate states by far more than its tolerance."""
    first, second = hf_towers
    ids = _ids()
    ours = SDXLTextEncoder(*TOWERS, weights=_write_layouts(tmp_path, first, second)["diffusers"],
                           device="cpu").encode_ids(ids)
    gelu = transformers.CLIPTextModel(_hf_config(TOWERS[0], "gelu")).eval()
    gelu.load_state_dict(first.state_dict())
    with torch.no_grad():
        other = gelu(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    assert (ours.tokens[..., : first.config.hidden_size] - other).abs().max() > 1e-3
