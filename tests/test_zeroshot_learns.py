"""The product learns: a `tiny` model trained centrally (WSCL + batch expansion, the product's default
objective) on a synthetic hospital reaches a useful zero-shot macro-AUC on held-out synthetic images.

Held out = generated with another seed, so other patients and other draws of every lesion. The
`coarse` profile holds the findings whose signatures survive the tiny model's 32 px input (the
others — microaneurysms, small drusen, cup size — need larger inputs; see docs/benchmarks.md,
Quality). Seeded; about a minute of CPU on two cores.
"""

from __future__ import annotations

import pytest
import torch

from vilref_fed.data.folder_dataset import FolderPairDataset
from vilref_fed.data.synthetic import generate_site
from vilref_fed.eval.zeroshot import evaluate_zeroshot
from vilref_fed.model import build_model
from vilref_fed.ontology import load_ontology
from vilref_fed.train import LocalTrainer, TrainConfig


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_model_learns_zero_shot_on_held_out_synthetic_images(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        generate_site(tmp_path / "train", n=800, profile="coarse", seed=21, image_size=96)
        generate_site(tmp_path / "test", n=300, profile="coarse", seed=22, image_size=96)
        torch.manual_seed(0)
        model = build_model("tiny")
        cfg = model.config
        args = (cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
        train = FolderPairDataset(tmp_path / "train", *args)
        test = FolderPairDataset(tmp_path / "test", *args)
        assert not set(train.patient_ids) & set(test.patient_ids)
        ontology = load_ontology()

        before = evaluate_zeroshot(model, test, ontology, lang="en")
        config = TrainConfig(
            objective="wscl",
            batch_size=64,
            lr=2e-3,
            warmup_steps=20,
            max_steps=240,
            queue_size=256,
            weight_decay=0.01,
            seed=0,
            device="cpu",
        )
        LocalTrainer(model, config).fit(train, progress=False)
        after = evaluate_zeroshot(model, test, ontology, lang="en")
    finally:
        torch.set_num_threads(threads)

    aucs = {k: round(v["auc"], 3) for k, v in after["per_label"].items() if v["auc"] == v["auc"]}
    print(f"zero-shot macro AUC {before['macro_auc']:.3f} -> {after['macro_auc']:.3f}: {aucs}")
    assert after["n_labels_evaluated"] >= 6, aucs
    assert after["macro_auc"] >= 0.75, aucs
    assert after["macro_auc"] >= before["macro_auc"] + 0.15, (before["macro_auc"], aucs)
