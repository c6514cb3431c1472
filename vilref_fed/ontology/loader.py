"""Read and validate the ontology data file and a site's synonym extension.

Validation is strict because a silent mistake here (a synonym listed under two labels, a typo in a key
that drops a whole list) mislabels every report of every site. Every error names the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from vilref_fed.ontology.model import Label, Ontology, OntologyError

DEFAULT_PATH = Path(__file__).with_name("ontology_v1.toml")

_TOP_KEYS = {"version", "name", "spelling", "non_findings", "anatomy", "site_findings", "labels"}
_LIST_KEYS = (
    "synonyms_en",
    "synonyms_zh",
    "uncertain_synonyms_en",
    "uncertain_synonyms_zh",
    "weak_synonyms_en",
    "weak_synonyms_zh",
    "explained_by",
    "abbreviations",
    "descriptors_en",
    "descriptors_zh",
)
_SYNONYM_KEYS = (
    "synonyms_en",
    "synonyms_zh",
    "uncertain_synonyms_en",
    "uncertain_synonyms_zh",
    "weak_synonyms_en",
    "weak_synonyms_zh",
    "abbreviations",
)
_LABEL_KEYS = {"id", "name_en", "name_zh", *_LIST_KEYS}
_REQUIRED = ("id", "name_en", "name_zh", "descriptors_en", "descriptors_zh")
_EXT_TOP_KEYS = {"synonyms"}
_EXT_LABEL_KEYS = {
    "en": "synonyms_en",
    "zh": "synonyms_zh",
    "uncertain_en": "uncertain_synonyms_en",
    "uncertain_zh": "uncertain_synonyms_zh",
    "abbreviations": "abbreviations",
}
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SEP_RE = re.compile(r"[\s\-‐‑‒–—]+")


def normalise_term(term: str) -> str:
    """The form under which two synonyms count as the same: NFKC, lower case, hyphens and spaces unified."""
    return _SEP_RE.sub(" ", unicodedata.normalize("NFKC", term).lower()).strip()


class _Lines:
    """Finds the line of a key or value in the raw file, so errors can point at it (tomllib gives none)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.label_starts = [i for i, ln in enumerate(self.lines) if ln.strip().startswith("[[labels]]")]

    def block(self, label_index: int | None) -> tuple[int, int]:
        if label_index is None or label_index >= len(self.label_starts):
            return 0, len(self.lines)
        start = self.label_starts[label_index]
        end = (
            self.label_starts[label_index + 1]
            if label_index + 1 < len(self.label_starts)
            else len(self.lines)
        )
        return start, end

    def find(self, needle: str, label_index: int | None = None, key: bool = False) -> int:
        """1-based line of the first occurrence of `needle` in the label's block (or the file)."""
        start, end = self.block(label_index)
        pattern = re.compile(rf"^\s*\[?\s*{re.escape(needle)}\b") if key else None
        for i in range(start, end):
            line = self.lines[i]
            if pattern.search(line) if pattern else needle in line:
                return i + 1
        return start + 1

    def where(self, line: int) -> str:
        return f"{self.path.name} line {line}"


