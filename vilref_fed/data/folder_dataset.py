"""A synthetic site directory as a training/evaluation dataset, without going through ingestion.

Centralised baselines, the quality benchmark and the learnability test train on generated hospitals
directly; they must see images exactly as a site would after ingestion (canonical crop at 256 px, then
the model's resize and normalisation), so this dataset uses the shared preprocessing path
(`canonical_image`, `to_model_tensor`). Images are decoded once and kept in memory at the model's
size: epochs then cost only the model.

Training labels can come from the generator's truth (image-level findings), from what the report
states (`report_states.jsonl`: an ideal extractor), or from the product's label extractor on the
report text (what a real site would get).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vilref_fed.data.preprocess import (
    DEFAULT_CANONICAL_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    canonical_image,
    to_model_tensor,
)
from vilref_fed.data.synthetic import read_reports, read_truth

SPLITS = ("train", "val", "test", "all")
LABEL_SOURCES = ("truth", "report", "extractor")


def patient_split(patient_id: str, val_fraction: float, salt: str = "vilref-split") -> str:
    """Stable patient-level split: a hash of the patient decides, so no patient is in both splits."""
    h = int(hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


class FolderPairDataset:
    """Image-report pairs of a generated site directory, following the trainer's item contract.

    Items: {"image": float Tensor[3, S, S] normalised, "text": report str, "labels": float Tensor[L]
    multi-hot (training labels from `labels_from`), "truth": float Tensor[L] (image-level truth, for
    evaluation), "image_id": str, "eye": "OD"|"OS"}.

    split: "train"/"val" by patient hash (val_fraction), "test" is a synonym of "val", "all" keeps
    everything (a held-out hospital is a whole generated directory).
    """

    def __init__(
        self,
        out_dir: Path | str,
        image_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        split: str = "all",
        val_fraction: float = 0.2,
        labels_from: str = "truth",
        policy: Any = None,
        label_ids: tuple[str, ...] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if labels_from not in LABEL_SOURCES:
            raise ValueError(f"labels_from must be one of {LABEL_SOURCES}, got {labels_from!r}")
        self.root = Path(out_dir)
        if not (self.root / "truth.csv").is_file() or not (self.root / "reports.csv").is_file():
            raise FileNotFoundError(
                f"{self.root} is not a synthetic site (truth.csv and reports.csv missing): "
                "generate one with `vilref-client synth`"
            )
        rows, label_cols = read_truth(self.root)
        self.label_ids = tuple(label_ids) if label_ids is not None else label_cols
        missing = [x for x in self.label_ids if x not in label_cols]
        if missing:
            raise ValueError(f"truth.csv has no column for labels {missing}")
        reports = read_reports(self.root)
        want = "val" if split == "test" else split
        if want != "all":
            rows = [r for r in rows if patient_split(r["patient_id"], val_fraction) == want]
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_ids = [r["image"] for r in rows]
        self.eyes = [r["eye"] for r in rows]
        self.patient_ids = [r["patient_id"] for r in rows]
        self.texts = [reports[r["accession"]]["report"] for r in rows]
        self.truth = np.array([[int(r[x]) for x in self.label_ids] for r in rows], dtype=np.float32).reshape(
            len(rows), len(self.label_ids)
        )
        if labels_from == "truth":
            self.train_labels = self.truth.copy()
        elif labels_from == "report":
            self.train_labels = self._stated_labels(rows, uncertain_positive=True)
        else:
            self.train_labels = self._extracted_labels(rows, reports, policy)
        self.images = (
            np.stack([self._load(self.root / r["image"]) for r in rows])
            if rows
            else np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        )

    def _load(self, path: Path) -> np.ndarray:
        with Image.open(path) as im:
            rgb = canonical_image(np.asarray(im.convert("RGB")), size=DEFAULT_CANONICAL_SIZE)
        if rgb.shape[0] != self.image_size:
            # The same PIL bilinear resize that to_model_tensor would apply.
            rgb = np.asarray(
                Image.fromarray(rgb).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            )
        return rgb

    def _stated_labels(self, rows: list[dict[str, str]], uncertain_positive: bool) -> np.ndarray:
        stated: dict[tuple[str, str], set[str]] = {}
        with open(self.root / "report_states.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                pos = set(r["positive"]) | (set(r["uncertain"]) if uncertain_positive else set())
                stated[(r["report_id"], r["eye"])] = pos
        out = np.zeros((len(rows), len(self.label_ids)), dtype=np.float32)
        for i, r in enumerate(rows):
            pos = stated.get((r["accession"], r["eye"]), set())
            for j, x in enumerate(self.label_ids):
                out[i, j] = float(x in pos)
        return out

    def _extracted_labels(self, rows, reports, policy) -> np.ndarray:
        from vilref_fed.labels import LabelPolicy, get_extractor

        extractor = get_extractor()
        policy = policy if policy is not None else LabelPolicy()
        out = np.zeros((len(rows), len(self.label_ids)), dtype=np.float32)
        for i, r in enumerate(rows):
            rep = reports[r["accession"]]
            states = extractor.extract(rep["report"], eye=r["eye"])
            out[i] = np.asarray(policy.vector(states, list(self.label_ids)), dtype=np.float32)
        return out

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        return {
            "image": to_model_tensor(self.images[i], self.image_size, self.mean, self.std),
            "text": self.texts[i],
            "labels": torch.from_numpy(self.train_labels[i]),
            "truth": torch.from_numpy(self.truth[i]),
            "image_id": self.image_ids[i],
            "eye": self.eyes[i],
        }


class ConcatPairs:
    """Several FolderPairDatasets as one (a consortium pooled centrally, or a multi-site test set)."""

    def __init__(self, parts: list[FolderPairDataset]) -> None:
        if not parts:
            raise ValueError("no datasets to concatenate")
        ids = {p.label_ids for p in parts}
        if len(ids) != 1:
            raise ValueError("datasets disagree on the label list")
        self.parts = parts
        self.label_ids = parts[0].label_ids
        self._offsets = np.cumsum([0] + [len(p) for p in parts])
        self.truth = np.concatenate([p.truth for p in parts])
        self.train_labels = np.concatenate([p.train_labels for p in parts])
        self.texts = [t for p in parts for t in p.texts]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self.parts[k][i - int(self._offsets[k])]
