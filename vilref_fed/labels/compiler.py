"""Compile an ontology plus the cue lexicon into one scanner: a single regex pass finds every term.

Every term (synonyms in all spellings, cues, eye markers, punctuation) is found by a few regex passes
built as character tries; a dictionary keyed by the matched text says what the match means. Compiling once
per ontology is what makes extraction fast (bench/labels.py).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from vilref_fed.labels import lexicon as lx
from vilref_fed.labels.trie import SEP, trie_pattern
from vilref_fed.ontology import Ontology, OntologyError, normalise_term

# Token kinds
MENTION = 0  # a finding of a label
NONFIND = 1  # consumed phrase with no label ("flame haemorrhages")
CUE = 2
EYE = 3
AFFIRM = 4
CONNECT = 5
BOUNDARY = 6  # clause break (". ; 。 ! newline", "but", "但")
COMMA = 7
COLON = 8
QUESTION = 9
NORMAL_WORD = 10
MEASURE = 11  # a cup-to-disc ratio value: a finding, but never an item of a comma list
ANATOMY = 12  # a site ("macula", "视盘") that gives meaning to a later lesion word
LESION = 13  # a lesion word ("oedema", "水肿") that names a label only after a site
WEAK = 14  # a finding shared with other diseases (see Label.explained_by)

# Label states, ordered so that max() implements "positive wins"
NEGATED = 1
UNCERTAIN = 2
POSITIVE = 3

_DELETE_SEPARATORS = str.maketrans("", "", " \t-")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")

# Cup-to-disc ratio with a value. Starts with plain literals so `re` can skip to candidate positions.
CDR_RE = (
    r"(?:c[ \t]*/[ \t]*d|c[ \t]*:[ \t]*d|cdr|cup[ \t\-]*(?:to|/|:)?[ \t\-]*disc|杯盘比|杯/盘)"
    r"(?:[ \t]*ratios?)?(?:[ \t]*(?:\(?(?:od|os|ou|右眼|左眼|双眼)\)?))?"
    r"(?:[ \t]*(?:of|is|was|=|:|~|≈|约|为|approximately|approx\.?|about|around|estimated at))*"
    r"[ \t]*(?P<cdrv>0?\.\d{1,2}|1\.0|0|1)(?!\d|\.\d)"
)


PUNCTUATION = r"[;!\n\r,:?。、.]"
PUNCTUATION_KINDS = {",": COMMA, ":": COLON, "?": QUESTION, "、": CONNECT}  # the others end a clause


@dataclass(frozen=True)
class Entry:
    """What a matched term means: a kind plus its payload (label index and base state, cue type ...)."""

    kind: int
    a: object = None
    b: object = None
    case_forms: frozenset[str] | None = None  # set for case-sensitive abbreviations


def _sep(term: str) -> str:
    """The trie form of a term: normalised, with SEP wherever a space or hyphen may be."""
    return normalise_term(term).replace(" ", SEP)


def key_of(text: str) -> str:
    return text.translate(_DELETE_SEPARATORS)


def spelling_variants(term: str, spelling: tuple[tuple[str, tuple[str, ...]], ...]) -> list[str]:
    """All spellings of a normalised term: every listed variant of every canonical piece inside it."""
    slots = [(canon, (canon, *variants)) for canon, variants in spelling if canon in term]
    if not slots:
        return [term]
    pattern = re.compile("|".join(re.escape(c) for c, _ in sorted(slots, key=lambda s: -len(s[0]))))
    parts = pattern.split(term)
    found = pattern.findall(term)
    choices = [dict(slots)[f] for f in found]
    out = []
    for combo in itertools.product(*choices):
        pieces = [parts[0]]
        for rep, tail in zip(combo, parts[1:], strict=True):
            pieces.append(rep)
            pieces.append(tail)
        out.append("".join(pieces))
    return out


class Scanner:
    """The compiled master regex plus the term table for one ontology."""

    def __init__(self, ontology: Ontology) -> None:
        self.ontology = ontology
        self.table: dict[str, Entry] = {}  # key: the term with spaces/hyphens removed
        self.forms: dict[str, Entry] = {}  # the same terms as written (single spaces)
        self._origin: dict[str, str] = {}
        en_terms: list[str] = []
        zh_terms: list[str] = []

        def add(term: str, entry: Entry, origin: str, expand: bool = True) -> None:
            norm = normalise_term(term)
            forms = spelling_variants(norm, ontology.spelling) if expand else [norm]
            for form in forms:
                key = key_of(form)
                old = self.table.get(key)
                if old is not None and old != entry:
                    raise OntologyError(
                        f"{origin} ({term!r}) collides with {self._origin[key]}: the same words cannot mean "
                        "two different things; remove or rephrase one of them"
                    )
                if old is None:
                    self.table[key] = entry
                    self._origin[key] = origin
                if form not in self.forms:  # "epi retinal" and "epiretinal" share a key, not a pattern
                    self.forms[form] = entry
                    (zh_terms if _CJK.search(form) else en_terms).append(form.replace(" ", SEP))

        # Cues first, so that a synonym colliding with a cue word is reported against the synonym.
        for words, ctype in (
            (lx.NEGATION, lx.NEG),
            (lx.HEDGES, lx.HEDGE),
            (lx.HISTORY, lx.HIST),
            (lx.PLANS, lx.PLAN),
        ):
            for word, direction in words.items():
                add(word, Entry(CUE, ctype, direction), f"cue {word!r}", expand=False)
        for word in lx.BOUNDARY_WORDS:
            add(word, Entry(BOUNDARY), f"clause word {word!r}", expand=False)
        for word in lx.AFFIRMATIONS:
            add(word, Entry(AFFIRM), f"affirmation {word!r}", expand=False)
        for word in lx.CONNECTORS:
            add(word, Entry(CONNECT), f"connector {word!r}", expand=False)
        for word, eye in lx.EYES.items():
            add(word, Entry(EYE, eye), f"eye marker {word!r}", expand=False)
        for word, eye in lx.EYES_CASE_SENSITIVE.items():
            add(word, Entry(EYE, eye, case_forms=frozenset({word})), f"eye marker {word!r}", expand=False)
        for word in lx.NORMAL_WORDS:
            add(word, Entry(NORMAL_WORD), f"normal word {word!r}", expand=False)
        for term in ontology.non_findings_en + ontology.non_findings_zh:
            add(term, Entry(NONFIND), f"non-finding {term!r}")
        for site, words in ontology.anatomy:
            for word in words:
                add(word, Entry(ANATOMY, site), f"anatomy word {word!r}")
        # (site, lesion) -> label index; the lesion token carries its canonical form
        self.site_findings: dict[tuple[str, str], int] = {}
        for site, label_id, terms in ontology.site_findings:
            for term in terms:
                canon = normalise_term(term)
                add(term, Entry(LESION, canon), f"lesion word {term!r}")
                self.site_findings[(site, canon)] = ontology.index(label_id)
        for i, lab in enumerate(ontology.labels):
            for term in lab.synonyms_en + lab.synonyms_zh:
                add(term, Entry(MENTION, i, POSITIVE), f"synonym of {lab.id!r}")
            for term in lab.uncertain_synonyms_en + lab.uncertain_synonyms_zh:
                add(term, Entry(MENTION, i, UNCERTAIN), f"uncertain synonym of {lab.id!r}")
            for term in lab.weak_synonyms_en + lab.weak_synonyms_zh:
                add(term, Entry(WEAK, i, POSITIVE), f"weak synonym of {lab.id!r}")
            for abbr in lab.abbreviations:
                letters = key_of(abbr)
                case = frozenset({letters}) if len(letters) <= 2 else None
                add(
                    abbr,
                    Entry(MENTION, i, POSITIVE, case),
                    f"abbreviation {abbr!r} of {lab.id!r}",
                    expand=False,
                )

        # Three passes, not one: a single alternation of everything would defeat `re`'s skipping of
        # impossible start positions and costs several times more. Punctuation rides with the English
        # pass (one cheap extra branch), the Chinese pass runs only on non-ASCII text and the C/D
        # pattern only when the text mentions a cup-to-disc ratio.
        self.en_regex = re.compile(
            rf"(?<![a-z0-9])(?:{trie_pattern(en_terms)})(?:e?s)?(?![a-z0-9])|{PUNCTUATION}"
        )
        self.zh_regex = re.compile(trie_pattern(zh_terms))
        self.cdr_regex = re.compile(CDR_RE)
        self.explained_by = {
            i: tuple(ontology.index(other) for other in lab.explained_by)
            for i, lab in enumerate(ontology.labels)
            if lab.explained_by
        }
        self.glaucoma = ontology.index("glaucoma") if "glaucoma" in ontology.label_ids else None
        self.normal = ontology.index("normal") if "normal" in ontology.label_ids else None