def _string_list(value: Any, what: str, lines: _Lines, label_index: int | None, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        line = lines.find(key, label_index, key=True)
        raise OntologyError(f"{lines.where(line)}: {what} must be a list of strings")
    out = []
    for v in value:
        if not v.strip():
            line = lines.find(key, label_index, key=True)
            raise OntologyError(f"{lines.where(line)}: {what} contains an empty string")
        out.append(v.strip())
    return tuple(out)


def _parse_label(raw: Any, i: int, lines: _Lines) -> Label:
    if not isinstance(raw, dict):
        raise OntologyError(f"{lines.where(lines.find('[[labels]]'))}: each [[labels]] entry must be a table")
    unknown = sorted(set(raw) - _LABEL_KEYS)
    if unknown:
        line = lines.find(unknown[0], i, key=True)
        raise OntologyError(
            f"{lines.where(line)}: unknown key {unknown[0]!r} in label {raw.get('id', '#' + str(i + 1))!r}; "
            f"allowed keys: {', '.join(sorted(_LABEL_KEYS))}"
        )
    for key in _REQUIRED:
        if key not in raw:
            line = lines.block(i)[0] + 1
            raise OntologyError(
                f"{lines.where(line)}: label {raw.get('id', '#' + str(i + 1))!r} is missing the key {key!r}"
            )
    label_id = raw["id"]
    if not isinstance(label_id, str) or not _ID_RE.match(label_id):
        line = lines.find("id", i, key=True)
        raise OntologyError(f"{lines.where(line)}: label id {label_id!r} must be lower_snake_case")
    for key in ("name_en", "name_zh"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            line = lines.find(key, i, key=True)
            raise OntologyError(f"{lines.where(line)}: label {label_id!r} has an empty {key}")
    lists = {
        key: _string_list(raw.get(key, []), f"{key} of label {label_id!r}", lines, i, key)
        for key in _LIST_KEYS
    }
    if not any(lists[k] for k in _SYNONYM_KEYS):
        line = lines.find("id", i, key=True)
        raise OntologyError(
            f"{lines.where(line)}: label {label_id!r} is empty: it has no synonyms or abbreviations, "
            "so no report could ever produce it"
        )
    for key in ("descriptors_en", "descriptors_zh"):
        n = len(lists[key])
        if not 2 <= n <= 5:
            line = lines.find(key, i, key=True)
            raise OntologyError(
                f"{lines.where(line)}: label {label_id!r} has {n} {key}; give 2 to 5 expert descriptors"
            )
    return Label(
        id=label_id,
        name_en=raw["name_en"].strip(),
        name_zh=raw["name_zh"].strip(),
        **lists,
    )


def _check_duplicates(
    labels: list[Label], non_findings: tuple[str, ...], lines: _Lines, origin: dict
) -> None:
    """A synonym under two labels would make the extractor's answer depend on dictionary order."""
    seen: dict[str, str] = {}
    for i, lab in enumerate(labels):
        own: set[str] = set()
        for key in _SYNONYM_KEYS:
            for term in getattr(lab, key):
                norm = normalise_term(term)
                where = origin.get((lab.id, term), None) or lines.where(lines.find(term, i))
                if norm in own:
                    raise OntologyError(f"{where}: synonym {term!r} is listed twice for label {lab.id!r}")
                if norm in seen:
                    raise OntologyError(
                        f"{where}: synonym {term!r} of label {lab.id!r} is already a synonym of "
                        f"{seen[norm]!r}; a synonym may belong to one label only"
                    )
                own.add(norm)
        for norm in own:
            seen[norm] = lab.id
    for term in non_findings:
        norm = normalise_term(term)
        if norm in seen:
            where = origin.get(("", term), None) or lines.where(lines.find(term))
            raise OntologyError(f"{where}: non-finding {term!r} is also a synonym of {seen[norm]!r}")


def _content_hash(doc: dict) -> str:
    canonical = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_toml(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OntologyError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise OntologyError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise OntologyError(f"{path.name}: invalid TOML: {exc}") from None


def _parse_base(path: Path) -> tuple[dict, list[Label], _Lines]:
    doc, text = _read_toml(path)
    lines = _Lines(path, text)
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise OntologyError(
            f"{lines.where(lines.find(unknown[0], key=True))}: unknown top-level key {unknown[0]!r}; "
            f"allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    if not isinstance(doc.get("version"), str) or not doc["version"].strip():
        raise OntologyError(
            f"{lines.where(lines.find('version', key=True))}: a non-empty version string is required"
        )
    raw_labels = doc.get("labels")
    if not isinstance(raw_labels, list) or not raw_labels:
        raise OntologyError(f"{path.name}: the ontology has no [[labels]]; at least one label is required")
    labels = [_parse_label(raw, i, lines) for i, raw in enumerate(raw_labels)]
    ids = [lab.id for lab in labels]
    for i, lab in enumerate(labels):
        for other in lab.explained_by:
            if other not in ids or other == lab.id:
                line = lines.where(lines.find(f'"{other}"', i))
                raise OntologyError(
                    f"{line}: explained_by of {lab.id!r} names {other!r}, which is not another label"
                )
    for i, label_id in enumerate(ids):
        if label_id in ids[:i]:
            raise OntologyError(
                f"{lines.where(lines.find('id', i, key=True))}: label id {label_id!r} appears twice"
            )
    return doc, labels, lines


def _spelling(doc: dict, lines: _Lines) -> tuple[tuple[str, tuple[str, ...]], ...]:
    raw = doc.get("spelling", {})
    if not isinstance(raw, dict):
        raise OntologyError(f"{lines.where(lines.find('spelling', key=True))}: [spelling] must be a table")
    out = []
    for canon, variants in raw.items():
        vs = _string_list(variants, f"spelling variants of {canon!r}", lines, None, canon)
        out.append((normalise_term(canon), tuple(normalise_term(v) for v in vs)))
    return tuple(out)


def _non_findings(doc: dict, lines: _Lines) -> tuple[tuple[str, ...], tuple[str, ...]]:
    raw = doc.get("non_findings", {})
    if not isinstance(raw, dict) or set(raw) - {"en", "zh"}:
        line = lines.find("non_findings", key=True)
        raise OntologyError(f"{lines.where(line)}: [non_findings] may only hold the lists 'en' and 'zh'")
    en = _string_list(raw.get("en", []), "non_findings.en", lines, None, "en")
    zh = _string_list(raw.get("zh", []), "non_findings.zh", lines, None, "zh")
    return en, zh


def _anatomy(doc: dict, lines: _Lines, label_ids: list[str]) -> tuple[tuple, tuple]:
    raw = doc.get("anatomy", {})
    if not isinstance(raw, dict):
        raise OntologyError(f"{lines.where(lines.find('anatomy', key=True))}: [anatomy] must be a table")
    anatomy = tuple(
        (site, _string_list(words, f"anatomy words of {site!r}", lines, None, site))
        for site, words in raw.items()
    )
    sites = {site for site, _ in anatomy}
    entries = doc.get("site_findings", [])
    if not isinstance(entries, list):
        raise OntologyError(
            f"{lines.where(lines.find('site_findings'))}: site_findings must be [[site_findings]]"
        )
    out = []
    seen: dict[tuple[str, str], str] = {}
    for entry in entries:
        line = lines.where(lines.find("[[site_findings]]"))
        if not isinstance(entry, dict) or set(entry) != {"site", "label", "terms"}:
            raise OntologyError(
                f"{line}: each [[site_findings]] needs exactly the keys site, label and terms"
            )
        site, label = entry["site"], entry["label"]
        if site not in sites:
            where = lines.where(lines.find(f'site = "{site}"'))
            raise OntologyError(f"{where}: site {site!r} is not defined under [anatomy]")
        if label not in label_ids:
            where = lines.where(lines.find(f'label = "{label}"'))
            raise OntologyError(f"{where}: site finding names unknown label {label!r}")
        terms = _string_list(
            entry["terms"], f"terms of the {site}/{label} site finding", lines, None, "terms"
        )
        if not terms:
            raise OntologyError(f"{line}: the {site}/{label} site finding has no terms")
        for term in terms:
            norm = normalise_term(term)
            if (site, norm) in seen:
                where = lines.where(lines.find(term))
                raise OntologyError(
                    f"{where}: lesion {term!r} at site {site!r} already means {seen[(site, norm)]!r}"
                )
            seen[(site, norm)] = label
        out.append((site, label, terms))
    return anatomy, tuple(out)


def _apply_extension(path: Path, labels: list[Label]) -> tuple[list[Label], dict, str]:
    """Merge a site's extra synonyms. The label list itself is consortium-wide, anything else is refused."""
    doc, text = _read_toml(path)
    lines = _Lines(path, text)
    unknown = sorted(set(doc) - _EXT_TOP_KEYS)
    if unknown:
        raise OntologyError(
            f"{lines.where(lines.find(unknown[0], key=True))}: a site extension may only add synonyms "
            f"([synonyms.<label_id>] tables); {unknown[0]!r} is not allowed — labels cannot be added, "
            "removed or renamed locally"
        )
    tables = doc.get("synonyms", {})
    if not isinstance(tables, dict):
        raise OntologyError(f"{lines.where(1)}: 'synonyms' must be a table of [synonyms.<label_id>] tables")
    by_id = {lab.id: lab for lab in labels}
    origin: dict = {}
    for label_id, extra in tables.items():
        header = lines.find(f"[synonyms.{label_id}]")
        if label_id not in by_id:
            raise OntologyError(
                f"{lines.where(header)}: label {label_id!r} is not in the consortium ontology; a site "
                "extension can only add synonyms to existing labels"
            )
        if not isinstance(extra, dict):
            raise OntologyError(f"{lines.where(header)}: [synonyms.{label_id}] must be a table")
        bad = sorted(set(extra) - set(_EXT_LABEL_KEYS))
        if bad:
            raise OntologyError(
                f"{lines.where(lines.find(bad[0], key=True))}: unknown key {bad[0]!r} under "
                f"[synonyms.{label_id}]; allowed: {', '.join(_EXT_LABEL_KEYS)} (only synonyms can be added)"
            )
        lab = by_id[label_id]
        updates = {}
        for ext_key, field_name in _EXT_LABEL_KEYS.items():
            if ext_key not in extra:
                continue
            added = _string_list(extra[ext_key], f"{ext_key} of [synonyms.{label_id}]", lines, None, ext_key)
            for term in added:
                origin[(label_id, term)] = lines.where(lines.find(term))
            updates[field_name] = getattr(lab, field_name) + added
        by_id[label_id] = Label(**{**lab.__dict__, **updates})
    ext_hash = _content_hash(doc)
    return [by_id[lab.id] for lab in labels], origin, ext_hash


def _load(path: Path, extension: Path | None) -> Ontology:
    doc, labels, lines = _parse_base(path)
    spelling = _spelling(doc, lines)
    nf_en, nf_zh = _non_findings(doc, lines)
    _check_duplicates(labels, nf_en + nf_zh, lines, {})
    anatomy, site_findings = _anatomy(doc, lines, [lab.id for lab in labels])
    content = {
        "version": doc["version"],
        "labels": [lab.__dict__ for lab in labels],
        "spelling": [[c, list(v)] for c, v in spelling],
        "non_findings": [list(nf_en), list(nf_zh)],
        "anatomy": [[site, list(words)] for site, words in anatomy],
        "site_findings": [[site, label, list(terms)] for site, label, terms in site_findings],
    }
    content_hash = _content_hash(json.loads(json.dumps(content, ensure_ascii=False)))
    ext_hash = None
    if extension is not None:
        labels, origin, ext_hash = _apply_extension(Path(extension), labels)
        _check_duplicates(labels, nf_en + nf_zh, lines, origin)
    return Ontology(
        version=doc["version"].strip(),
        name=str(doc.get("name", "")),
        labels=tuple(labels),
        hash=content_hash,
        spelling=spelling,
        non_findings_en=nf_en,
        non_findings_zh=nf_zh,
        anatomy=anatomy,
        site_findings=site_findings,
        extension_hash=ext_hash,
    )


@lru_cache(maxsize=1)
def _load_default() -> Ontology:
    return _load(DEFAULT_PATH, None)


def load_ontology(extension: Path | None = None, path: Path | None = None) -> Ontology:
    """The consortium ontology, optionally with a site's synonym extension merged in.

    The default file without extension is cached: every extractor and prompt builder shares one object.
    Raises `OntologyError` (a ValueError) naming the file and line of any problem.
    """
    if path is None and extension is None:
        return _load_default()
    return _load(Path(path) if path is not None else DEFAULT_PATH, extension)
