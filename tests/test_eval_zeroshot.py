"""Zero-shot classifier and scores against slow per-prompt / per-image references; linear probe vs sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from vilref_fed.data.folder_dataset import FolderPairDataset
from vilref_fed.data.synthetic import generate_site
from vilref_fed.eval import (
    build_zeroshot_classifier,
    evaluate_zeroshot,
    fit_logistic,
    linear_probe,
    zeroshot_scores,
    zeroshot_softmax,
)
from vilref_fed.eval.zeroshot import label_text_embeddings
from vilref_fed.model import build_model
from vilref_fed.ontology import load_ontology

LABELS = ["diabetic_retinopathy", "glaucoma", "normal", "media_opacity"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny")
    with torch.no_grad():  # a non-trivial logit scale, so kappa's use is checked
        m.logit_scale.fill_(math.log(20.0))
    return m


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("zs")
    generate_site(d, n=40, profile="balanced", seed=5, image_size=64)
    return d


def _reference_class_embedding(model, ontology, label, lang):
    """One prompt at a time: encode, (unit), average, re-normalise."""
    vecs = []
    for prompt in ontology.prompts(label, lang):
        tok = model.tokenize([prompt])
        vecs.append(model.encode_text(tok["input_ids"], tok["attention_mask"])[0])
    return F.normalize(torch.stack(vecs).mean(0), dim=-1)


def test_class_embeddings_match_per_prompt_reference(model, ontology):
    model.eval()
    with torch.no_grad():
        got = label_text_embeddings(model, ontology, LABELS, "en")
        for i, label in enumerate(LABELS):
            ref = _reference_class_embedding(model, ontology, label, "en")
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
        both = label_text_embeddings(model, ontology, ["glaucoma"], "en+zh")[0]
        vecs = []
        for lang in ("en", "zh"):
            for p in ontology.prompts("glaucoma", lang):
                tok = model.tokenize([p])
                vecs.append(model.encode_text(tok["input_ids"], tok["attention_mask"])[0])
        torch.testing.assert_close(both, F.normalize(torch.stack(vecs).mean(0), dim=-1), atol=1e-5, rtol=1e-5)


def test_classifier_is_pure_and_anchored_on_normal(model, ontology):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = build_zeroshot_classifier(model, ontology, LABELS, lang="en")
    assert model.training, "the builder must leave the model's mode as it found it"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert w.shape == (model.config.embed_dim, len(LABELS))
    torch.testing.assert_close(w, build_zeroshot_classifier(model, ontology, LABELS, lang="en"))
    model.eval()
    with torch.no_grad():
        t = {x: _reference_class_embedding(model, ontology, x, "en") for x in ontology.label_ids}
    diseases = [x for x in ontology.label_ids if x != "normal"]
    for j, label in enumerate(LABELS):
        if label == "normal":
            ref = t["normal"] - torch.stack([t[x] for x in diseases]).mean(0)
        else:
            ref = t[label] - t["normal"]
        torch.testing.assert_close(w[:, j], ref, atol=1e-5, rtol=1e-5)
    raw = build_zeroshot_classifier(model, ontology, LABELS, lang="en", scheme="raw")
    torch.testing.assert_close(raw.norm(dim=0), torch.ones(len(LABELS)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        build_zeroshot_classifier(model, ontology, LABELS, scheme="softmax-everything")


def test_scores_match_per_image_two_way_softmax(model, ontology):
    torch.manual_seed(1)
    images = torch.randn(5, 3, model.config.image_size, model.config.image_size)
    w = build_zeroshot_classifier(model, ontology, LABELS, lang="en")
    got = zeroshot_scores(model, images, w)
    model.eval()
    with torch.no_grad():
        t = {x: _reference_class_embedding(model, ontology, x, "en") for x in ontology.label_ids}
        kappa = float(model.kappa())
        for i in range(5):
            v = model.encode_image(images[i : i + 1])[0]
            for j, label in enumerate(LABELS):
                if label == "normal":
                    continue
                pair = torch.tensor([kappa * float(v @ t[label]), kappa * float(v @ t["normal"])])
                ref = torch.softmax(pair, 0)[0]  # two-way softmax [label prompt, normal prompt]
                assert float(got[i, j]) == pytest.approx(float(ref), abs=1e-4)
    # An iterable of batches (tensors or dicts) gives the same scores as one tensor.
    batches = [images[:2], {"images": images[2:4]}, (images[4:],)]
    torch.testing.assert_close(zeroshot_scores(model, batches, w), got)
    raw = build_zeroshot_classifier(model, ontology, LABELS, lang="en", scheme="raw")
    p = zeroshot_softmax(model, images, raw)
    torch.testing.assert_close(p.sum(1), torch.ones(5), atol=1e-5, rtol=1e-5)


def test_evaluate_zeroshot_on_a_synthetic_site(model, ontology, site):
    cfg = model.config
    ds = FolderPairDataset(site, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
    out = evaluate_zeroshot(model, ds, ontology, lang="en", min_positives=1, return_arrays=True)
    assert out["label_ids"] == list(ontology.label_ids)
    assert out["y_true"].shape == out["scores"].shape == (len(ds), len(ontology.label_ids))
    for j, label in enumerate(ontology.label_ids):
        assert out["per_label"][label]["n_positive"] == int(ds.truth[:, j].sum())
    assert 0.0 <= out["macro_auc"] <= 1.0 and out["n_labels_evaluated"] >= 6
    sub = evaluate_zeroshot(model, ds, ontology, label_ids=["glaucoma", "normal"], min_positives=1)
    assert list(sub["per_label"]) == ["glaucoma", "normal"]
    with pytest.raises(ValueError):
        evaluate_zeroshot(model, ds, ontology, label_ids=["not_a_label"])


def test_fit_logistic_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7))
    y = (x @ rng.normal(size=7) + rng.normal(scale=0.8, size=300) > 0).astype(float)
    l2 = 0.05
    w, b = fit_logistic(x, y, l2=l2)
    ref = LogisticRegression(C=1.0 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w[:, 0], ref.coef_[0], atol=1e-4)
    assert b[0] == pytest.approx(ref.intercept_[0], abs=1e-4)


class _BrightDark(torch.utils.data.Dataset):
    """Label 1 = bright image, label 0 = dark image, plus noise: any image tower's features carry it."""

    label_ids = ("bright", "striped")

    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n, 2), generator=g).float()
        self.x = torch.randn(n, 3, size, size, generator=g) * 0.3 + (self.y[:, 0] * 1.5 - 0.75).view(
            n, 1, 1, 1
        )
        self.x[:, :, ::4, :] += self.y[:, 1].view(n, 1, 1, 1) * 1.0  # horizontal stripes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "truth": self.y[i]}


def test_linear_probe_recovers_labels_the_features_carry(model):
    size = model.config.image_size
    out = linear_probe(model, _BrightDark(120, size, 0), _BrightDark(80, size, 1), ["bright", "striped"])
    assert out["per_label"]["bright"]["auc"] > 0.95
    assert out["per_label"]["striped"]["auc"] > 0.8
    assert out["n_train"] == 120 and out["feature_dim"] > 0


def test_linear_probe_on_a_synthetic_site_runs_on_patient_splits(model, site):
    cfg = model.config
    args = (cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
    train = FolderPairDataset(site, *args, split="train")
    test = FolderPairDataset(site, *args, split="val")
    assert not set(train.patient_ids) & set(test.patient_ids)
    out = linear_probe(model, train, test, list(train.label_ids), min_positives=1, return_arrays=True)
    assert set(out["per_label"]) == set(train.label_ids)
    assert out["scores"].shape == (len(test), len(train.label_ids))
    assert np.all((out["scores"] >= 0) & (out["scores"] <= 1))
