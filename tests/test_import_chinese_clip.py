"""The importer of the released ViLReF (Chinese-CLIP format) checkpoints.

A randomly initialised model in *their* layout (tests/chinese_clip_reference.py), saved the way their
trainer saves it, is imported; the imported model must produce the same embeddings as the reference
for the same images and token ids. Every parameter is perturbed away from its initial value first, so a
mapping that swapped two LayerNorms or forgot a bias could not pass by accident.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from chinese_clip_reference import ChineseCLIPReference, save_like_chinese_clip

from vilref_fed.model.import_chinese_clip import (
    ChineseClipImportError,
    convert_state_dict,
    import_chinese_clip,
    infer_layout,
    model_config_for,
    read_chinese_clip_state_dict,
)

VIT_SMALL = dict(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=128,
    vision_patch_size=8,
    text_hidden_size=128,
    text_num_hidden_layers=2,
    text_num_attention_heads=2,
    text_intermediate_size=256,
    text_max_position_embeddings=64,
)
RN_SMALL = dict(
    embed_dim=48,
    image_resolution=64,
    vision_layers=(1, 2, 1, 1),
    vision_width=16,
    vision_patch_size=None,
    text_hidden_size=128,
    text_num_hidden_layers=1,
    text_num_attention_heads=2,
    text_intermediate_size=256,
    text_max_position_embeddings=64,
)
PROMPTS = [
    "青光眼视盘凹陷扩大",
    "糖尿病视网膜病变，可见微血管瘤及硬性渗出",
    "normal fundus",
    "视网膜静脉阻塞",
]


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter and BatchNorm statistic away from its initial value (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _reference(kwargs: dict, seed: int = 0) -> ChineseCLIPReference:
    torch.manual_seed(seed)
    ref = ChineseCLIPReference(**kwargs)
    _randomise(ref, seed)
    return ref.eval()


def _compare(ref: ChineseCLIPReference, model, image_size: int) -> None:
    torch.manual_seed(1)
    images = torch.randn(3, 3, image_size, image_size) * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1)
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        want_img = F.normalize(ref.encode_image(images), dim=-1)
        got_img = model.encode_image(images)
        want_txt = F.normalize(ref.encode_text(tokens["input_ids"]), dim=-1)
        got_txt = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    torch.testing.assert_close(got_img, want_img, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_txt, want_txt, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.logit_scale.detach(), ref.logit_scale.detach())
    # the tolerance is meaningful: different images give embeddings much further apart than it
    assert (got_img[0] - got_img[2]).abs().max() > 50 * 2e-5


@pytest.mark.parametrize("ddp_prefix,flash", [(True, False), (False, False), (True, True)])
def test_vit_import_reproduces_reference_embeddings(tmp_path, ddp_prefix, flash):
    ref = _reference(VIT_SMALL)
    src = tmp_path / "vilref_vit.pt"
    save_like_chinese_clip(ref, src, ddp_prefix=ddp_prefix, flash_layout=flash)
    model, info = import_chinese_clip(src, context_length=32)
    assert model.config.vision.type == "clip-vit"
    assert info["epoch"] == 20 and info["layout"]["vision"] == "vit"
    _compare(ref, model, 32)


def test_rn50_layout_import_reproduces_reference_embeddings(tmp_path):
    ref = _reference(RN_SMALL, seed=3)
    src = tmp_path / "vilref_rn.pt"
    save_like_chinese_clip(ref, src)
    model, info = import_chinese_clip(src, context_length=32)
    assert model.config.vision.type == "clip-resnet"
    assert list(model.config.vision.depths) == [1, 2, 1, 1]
    _compare(ref, model, 64)


def test_tokenizer_matches_chinese_clip_convention():
    """[CLS] pieces [SEP] then zero padding; attention mask = ids != [PAD] (what their encode_text uses)."""
    from vilref_fed.model import build_model

    model = build_model(model_config_for(infer_layout(_sd(VIT_SMALL)), context_length=16))
    tok = model.tokenize(["青光眼"])
    ids, mask = tok["input_ids"][0], tok["attention_mask"][0]
    vocab = model.tokenizer.hf.get_vocab()
    assert ids[0] == vocab["[CLS]"] and ids[4] == vocab["[SEP]"]
    assert ids[1:4].tolist() == [vocab["青"], vocab["光"], vocab["眼"]]
    assert ids[5:].eq(0).all() and torch.equal(mask, ids.ne(0).long())


def _sd(kwargs: dict) -> dict:
    ref = ChineseCLIPReference(**kwargs)
    return {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize(
    "kwargs,vision_type",
    [
        (dict(), "clip-vit"),  # the paper's ViT-B/16 + RoBERTa-wwm-ext-base-chinese, 512-d
        (
            dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None),
            "clip-resnet",
        ),
    ],
)
def test_paper_size_layouts_map_every_tensor_with_matching_shapes(kwargs, vision_type):
    """Full-size ViT-B/16 and RN50 layouts, built on the meta device (shapes only, no memory)."""
    from vilref_fed.model import build_model

    with torch.device("meta"):
        ref = ChineseCLIPReference(**kwargs)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    layout = infer_layout(sd)
    cfg = model_config_for(layout)
    assert cfg["vision"]["type"] == vision_type and cfg["image_size"] == 224
    assert cfg["text"]["num_hidden_layers"] == 12 and cfg["text"]["num_attention_heads"] == 12
    assert cfg["text"]["vocab_size"] == 21128
    if vision_type == "clip-vit":
        assert (
            cfg["vision"]["hidden_size"],
            cfg["vision"]["num_hidden_layers"],
            cfg["vision"]["num_attention_heads"],
            cfg["vision"]["patch_size"],
            cfg["embed_dim"],
        ) == (768, 12, 12, 16, 512)
    else:
        assert cfg["vision"]["attention_pool_heads"] == 32 and cfg["embed_dim"] == 1024
    with torch.device("meta"):
        model = build_model(cfg)
    converted = {
        k: v for k, v in convert_state_dict({k: torch.empty(v.shape) for k, v in sd.items()}, layout).items()
    }
    own = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)


def test_refuses_what_is_not_a_chinese_clip_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ChineseClipImportError, match="could not be read"):
        read_chinese_clip_state_dict(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ChineseClipImportError, match="not a Chinese-CLIP"):
        read_chinese_clip_state_dict(other)
    with pytest.raises(ChineseClipImportError, match="does not exist"):
        read_chinese_clip_state_dict(tmp_path / "missing.pt")


def test_refuses_incomplete_checkpoint_and_wrong_vocab(tmp_path):
    ref = _reference(VIT_SMALL)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items() if "resblocks.1.ln_2" not in k}
    src = tmp_path / "partial.pt"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(ChineseClipImportError, match="missing 2"):
        import_chinese_clip(src)
    full = tmp_path / "full.pt"
    save_like_chinese_clip(ref, full)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    with pytest.raises(ChineseClipImportError, match="4 entries"):
        import_chinese_clip(full, vocab=str(vocab))


def test_cli_import_writes_a_model_file_screening_can_load(tmp_path):
    from vilref_fed.model import load_checkpoint

    ref = _reference(VIT_SMALL)
    src = tmp_path / "ViLReF_ViT.pt"
    save_like_chinese_clip(ref, src)
    out = tmp_path / "imported.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "import-chinese-clip",
            str(src),
            "-o",
            str(out),
            "--context-length",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model, meta = load_checkpoint(out)
    assert meta["prompt_language"] == "zh" and meta["source"]["format"] == "chinese-clip"
    assert len(meta["ontology_hash"]) == 64
    _compare(ref, model.eval(), 32)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "import-chinese-clip",
            str(tmp_path / "nope.pt"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_imported_model_screens_and_the_raw_release_file_gets_a_hint(tmp_path):
    from dicom_factory import identity, write_dicom

    from vilref_fed.eval.screening import ScreeningError, ScreenOptions, screen_model_file
    from vilref_fed.model.import_chinese_clip import import_to_checkpoint

    ref = _reference(VIT_SMALL)
    src = tmp_path / "ViLReF_ViT.pt"
    save_like_chinese_clip(ref, src)
    model_file = import_to_checkpoint(src, tmp_path / "imported.pt", context_length=32)
    export = tmp_path / "export"
    for i, kind in enumerate(("explicit_rgb", "jpeg_ybr422")):
        write_dicom(export / f"IM{i}", kind, identity(i), size=64, variant=i)
    opts = ScreenOptions([export], tmp_path / "out", workers=0, progress=False)
    summary = screen_model_file(model_file, opts)
    assert summary["counts"]["images_screened"] == 2 and summary["language"] == "zh"
    with pytest.raises(ScreeningError, match="import-chinese-clip"):
        screen_model_file(src, ScreenOptions([export], tmp_path / "out2", workers=0, progress=False))
