"""Report text -> label states (positive / uncertain / negated), per DESIGN §3.2.

How a report is read:
1. Normalise (NFKC: full-width -> half-width, lower case); spelling variants and misspellings are part
   of the compiled synonym set, so positions in the text never shift.
2. One regex pass finds findings (longest synonym wins), cues, eye markers and punctuation.
3. Clauses end at . ; 。 ! ? newline and at "but / however / except / 但 / 然而"; inside a clause,
   commas and colons split segments.
4. A PRE cue ("no", "without", "possible", "无", "疑似") governs the findings after it to the end of its
   segment, and across commas while the following segments read as a list ("no haemorrhages,
   exudates or macular oedema"). A POST cue ("not seen", "suspected", "待排", "(-)") governs the findings
   just before it that no PRE cue already governs. History and plan cues ("history of", "s/p",
   "refer", "建议", "术后") remove the findings they govern: they are not findings of this photo.
5. An eye marker at the start of a segment opens a section for that eye ("OD: ...", "右眼..."); one
   later in a segment ("drusen in the left eye") applies to that segment only. OU/both eyes -> both.
6. Per label, the strongest state wins (positive > uncertain > negated). `normal` survives only if
   no disease is positive or uncertain for the same eye selection.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from vilref_fed.labels import lexicon as lx
from vilref_fed.labels.compiler import (
    AFFIRM,
    BOUNDARY,
    COLON,
    COMMA,
    CONNECT,
    CUE,
    EYE,
    MENTION,
    NEGATED,
    NONFIND,
    NORMAL_WORD,
    POSITIVE,
    QUESTION,
    UNCERTAIN,
    Scanner,
    key_of,
)
from vilref_fed.ontology import Ontology, load_ontology

_TRANSLATE = str.maketrans({"’": "'", "‘": "'", "\u00a0": " ", "\u3000": " "})
_FILLER = re.compile(
    r"(?:\s+|(?:or|and|nor|any|either|other|also|some|the|a|an|further|more)(?![a-z0-9])"
    r"|或者|或|以及|及|和|与|、|明显的?|其他|任何|/|&)*"
)
_NORMAL_CONTEXT = re.compile(
    r"(?:[\s:()\-]+|(?:" + "|".join(re.escape(w) for w in lx.NORMAL_CONTEXT_WORDS) + r"))*"
)
_EYE_ALIASES = {
    "od": "OD",
    "r": "OD",
    "re": "OD",
    "right": "OD",
    "right eye": "OD",
    "右": "OD",
    "右眼": "OD",
    "os": "OS",
    "l": "OS",
    "le": "OS",
    "left": "OS",
    "left eye": "OS",
    "左": "OS",
    "左眼": "OS",
    "ou": None,
    "b": None,
    "both": None,
    "both eyes": None,
    "双": None,
    "双眼": None,
    "": None,
}
_CUE_STATE = {lx.NEG: NEGATED, lx.HEDGE: UNCERTAIN, lx.HIST: 0, lx.PLAN: 0}


def normalise_eye(eye: str | None) -> str | None:
    """'OD' or 'OS' for one eye, None for both/unknown-eye-free reports. Raises ValueError otherwise."""
    if eye is None:
        return None
    key = str(eye).strip().lower()
    if key in _EYE_ALIASES:
        return _EYE_ALIASES[key]
    raise ValueError(f"unrecognised eye {eye!r}; use OD (right), OS (left) or OU/empty (both)")


@dataclass(frozen=True)
class ReportLabels:
    """The label states of one report (or one eye of it); label ids in ontology order."""

    positive: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    negated: tuple[str, ...] = ()

    def to_json_dict(self, report_id: Any) -> dict:
        return {
            "report_id": report_id,
            "positive": list(self.positive),
            "uncertain": list(self.uncertain),
            "negated": list(self.negated),
        }

    @property
    def is_empty(self) -> bool:
        return not (self.positive or self.uncertain or self.negated)


EMPTY = ReportLabels()


def _normalise(text: str) -> tuple[str, str]:
    """(case-preserved, lower-case) copies of the text with identical lengths, so positions agree."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    low = text.lower()
    if len(low) != len(text):  # a few characters (e.g. 'İ') lower to two; keep positions aligned
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    return text, low


class _Seg:
    __slots__ = ("start", "end", "sep", "toks")

    def __init__(self, start: int, sep: int | None) -> None:
        self.start = start
        self.end = start
        self.sep = sep
        self.toks: list[tuple] = []


