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
    ANATOMY,
    BOUNDARY,
    COLON,
    COMMA,
    CONNECT,
    CUE,
    EYE,
    LESION,
    MEASURE,
    MENTION,
    NEGATED,
    NONFIND,
    NORMAL_WORD,
    POSITIVE,
    PUNCTUATION_KINDS,
    QUESTION,
    UNCERTAIN,
    WEAK,
    Scanner,
)
from vilref_fed.ontology import Ontology, load_ontology

# Full-width punctuation of Chinese text, mapped as NFKC maps it but with str.replace, which is much
# cheaper than NFKC over the whole text; NFKC still runs when anything else needs it.
_FULL_WIDTH = (("，", ","), ("：", ":"), ("；", ";"), ("（", "("), ("）", ")"), ("？", "?"), ("！", "!"))
_TAIL_FILLER = re.compile(
    r"(?:[\s()\[\]/]+|(?:in|at|of|on|the|a|any|either|both|all|area|region|quadrants?|seen)(?![a-z0-9])"
    r"|等|改变|表现|处|区|部)*"
)
_FILLER = re.compile(
    r"(?:\s+|(?:or|and|nor|any|either|other|also|some|the|a|an|of|further|more)(?![a-z0-9])"
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
_DELETE_SEPARATORS = str.maketrans("", "", " \t-")
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
        for wide, narrow in _FULL_WIDTH:
            if wide in text:
                text = text.replace(wide, narrow)
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        if "’" in text or "‘" in text:
            text = text.replace("’", "'").replace("‘", "'")
    low = text.lower()
    if len(low) != len(text):  # a few characters (e.g. 'İ') lower to two; keep positions aligned
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    return text, low


class _Seg:
    """A comma/colon-delimited stretch of a clause: its span, the separator before it, its tokens."""

    __slots__ = ("start", "end", "sep", "toks", "has_eye")

    def __init__(self, start: int, sep: int | None) -> None:
        self.start = start
        self.end = start
        self.sep = sep
        self.toks: list[tuple] = []
        self.has_eye = False


_FINDINGS = frozenset({MENTION, MEASURE, LESION, WEAK})
_LIST_ITEMS = frozenset({MENTION, NONFIND, LESION, WEAK})
# tokens that may follow the last item of a list without starting a new statement
_LIST_TAIL = frozenset({EYE, AFFIRM, CONNECT, ANATOMY, NONFIND, CUE})
_DOT = "."
_CDR_TRIGGER = re.compile(r"c[ \t]*[/:]|cdr|cup|杯")  # cheap test before the C/D value pattern


class LabelExtractor:
    """Reads reports against one ontology; compile once, then call `extract` per report."""

    def __init__(self, ontology: Ontology) -> None:
        self.ontology = ontology
        self.scanner = Scanner(ontology)
        sc = self.scanner
        self._en, self._zh, self._cdr = sc.en_regex, sc.zh_regex, sc.cdr_regex
        self._table = self._lookup_table(sc)
        self._ids = ontology.label_ids
        self._normal = sc.normal
        self._glaucoma = sc.glaucoma
        self._site_findings = sc.site_findings
        self._explained_by = sc.explained_by

    @staticmethod
    def _lookup_table(sc: Scanner) -> dict[str, tuple]:
        """Matched text -> ((kind, a, b), check, length of the unsuffixed term).

        Holds each term compact ("nonproliferative"), as written ("non proliferative") and with plural
        endings, so the common case is one dictionary hit without rewriting the matched text. `check`
        is None, the case-sensitive forms of a short abbreviation, or _DOT for a full stop.
        """
        table: dict[str, tuple] = {}
        for source in (sc.table, sc.forms):
            for key, e in source.items():
                table[key] = ((e.kind, e.a, e.b), e.case_forms, len(key))
        for key, value in list(table.items()):
            if key.isascii():
                table.setdefault(key + "s", value)
                table.setdefault(key + "es", value)
        for ch in ";!\n\r,:?。、.":
            kind = PUNCTUATION_KINDS.get(ch, BOUNDARY)
            table[ch] = ((kind, None, None), _DOT if ch == "." else None, 1)
        return table

    # ---- tokenising -------------------------------------------------------------------------------
    def _tokens(self, text: str, low: str) -> list[tuple]:
        """(start, end, kind, a, b) for every recognised term and punctuation mark, left to right."""
        table = self._table
        get = table.get
        toks: list[tuple] = []
        append = toks.append
        for m in self._en.finditer(low):
            word = m.group()
            entry = get(word)
            if entry is None:  # hyphens or several spaces inside the term
                entry = get(word.translate(_DELETE_SEPARATORS))
                if entry is None:  # pragma: no cover - the regex only matches table keys
                    continue
            s = m.start()
            check = entry[1]
            if check is not None:
                if check is _DOT:
                    if low[s + 1 : s + 2].isdigit():  # "0.7", not a full stop
                        continue
                elif text[s : s + entry[2]] not in check:
                    continue
            append((s, s + len(word)) + entry[0])
        extra = False
        if not low.isascii():
            for m in self._zh.finditer(low):
                entry = get(m.group()) or get(m.group().translate(_DELETE_SEPARATORS))
                if entry is not None:
                    append((m.start(), m.end()) + entry[0])
                    extra = True
        if _CDR_TRIGGER.search(low) is not None:
            for m in self._cdr.finditer(low):
                value = float(m.group("cdrv"))
                if self._glaucoma is None or value < 0.6:
                    append((m.start(), m.end(), NONFIND, None, None))
                else:
                    state = POSITIVE if value >= 0.7 else UNCERTAIN
                    append((m.start(), m.end(), MEASURE, self._glaucoma, state))
                extra = True
        if not extra:
            return toks  # one pass: already in order, no overlaps
        # Passes may overlap (a colon inside "C/D: 0.8", a Chinese term holding Latin letters):
        # the leftmost, then longest, token wins.
        toks.sort()
        kept: list[tuple] = []
        last_start = last_end = -1
        for tok in toks:
            if tok[0] >= last_end:
                kept.append(tok)
                last_start, last_end = tok[0], tok[1]
            elif tok[0] == last_start and tok[1] > last_end:  # same start, longer: it wins
                kept[-1] = tok
                last_end = tok[1]
        return kept

    # ---- reading ----------------------------------------------------------------------------------
    @staticmethod
    def _clauses(toks: list[tuple], n: int) -> list[list[_Seg]]:
        clauses: list[list[_Seg]] = []
        seg = _Seg(0, None)
        segs = [seg]
        last = len(toks) - 1
        for i, tok in enumerate(toks):
            kind = tok[2]
            if kind == BOUNDARY:
                seg.end = tok[0]
                clauses.append(segs)
                seg = _Seg(tok[1], None)
                segs = [seg]
            elif kind == COMMA or kind == COLON:
                seg.end = tok[0]
                seg = _Seg(tok[1], kind)
                segs.append(seg)
            elif kind == QUESTION:
                nxt = toks[i + 1] if i < last else None
                prev = toks[i - 1] if i else None
                closes = prev is not None and prev[2] in _FINDINGS and tok[0] - prev[1] <= 1  # "glaucoma?"
                # "?glaucoma", "? early AMD": the next token is the finding, a word or two away
                if not closes and nxt is not None and nxt[2] in _FINDINGS and nxt[0] - tok[1] <= 12:
                    seg.toks.append((tok[0], tok[1], CUE, lx.HEDGE, lx.PRE))  # "?glaucoma"
                else:
                    seg.toks.append((tok[0], tok[1], CUE, lx.HEDGE, lx.POST))  # "glaucoma?"
                    seg.end = tok[1]
                    clauses.append(segs)
                    seg = _Seg(tok[1], None)
                    segs = [seg]
            else:
                seg.toks.append(tok)
                if kind == EYE:
                    seg.has_eye = True
        seg.end = n
        clauses.append(segs)
        return clauses

    @staticmethod
    def _mention_follows(toks: list[tuple], k: int) -> bool:
        for tok in toks[k + 1 :]:
            kind = tok[2]
            if kind in _FINDINGS:
                return True
            if kind == CUE or kind == AFFIRM:
                return False
        return False

    @staticmethod
    def _continues_list(seg: _Seg, low: str) -> tuple[bool, bool]:
        """Does this comma segment carry on the previous one's list ("..., exudates or macular oedema")?

        Returns (forward, backward): whether a cue *before* the list still governs this segment, and
        whether a cue *after* the list ("..., exudates and drusen are absent") reaches back over it.
        """
        first = None
        last_item = -1
        cue_after = has_affirm = has_connector = False
        toks = seg.toks
        for i, tok in enumerate(toks):
            kind = tok[2]
            if kind == CONNECT:
                has_connector = True
            elif first is None:
                if kind == CUE or kind == AFFIRM:
                    return False, False
                first = tok
            elif kind == CUE:
                cue_after = True
            elif kind == AFFIRM:
                has_affirm = True
            if kind in _LIST_ITEMS:
                last_item = i
        if first is None or first[2] not in _LIST_ITEMS:
            return False, False
        if first[0] > seg.start and not _FILLER.fullmatch(low, seg.start, first[0]):
            return False, False
        # A cue after the items reaches back over the commas only when the segment closes a list
        # ("..., exudates and drusen absent"), not in "糖网，黄斑水肿待排".
        backward = not cue_after or has_connector
        if cue_after or (has_affirm and not has_connector):
            return False, backward
        # "无黄斑水肿，cataract 轻度": words after the last item start a new statement
        pos = toks[last_item][1]
        for tok in toks[last_item + 1 :]:
            if tok[2] not in _LIST_TAIL or not _TAIL_FILLER.fullmatch(low, pos, tok[0]):
                return False, backward
            pos = tok[1]
        return _TAIL_FILLER.fullmatch(low, pos, max(pos, seg.end)) is not None, backward

    @staticmethod
    def _eye_aside(seg: _Seg, low: str) -> bool:
        """A segment that only names an eye ("left eye", "in either eye", "（右眼）")."""
        pos = seg.start
        has_eye = False
        for tok in seg.toks:
            kind = tok[2]
            if kind == EYE:
                has_eye = True
            elif kind != CONNECT:
                return False
            if not _TAIL_FILLER.fullmatch(low, pos, tok[0]):
                return False
            pos = tok[1]
        return has_eye and _TAIL_FILLER.fullmatch(low, pos, max(pos, seg.end)) is not None

    @staticmethod
    def _normal_alone(seg: _Seg, tok: tuple, low: str) -> bool:
        """'normal' is a finding only when nothing else in its segment says *what* is normal."""
        pos = seg.start
        for other in seg.toks:
            if other is tok or other[2] == EYE:
                if not _NORMAL_CONTEXT.fullmatch(low, pos, other[0]):
                    return False
                pos = other[1]
            elif other[2] != CONNECT:
                return False
        return _NORMAL_CONTEXT.fullmatch(low, pos, max(pos, seg.end)) is not None

    def _read(self, text: str, low: str) -> list[list]:
        """[label index, state, eye, weak, eye stated locally] for every finding.

        State 0 marks a finding under a history or plan cue (not a finding of this photograph).
        """
        toks = self._tokens(text, low)
        if not toks:
            return []
        found: list[list] = []
        section_eye: str | None = None
        normal = self._normal
        site_findings = self._site_findings
        for clause in self._clauses(toks, len(low)):
            plan = False
            active = 0  # state imposed by the governing PRE cue (0 = none, -1 = not a finding)
            active_neg = False
            site = None  # the last anatomical site named in this clause
            open_m: list[list] = []
            clause_recs: list[list] = []
            last_end = -1  # end of the last finding, for adjacent history cues ("RD repair")
            since = 0  # clause_recs[since:] are the findings since the last "..., left eye," aside
            n_segs = len(clause)
            for si, seg in enumerate(clause):
                stoks = seg.toks
                # "..., left eye." / "no sign, in either eye, of DR": an eye aside between commas (not a
                # heading followed by a colon) says which eye the findings before it are in, and
                # leaves any cue scope running.
                if (
                    si
                    and stoks
                    and (si == n_segs - 1 or clause[si + 1].sep != COLON)
                    and self._eye_aside(seg, low)
                ):
                    aside = {t[3] for t in stoks if t[2] == EYE}
                    aside_eye = aside.pop() if len(aside) == 1 else "OU"
                    for rec in clause_recs[since:]:
                        if not rec[4]:
                            rec[2] = aside_eye
                    since = len(clause_recs)
                    continue
                if si and (active or open_m):
                    forward, backward = self._continues_list(seg, low) if stoks else (False, False)
                    if not forward:
                        active = 0
                    if not backward and seg.sep != COLON:
                        open_m = []
                if not stoks:
                    continue
                # eyes: a marker before any finding/cue opens a section; a later one is local
                eye = section_eye
                local_eye = False
                if seg.has_eye:
                    local = None
                    seen_content = False
                    for tok in stoks:
                        kind = tok[2]
                        if kind == EYE:
                            if seen_content:
                                local = tok[3] if local is None or local == tok[3] else "OU"
                            else:
                                section_eye = eye = tok[3]
                        elif kind != CONNECT:
                            seen_content = True
                    if local is not None:
                        eye = local
                        local_eye = True
                first_rel = True
                for k, tok in enumerate(stoks):
                    kind = tok[2]
                    label = -1
                    if kind == MENTION or kind == MEASURE or kind == WEAK:
                        label, base = tok[3], tok[4]
                    elif kind == LESION:
                        label = site_findings.get((site, tok[3]), -1)
                        base = POSITIVE
                    elif kind == NORMAL_WORD and normal is not None and self._normal_alone(seg, tok, low):
                        label, base = normal, POSITIVE
                    elif kind == ANATOMY:
                        site = tok[3]
                    elif kind == CUE:
                        ctype, direction = tok[3], tok[4]
                        if direction != lx.POST:
                            follows = self._mention_follows(stoks, k)
                            if direction == lx.BOTH:
                                direction = lx.PRE if follows else lx.POST
                            elif not follows and first_rel and seg.sep == COLON:
                                direction = lx.POST  # "DR: no", "Glaucoma: possible"
                        state = _CUE_STATE[ctype]
                        if direction == lx.PRE:
                            if ctype == lx.PLAN:
                                plan = True
                            else:
                                active = state or -1
                                active_neg = ctype == lx.NEG
                            open_m = []
                        elif ctype == lx.HIST:
                            # "cataract surgery", "视网膜脱离术后": only the finding right before it
                            if open_m and tok[0] - last_end <= 3:
                                open_m[-1][1] = 0
                            open_m = []
                        else:
                            for rec in open_m:
                                rec[1] = state
                            open_m = []
                    elif kind == AFFIRM:
                        open_m = []
                        if active and not active_neg:
                            active = 0  # "probable BRVO with macular oedema": the oedema is seen
                    if label >= 0:
                        rec = [label, 0 if plan else (active or base), eye, kind == WEAK, local_eye]
                        found.append(rec)
                        clause_recs.append(rec)
                        last_end = tok[1]
                        if not plan and not active:
                            open_m.append(rec)
                    if kind != CONNECT:
                        first_rel = False
        return found

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
        weak: list[tuple[int, int]] = []
        for label, state, where, is_weak, _local in self._read(orig, low):
            if state <= 0:
                continue
            if want is not None and where is not None and where != "OU" and where != want:
                continue
            if is_weak:
                weak.append((label, state))
            elif state > best.get(label, 0):
                best[label] = state
        if weak:
            # shared lesions ("haemorrhages") count only if nothing else found explains them
            explained_by = self._explained_by
            for label, state in weak:
                others = explained_by.get(label, ())
                if state >= UNCERTAIN and any(best.get(o, 0) >= UNCERTAIN for o in others):
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
        pos: list[str] = []
        unc: list[str] = []
        neg: list[str] = []
        for i in sorted(best):
            state = best[i]
            (pos if state == POSITIVE else unc if state == UNCERTAIN else neg).append(ids[i])
        return ReportLabels(tuple(pos), tuple(unc), tuple(neg))

    def mentions(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, label_id) of every finding term in the normalised text; for tests and tooling."""
        orig, low = _normalise(text)
        return [
            (t[0], t[1], self._ids[t[3]]) for t in self._tokens(orig, low) if t[2] == MENTION or t[2] == WEAK
        ]


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
