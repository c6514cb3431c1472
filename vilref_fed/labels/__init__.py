"""Report text -> label states (positive / uncertain / negated) and training vectors, English and Chinese."""

from vilref_fed.labels.extractor import EMPTY, LabelExtractor, ReportLabels, get_extractor, normalise_eye
from vilref_fed.labels.policy import LabelPolicy

__all__ = ["EMPTY", "LabelExtractor", "LabelPolicy", "ReportLabels", "get_extractor", "normalise_eye"]
