"""Label states -> the multi-hot training vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vilref_fed.labels.extractor import ReportLabels


@dataclass(frozen=True)
class LabelPolicy:
    """How states become training targets.

    Uncertain findings count as positive by default: in pre-training a label only decides which pairs
    are false negatives, and "suspected glaucoma" reports look like glaucoma reports. Negated and
    unmentioned labels are 0; a report with no finding gives all zeros ("unlabelled"), which WSCL
    treats as similar to nothing, so it never creates a false negative.
    """

    uncertain_as_positive: bool = True

    def vector(self, report_labels: ReportLabels, label_ids: Sequence[str]) -> list[int]:
        on = set(report_labels.positive)
        if self.uncertain_as_positive:
            on.update(report_labels.uncertain)
        return [1 if label_id in on else 0 for label_id in label_ids]
