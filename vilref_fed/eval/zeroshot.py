"""Zero-shot classification with the ontology's prompts: no labelled images, only the text tower.

Each label's prompts (its name plus the expert descriptors of how it looks on a fundus photo, in the
site's language) are embedded, averaged and re-normalised into one class embedding t_c.

Multi-label scoring scheme ("anchor", the default). Retinal findings co-occur, so a softmax across
labels would make them compete; instead every label is compared with the `normal` class:

    p_c(v) = sigmoid(kappa * (v . t_c - v . t_normal))        for every finding c
    p_normal(v) = sigmoid(kappa * (v . t_normal - v . mean_c t_c))

i.e. the two-way softmax over [label prompt, normal-fundus prompt], so 0.5 means "as much like this
finding as like a normal fundus". Because the anchor is linear in v, it is folded into the classifier
matrix (column c = t_c - t_normal), which keeps the classifier a plain [D, C] tensor that any caller
(screening, evaluation) applies with one matrix product. kappa is the model's learned logit scale.
The "raw" scheme (columns t_c, score sigmoid(kappa * v . t_c)) ranks images by their similarity to
the label prompt alone; it gives the same AUC ordering within an image set only if the normal
similarity is constant, which it is not, so "anchor" is the default (see docs/benchmarks.md,
Quality, for the measured difference). For single-label sets, `zeroshot_softmax` is the usual CLIP
softmax over classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vilref_fed.eval.metrics import multilabel_metrics

NORMAL_LABEL = "normal"
SCHEMES = ("anchor", "raw")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _EvalMode:
    """Eval mode for the duration of a block, then the caller's mode back (builders stay pure)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def label_text_embeddings(model: torch.nn.Module, ontology: Any, label_ids: Sequence[str], lang: str = "en"):
    """[C, D] unit class embeddings: each label's prompts embedded, averaged, re-normalised.

    `lang` is "en", "zh", or "en+zh" (both languages' prompts averaged: a consortium whose sites
    report in different languages, evaluated on images from all of them)."""
    m = _unwrap(model)
    dev = _device(m)
    with _EvalMode(m):
        out = []
        for label in label_ids:
            prompts = [p for code in lang.split("+") for p in ontology.prompts(label, code)]
            if not prompts:
                raise ValueError(f"the ontology has no {lang} prompts for {label!r}")
            tok = m.tokenize(list(prompts))
            # Padding is masked out, so cutting it after the longest prompt gives the same embeddings
            # at a fraction of the cost (prompts are ~30 tokens, the context 100): screening start-up.
            n = max(1, int(tok["attention_mask"].sum(1).max()))
            emb = m.encode_text(tok["input_ids"][:, :n].to(dev), tok["attention_mask"][:, :n].to(dev))
            out.append(F.normalize(emb.float().mean(0), dim=-1))
    return torch.stack(out)