class LabelExtractor:
    """Reads reports against one ontology; compile once, then call `extract` per report."""

    def __init__(self, ontology: Ontology) -> None:
        self.ontology = ontology
        self.scanner = Scanner(ontology)
        self._regex = self.scanner.regex
        self._table = self.scanner.table
        self._ids = ontology.label_ids
        self._normal = self.scanner.normal
        self._glaucoma = self.scanner.glaucoma

    # ---- tokenising -------------------------------------------------------------------------------
    def _tokens(self, text: str, low: str) -> list[tuple]:
        """(kind, start, end, a, b) for every recognised term and punctuation mark, left to right."""
        table = self._table
        toks: list[tuple] = []
        append = toks.append
        for m in self._regex.finditer(low):
            group = m.lastgroup
            if group == "p":
                ch = m.group()
                s = m.start()
                if ch == ",":
                    append((COMMA, s, s + 1, None, None))
                elif ch == ":":
                    append((COLON, s, s + 1, None, None))
                elif ch == "?":
                    append((QUESTION, s, s + 1, None, None))
                elif ch == "、":
                    append((CONNECT, s, s + 1, None, None))
                else:
                    append((BOUNDARY, s, s + 1, None, None))
            elif group == "cdr" or m.group("cdr") is not None:
                value = float(m.group("cdrv"))
                if self._glaucoma is None or value < 0.6:
                    append((NONFIND, m.start(), m.end(), None, None))
                else:
                    append(
                        (MENTION, m.start(), m.end(), self._glaucoma, POSITIVE if value >= 0.7 else UNCERTAIN)
                    )
            else:
                s, e = m.span(group)
                entry = table.get(key_of(m.group(group)))
                if entry is None:  # pragma: no cover - the regex is built from the table's keys
                    continue
                if entry.case_forms is not None and key_of(text[s:e]) not in entry.case_forms:
                    continue
                append((entry.kind, s, m.end(), entry.a, entry.b))
        return toks

    # ---- reading ----------------------------------------------------------------------------------
    def _clauses(self, toks: list[tuple], n: int) -> list[list[_Seg]]:
        clauses: list[list[_Seg]] = []
        segs = [_Seg(0, None)]
        for i, tok in enumerate(toks):
            kind = tok[0]
            if kind == BOUNDARY:
                segs[-1].end = tok[1]
                clauses.append(segs)
                segs = [_Seg(tok[2], None)]
            elif kind == COMMA or kind == COLON:
                segs[-1].end = tok[1]
                segs.append(_Seg(tok[2], kind))
            elif kind == QUESTION:
                nxt = toks[i + 1] if i + 1 < len(toks) else None
                if nxt is not None and nxt[0] == MENTION and nxt[1] - tok[2] <= 1:
                    segs[-1].toks.append((CUE, tok[1], tok[2], lx.HEDGE, lx.PRE))
                else:
                    segs[-1].toks.append((CUE, tok[1], tok[2], lx.HEDGE, lx.POST))
                    segs[-1].end = tok[2]
                    clauses.append(segs)
                    segs = [_Seg(tok[2], None)]
            else:
                segs[-1].toks.append(tok)
        segs[-1].end = n
        clauses.append(segs)
        return clauses

    @staticmethod
    def _mention_follows(toks: list[tuple], k: int) -> bool:
        for tok in toks[k + 1 :]:
            kind = tok[0]
            if kind == MENTION:
                return True
            if kind == CUE or kind == AFFIRM:
                return False
        return False

    @staticmethod
    def _continues_list(seg: _Seg, low: str) -> bool:
        """Does this comma segment carry on the previous one's list ("..., exudates or macular oedema")?"""
        first = None
        has_affirm = has_connector = False
        for tok in seg.toks:
            kind = tok[0]
            if kind == CUE:
                return False
            if kind == AFFIRM:
                has_affirm = True
            elif kind == CONNECT:
                has_connector = True
            elif first is None:
                first = tok
        if first is None or first[0] not in (MENTION, NONFIND):
            return False
        if not _FILLER.fullmatch(low, seg.start, first[1]):
            return False
        return not has_affirm or has_connector

    def _normal_alone(self, seg: _Seg, tok: tuple, low: str) -> bool:
        """'normal' is a finding only when nothing else in its segment says *what* is normal."""
        pos = seg.start
        for other in seg.toks:
            if other is tok or other[0] == EYE:
                if not _NORMAL_CONTEXT.fullmatch(low, pos, other[1]):
                    return False
                pos = other[2]
            elif other[0] != CONNECT:
                return False
        return _NORMAL_CONTEXT.fullmatch(low, pos, max(pos, seg.end)) is not None

    def _read(self, text: str, low: str) -> list[tuple[int, int, str | None]]:
        """(label index, state, eye) for every finding that is a finding of this photograph."""
        toks = self._tokens(text, low)
        found: list[list] = []
        section_eye: str | None = None
        for clause in self._clauses(toks, len(low)):
            plan = False
            active = 0  # state imposed by the governing PRE cue (0 = none, -1 = drop)
            open_m: list[list] = []
            for si, seg in enumerate(clause):
                stoks = seg.toks
                # eyes: a marker before any finding/cue opens a section; later ones are local
                local: set[str] = set()
                seen_content = False
                for tok in stoks:
                    kind = tok[0]
                    if kind == EYE:
                        if seen_content:
                            local.add(tok[3])
                        else:
                            section_eye = tok[3]
                    elif kind != CONNECT:
                        seen_content = True
                eye = section_eye
                if local:
                    eye = local.pop() if len(local) == 1 else "OU"
                if si > 0 and not self._continues_list(seg, low):
                    active = 0
                    if seg.sep != COLON:
                        open_m = []
                first_rel = True
                for k, tok in enumerate(stoks):
                    kind = tok[0]
                    if kind == MENTION or (
                        kind == NORMAL_WORD and self._normal is not None and self._normal_alone(seg, tok, low)
                    ):
                        label, base = (tok[3], tok[4]) if kind == MENTION else (self._normal, POSITIVE)
                        if plan:
                            state = 0
                        elif active:
                            state = active
                        else:
                            state = base
                        rec = [label, state, eye]
                        found.append(rec)
                        if not plan and not active:
                            open_m.append(rec)
                    elif kind == CUE:
                        ctype, direction = tok[3], tok[4]
                        follows = self._mention_follows(stoks, k)
                        if direction == lx.BOTH:
                            direction = lx.PRE if follows else lx.POST
                        elif direction == lx.PRE and not follows and first_rel and seg.sep == COLON:
                            direction = lx.POST  # "DR: no", "Glaucoma: possible"
                        state = _CUE_STATE[ctype]
                        if direction == lx.PRE:
                            if ctype == lx.PLAN:
                                plan = True
                            else:
                                active = state if state else -1
                            open_m = []
                        else:
                            for rec in open_m:
                                rec[1] = state
                            open_m = []
                    elif kind == AFFIRM:
                        open_m = []
                    if kind != CONNECT:
                        first_rel = False
        return [(label, state, eye) for label, state, eye in found if state > 0]

    # ---- public -----------------------------------------------------------------------------------
    def extract(self, text: str, eye: str | None = None) -> ReportLabels:
        """Label states of a report, for one eye ('OD'/'OS') or the whole report (None/'OU')."""
        if text is None:
            return EMPTY
        if not isinstance(text, str):
            raise TypeError(f"report text must be str, not {type(text).__name__}")
        want = normalise_eye(eye)
        if not text or text.isspace():
            return EMPTY
        orig, low = _normalise(text)
        best: dict[int, int] = {}
        for label, state, where in self._read(orig, low):
            if want is not None and where is not None and where != "OU" and where != want:
                continue
            if state > best.get(label, 0):
                best[label] = state
        if not best:
            return EMPTY
        normal = self._normal
        if normal is not None and best.get(normal, 0) >= UNCERTAIN:
            if any(s >= UNCERTAIN for lab, s in best.items() if lab != normal):
                del best[normal]
        ids = self._ids
        order = sorted(best)
        return ReportLabels(
            positive=tuple(ids[i] for i in order if best[i] == POSITIVE),
            uncertain=tuple(ids[i] for i in order if best[i] == UNCERTAIN),
            negated=tuple(ids[i] for i in order if best[i] == NEGATED),
        )

    def mentions(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, label_id) of every finding term in the normalised text; for tests and tooling."""
        orig, low = _normalise(text)
        return [(t[1], t[2], self._ids[t[3]]) for t in self._tokens(orig, low) if t[0] == MENTION]


_DEFAULT: LabelExtractor | None = None
_CACHE: dict[tuple[str, str | None, int], LabelExtractor] = {}


def get_extractor(ontology: Ontology | None = None) -> LabelExtractor:
    """A compiled extractor, cached per ontology (compiling costs far more than extracting)."""
    global _DEFAULT
    if ontology is None:
        if _DEFAULT is None:
            _DEFAULT = LabelExtractor(load_ontology())
        return _DEFAULT
    key = (ontology.hash, ontology.extension_hash, id(ontology))
    ext = _CACHE.get(key)
    if ext is None:
        ext = _CACHE[key] = LabelExtractor(ontology)
    return ext
