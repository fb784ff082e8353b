"""Conditioners: the frozen open_clip text tower, class/layout embedders, CFG dropout."""

import json

import open_clip
import pytest
import torch

from ldmscale.config import ConditionerConfig
from ldmscale.models import ClassEmbedder, LayoutEncoder, build_text_encoder, drop_conditions, null_conditions


@pytest.fixture(scope="module")
def tiny_text():
    return build_text_encoder(ConditionerConfig())


def test_tiny_text_shapes_lengths_and_pooled_match_open_clip(tiny_text):
    enc = tiny_text.encode(["a red circle", ""])
    assert enc.tokens.shape == (2, 77, 64) and enc.pooled.shape == (2, 64) and tiny_text.width == 64
    assert enc.lengths.tolist() == [5, 2]  # SOT + 3 words + EOT, SOT + EOT
    assert enc.mask.sum(1).tolist() == [5, 2]
    ids = open_clip.tokenize(["a red circle", ""])
    torch.testing.assert_close(enc.pooled, tiny_text.tower(ids))  # open_clip's own forward
    assert not any(p.requires_grad for p in tiny_text.parameters())


def test_tiny_text_weights_fixed_whatever_the_global_rng(tiny_text):
    torch.manual_seed(1234)
    torch.rand(10)
    other = build_text_encoder(ConditionerConfig())
    assert other.fingerprint() == tiny_text.fingerprint()
    assert torch.equal(other.encode(["x"]).tokens, tiny_text.encode(["x"]).tokens)


def test_penultimate_layer_differs_and_fingerprint_tracks_it(tiny_text):
    pen = build_text_encoder(ConditionerConfig(text_layer="penultimate"))
    last, second = tiny_text.encode(["a cat"]), pen.encode(["a cat"])
    assert not torch.allclose(last.tokens, second.tokens)
    torch.testing.assert_close(last.pooled, second.pooled)
    assert pen.fingerprint()["weights_sha256"] == tiny_text.fingerprint()["weights_sha256"]
    assert pen.fingerprint() != tiny_text.fingerprint()


def test_weights_path_loads_and_changes_fingerprint(tiny_text, tmp_path):
    state = {k: v + 0.01 for k, v in tiny_text.tower.state_dict().items()}
    torch.save(state, tmp_path / "text.pt")
    loaded = build_text_encoder(ConditionerConfig(text_weights=str(tmp_path / "text.pt")))
    assert loaded.fingerprint()["weights_sha256"] != tiny_text.fingerprint()["weights_sha256"]
    assert torch.equal(loaded.tower.token_embedding.weight, state["token_embedding.weight"])


def test_any_open_clip_model_name(tmp_path):
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=3))
    (tmp_path / "ldmscale-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "ldmscale-test-clip.json")
    enc = build_text_encoder(ConditionerConfig(text_model="ldmscale-test-clip", text_layer="penultimate"))
    out = enc.encode(["two blue squares"])
    assert out.tokens.shape == (1, 77, 48) and out.pooled.shape == (1, 32) and enc.width == 48
    with pytest.raises(ValueError, match="not-a-model"):
        build_text_encoder(ConditionerConfig(text_model="not-a-model"))


def test_drop_and_null_conditions():
    cond = {"context": torch.randn(8, 5, 4), "context_mask": torch.rand(8, 5) > 0.5, "pooled": torch.randn(8, 4),
            "concat": torch.randn(8, 2, 3, 3)}
    null = null_conditions(cond, "text")
    assert null["context"].abs().sum() == 0 and null["context_mask"].all() and torch.equal(null["concat"], cond["concat"])
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditions(cond, "text", 0.5, g)
    gone = dropped["context"].flatten(1).abs().sum(1) == 0
    assert 0 < gone.sum() < 8
    assert torch.equal(dropped["context"][~gone], cond["context"][~gone])
    assert dropped["context_mask"][gone].all() and (dropped["pooled"][gone] == 0).all()
    again = drop_conditions(cond, "text", 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again["context"], dropped["context"])
    assert drop_conditions(cond, "inpaint", 1.0)["concat"] is cond["concat"]
    labels = {"class_labels": torch.arange(4)}
    assert null_conditions(labels, "class", num_classes=10)["class_labels"].tolist() == [10] * 4
    assert drop_conditions(labels, "class", 1.0, num_classes=10)["class_labels"].tolist() == [10] * 4


def test_class_and_layout_embedders():
    emb = ClassEmbedder(10, 16)
    assert torch.equal(emb(torch.tensor([-1])), emb(torch.tensor([10])))
    layout = LayoutEncoder(num_classes=5, dim=32, context_dim=24, depth=1)
    boxes, classes = torch.rand(2, 3, 4), torch.tensor([[0, 4, -1], [-1, -1, -1]])
    context, mask = layout(boxes, classes)
    assert context.shape == (2, 3, 24) and mask.tolist() == [[True, True, False], [False] * 3]
    assert torch.isfinite(context).all()
    nulls = null_conditions({"boxes": boxes, "box_classes": classes}, "layout")
    assert (nulls["box_classes"] == -1).all()