@torch.no_grad()
def build_zeroshot_classifier(
    model: torch.nn.Module,
    ontology: Any,
    label_ids: Sequence[str],
    lang: str = "en",
    scheme: str = "anchor",
) -> torch.Tensor:
    """[D, C] classifier for `label_ids` (see the module doc for the schemes). Pure: model mode kept."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    label_ids = list(label_ids)
    if scheme == "raw":
        return label_text_embeddings(model, ontology, label_ids, lang).T.contiguous()
    all_ids = list(ontology.label_ids)
    if NORMAL_LABEL not in all_ids:
        raise ValueError("the anchor scheme needs a 'normal' label in the ontology; use scheme='raw'")
    diseases = [x for x in all_ids if x != NORMAL_LABEL]
    need = list(dict.fromkeys([NORMAL_LABEL, *label_ids, *diseases]))
    emb = dict(zip(need, label_text_embeddings(model, ontology, need, lang), strict=True))
    t_normal = emb[NORMAL_LABEL]
    t_disease_mean = torch.stack([emb[x] for x in diseases]).mean(0)
    cols = [(t_normal - t_disease_mean) if x == NORMAL_LABEL else (emb[x] - t_normal) for x in label_ids]
    return torch.stack(cols, dim=1).contiguous()


def _batches(images_or_loader: Any) -> Iterable[torch.Tensor]:
    if isinstance(images_or_loader, torch.Tensor):
        yield images_or_loader
        return
    for batch in images_or_loader:
        if isinstance(batch, dict):
            batch = batch.get("images", batch.get("image"))
        elif isinstance(batch, (list, tuple)):
            batch = batch[0]
        yield batch


@torch.no_grad()
def image_embeddings(model: torch.nn.Module, images_or_loader: Any) -> torch.Tensor:
    """[N, D] unit image embeddings for a tensor of images or an iterable of batches."""
    m = _unwrap(model)
    dev = _device(m)
    with _EvalMode(m):
        feats = [m.encode_image(x.to(dev)).float() for x in _batches(images_or_loader)]
    return torch.cat(feats) if feats else torch.zeros(0, 0)


@torch.no_grad()
def zeroshot_scores(model: torch.nn.Module, images_or_loader: Any, classifier: torch.Tensor) -> torch.Tensor:
    """[N, C] per-label probabilities: sigmoid(kappa * v @ classifier) (the anchor scheme by default)."""
    m = _unwrap(model)
    v = image_embeddings(m, images_or_loader)
    kappa = m.kappa().float() if hasattr(m, "kappa") else torch.tensor(1.0)
    return torch.sigmoid(kappa.to(v.device) * (v @ classifier.to(v.device, v.dtype)))


@torch.no_grad()
def zeroshot_softmax(model: torch.nn.Module, images_or_loader: Any, class_embeddings_dc: torch.Tensor):
    """Single-label zero-shot: softmax over classes of kappa * v . t_c (class_embeddings: raw [D, C])."""
    m = _unwrap(model)
    v = image_embeddings(m, images_or_loader)
    kappa = m.kappa().float() if hasattr(m, "kappa") else torch.tensor(1.0)
    return torch.softmax(kappa * (v @ class_embeddings_dc.to(v.device, v.dtype)), dim=-1)


def _loader(dataset: Any, batch_size: int):
    from torch.utils.data import DataLoader

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        key = "truth" if "truth" in items[0] else "labels"
        return {
            "images": torch.stack([it["image"] for it in items]),
            "truth": torch.stack([torch.as_tensor(it[key], dtype=torch.float32) for it in items]),
        }

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


@torch.no_grad()
def zeroshot_predict(
    model: torch.nn.Module,
    dataset: Any,
    ontology: Any,
    lang: str = "en",
    label_ids: Sequence[str] | None = None,
    scheme: str = "anchor",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(truth [N, C], scores [N, C], label_ids) for a dataset whose items carry "truth" (or "labels").

    The dataset's label columns must be the ontology's (or `dataset.label_ids`, then subset by name).
    """
    ds_labels = list(getattr(dataset, "label_ids", ontology.label_ids))
    label_ids = list(label_ids) if label_ids is not None else ds_labels
    unknown = [x for x in label_ids if x not in ds_labels]
    if unknown:
        raise ValueError(f"labels {unknown} are not in the dataset's label columns")
    cols = [ds_labels.index(x) for x in label_ids]
    classifier = build_zeroshot_classifier(model, ontology, label_ids, lang=lang, scheme=scheme)
    truth, scores = [], []
    for batch in _loader(dataset, batch_size):
        scores.append(zeroshot_scores(model, batch["images"], classifier).cpu())
        truth.append(batch["truth"][:, cols])
    if not scores:
        raise ValueError("the evaluation dataset is empty")
    return torch.cat(truth).numpy(), torch.cat(scores).numpy(), label_ids


def evaluate_zeroshot(
    model: torch.nn.Module,
    dataset: Any,
    ontology: Any,
    lang: str = "en",
    label_ids: Sequence[str] | None = None,
    scheme: str = "anchor",
    threshold: float = 0.5,
    min_positives: int = 5,
    batch_size: int = 64,
    return_arrays: bool = False,
) -> dict[str, Any]:
    """Zero-shot multi-label metrics on a labelled dataset: {"macro_auc", ..., "per_label": {...}}.

    Labels with fewer than `min_positives` positives in the set are reported with NaN AUC and left out
    of the macro averages (`n_labels_evaluated` says how many went in). With `return_arrays`, the
    truth and score matrices are added under "y_true"/"scores" (numpy, not JSON) for plots.
    """
    y, s, ids = zeroshot_predict(model, dataset, ontology, lang, label_ids, scheme, batch_size)
    out = multilabel_metrics(y, s, ids, threshold=threshold, min_positives=min_positives)
    out.update({"scheme": scheme, "lang": lang, "threshold": threshold, "label_ids": ids})
    if return_arrays:
        out["y_true"], out["scores"] = y, s
    return out
