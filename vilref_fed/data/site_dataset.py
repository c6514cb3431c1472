"""The training view of a site: (canonical image, report text, multi-hot labels) pairs.

The split is per patient (no patient's images in both train and val) and decided by the patient's
keyed hash, so it is stable across runs, machines and re-ingestions, and needs no stored state.
Images without a patient ID fall back to their study, then to the image itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vilref_fed.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vilref_fed.data.site import patient_split

SPLITS = ("train", "val", "all")
__all__ = ["SPLITS", "SiteDataset", "SiteRecord", "load_records", "patient_split"]


@dataclass(frozen=True)
class SiteRecord:
    """One linked image, as loaded once at construction (DataLoader workers then only read PNGs)."""

    image_id: str
    file: Path
    text: str
    positive: tuple[str, ...]
    uncertain: tuple[str, ...]
    negated: tuple[str, ...]
    group: str
    laterality: str | None

    def __repr__(self) -> str:  # the text is patient data
        return f"SiteRecord({self.image_id[:12]}, {len(self.text)} chars)"


def load_records(site_dir: str | os.PathLike[str]) -> tuple[list[SiteRecord], float]:
    """Every image linked to a report, in image-id order, plus the site's validation fraction."""
    from sqlalchemy import select

    from vilref_fed.data.site import open_site
    from vilref_fed.store.site_models import Image, ImageReport, Report

    site = open_site(site_dir)
    try:
        q = (
            select(
                Image.image_key,
                Image.file_name,
                Image.patient_key,
                Image.study_key,
                Image.laterality,
                Report.text,
                ImageReport.positive,
                ImageReport.uncertain,
                ImageReport.negated,
            )
            .join(ImageReport, ImageReport.image_id == Image.id)
            .join(Report, Report.id == ImageReport.report_id)
            .order_by(Image.image_key)
        )
        with site.session() as s:
            rows = s.execute(q).all()
        records = [
            SiteRecord(
                image_id=key,
                file=site.root / name,
                text=text,
                positive=tuple(pos or ()),
                uncertain=tuple(unc or ()),
                negated=tuple(neg or ()),
                group=pk or sk or key,
                laterality=lat,
            )
            for key, name, pk, sk, lat, text, pos, unc, neg in rows
        ]
        return records, float(site.config.val_fraction)
    finally:
        site.close()


try:  # torch is a hard dependency of training, not of ingestion: keep this module importable without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]


class SiteDataset(_TorchDataset):  # type: ignore[misc]
    """Torch dataset over a site's linked images, following the trainer's item contract:
    {"image": float Tensor[3,H,W] normalised, "text": str, "labels": float Tensor[L], "image_id": str}.

    Labels are recomputed from the stored label states with `policy`, so switching the uncertain
    policy needs no re-ingestion.
    """

    def __init__(
        self,
        site_dir: str | os.PathLike[str],
        split: str = "train",
        image_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        policy: Any = None,
        val_fraction: float | None = None,
    ) -> None:
        from vilref_fed.labels import LabelPolicy, ReportLabels
        from vilref_fed.ontology import load_ontology

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        records, site_fraction = load_records(site_dir)
        fraction = site_fraction if val_fraction is None else val_fraction
        if split != "all":
            records = [r for r in records if patient_split(r.group, fraction) == split]
        self.site_dir = Path(site_dir)
        self.split = split
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.policy = policy or LabelPolicy()
        self.label_ids = load_ontology().label_ids
        self.records = records
        self._labels = np.asarray(
            [
                self.policy.vector(ReportLabels(r.positive, r.uncertain, r.negated), self.label_ids)
                for r in records
            ],
            dtype=np.float32,
        ).reshape(len(records), len(self.label_ids))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """[N, L] multi-hot matrix, in item order."""
        return self._labels

    def groups(self) -> list[str]:
        """The (keyed) patient group of each item, for checks that no patient spans splits."""
        return [r.group for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch
        from PIL import Image

        from vilref_fed.data.preprocess import to_model_tensor

        r = self.records[index]
        with Image.open(r.file) as im:
            rgb = np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
        return {
            "image": to_model_tensor(rgb, self.image_size, self.mean, self.std),
            "text": r.text,
            "labels": torch.from_numpy(self._labels[index].copy()),
            "image_id": r.image_id,
        }
