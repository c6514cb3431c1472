"""The in-memory ontology: immutable, so one object can be shared by every extractor and prompt builder."""

from __future__ import annotations

from dataclasses import dataclass, field


class OntologyError(ValueError):
    """The ontology or a site extension is invalid. The message names the file, line and label at fault."""


@dataclass(frozen=True)
class Label:
    """One consortium label: how reports name it (synonyms) and how it looks (descriptors, for prompts)."""

    id: str
    name_en: str
    name_zh: str
    synonyms_en: tuple[str, ...]
    synonyms_zh: tuple[str, ...]
    abbreviations: tuple[str, ...]
    descriptors_en: tuple[str, ...]
    descriptors_zh: tuple[str, ...]
    # Phrases that by themselves mean "suspected" ("glaucoma suspect"): state uncertain without a hedge cue.
    uncertain_synonyms_en: tuple[str, ...] = ()
    uncertain_synonyms_zh: tuple[str, ...] = ()
    # Lesions shared with other diseases: they count for this label only when none of the labels in
    # `explained_by` is positive or uncertain for the same eye ("haemorrhages" with a CRVO are not DR).
    weak_synonyms_en: tuple[str, ...] = ()
    weak_synonyms_zh: tuple[str, ...] = ()
    explained_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ontology:
    """The consortium's label list plus the expert knowledge attached to each label.

    `hash` covers only the consortium content (never a site's synonym extension), because the server
    compares it to decide whether a site trains on the same label layout.
    """

    version: str
    name: str
    labels: tuple[Label, ...]
    hash: str
    spelling: tuple[tuple[str, tuple[str, ...]], ...] = ()
    non_findings_en: tuple[str, ...] = ()
    non_findings_zh: tuple[str, ...] = ()
    # "site ... lesion" findings: anatomy site -> its words, and (site, label id, lesion words)
    anatomy: tuple[tuple[str, tuple[str, ...]], ...] = ()
    site_findings: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    extension_hash: str | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({lab.id: i for i, lab in enumerate(self.labels)})

    @property
    def label_ids(self) -> tuple[str, ...]:
        return tuple(lab.id for lab in self.labels)

    def index(self, label_id: str) -> int:
        """Position of a label in the multi-hot vector."""
        try:
            return self._index[label_id]
        except KeyError:
            raise KeyError(f"unknown label id {label_id!r}; known: {', '.join(self.label_ids)}") from None

    def label(self, label_id: str) -> Label:
        return self.labels[self.index(label_id)]

    def prompts(self, label_id: str, lang: str = "en") -> list[str]:
        """Zero-shot prompts for a label: its name first, then the expert descriptors of its appearance."""
        lab = self.label(label_id)
        if lang == "en":
            return [lab.name_en, *lab.descriptors_en]
        if lang == "zh":
            return [lab.name_zh, *lab.descriptors_zh]
        raise ValueError(f"unsupported prompt language {lang!r}; use 'en' or 'zh'")
