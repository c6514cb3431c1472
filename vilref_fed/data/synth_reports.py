"""Writing synthetic diagnostic reports in English or Chinese from the consortium ontology.

Reports are where ViLReF's labels come from, so synthetic reports must exercise the label extractor the
way real ones do: findings named by any synonym or abbreviation, described by their look (the
ontology's expert descriptors), denied in lists ("no haemorrhages, exudates or macular oedema"),
hedged ("suspected glaucoma", "疑似青光眼"), split into per-eye sections, surrounded by history and
recommendations that mention diseases the eye does not have. The generator also returns what the
report states, per eye, so the extractor can be scored against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vilref_fed.data.synth_profiles import SiteProfile

EYE_HEADINGS_EN = {
    "OD": ("Right eye (OD):", "OD:", "RE:", "Right eye:"),
    "OS": ("Left eye (OS):", "OS:", "LE:", "Left eye:"),
}
EYE_HEADINGS_ZH = {"OD": ("右眼：", "右眼(OD)："), "OS": ("左眼：", "左眼(OS)：")}
EYE_WORDS_EN = {"OD": "right eye", "OS": "left eye"}
EYE_WORDS_ZH = {"OD": "右眼", "OS": "左眼"}

_NEGATION_OR_HEDGE = re.compile(
    r"\b(no|not|without|absent|absence|negative|normal|suspect\w*|possible|probable|rule out|exclude\w*)\b"
    r"|无|未|没有|不|疑|待排|可能|正常",
    re.IGNORECASE,
)


@dataclass
class EyeStatement:
    """What one eye's part of a report states (label ids)."""

    positive: list[str] = field(default_factory=list)
    uncertain: list[str] = field(default_factory=list)
    negated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"positive": self.positive, "uncertain": self.uncertain, "negated": self.negated}


@dataclass
class SynthReport:
    text: str
    eye: str  # "OD" | "OS" for a one-eye report, "" when the report covers both eyes
    statements: dict[str, EyeStatement]


class _Lexicon:
    """Per-language phrase choices drawn from the ontology (names, synonyms, abbreviations, descriptors)."""

    def __init__(self, ontology: Any, lang: str) -> None:
        self.lang = lang
        self.terms: dict[str, list[str]] = {}
        self.descriptors: dict[str, list[str]] = {}
        all_terms: dict[str, list[str]] = {}
        norm = _normaliser(ontology)
        for lab in ontology.labels:
            if lang == "zh":
                names = [lab.name_zh, *lab.synonyms_zh]
            else:
                names = [lab.name_en, *lab.synonyms_en]
            abbrevs = [a for a in lab.abbreviations if a]
            self.terms[lab.id] = [t for t in names if t] or [lab.name_en]
            self.terms[lab.id + "#abbr"] = abbrevs
            # Every phrase the extractor reads as this label, including shared ("weak") lesions and
            # phrases that mean "suspected": a descriptor naming any of them would add a label.
            extra = [
                *getattr(lab, "weak_synonyms_en", ()),
                *getattr(lab, "weak_synonyms_zh", ()),
                *getattr(lab, "uncertain_synonyms_en", ()),
                *getattr(lab, "uncertain_synonyms_zh", ()),
            ]
            all_terms[lab.id] = [
                t
                for t in [lab.name_en, lab.name_zh, *lab.synonyms_en, *lab.synonyms_zh, *abbrevs, *extra]
                if t
            ]
        normalised = {label: [norm(t) for t in ts] for label, ts in all_terms.items()}
        for lab in ontology.labels:
            descs = lab.descriptors_zh if lang == "zh" else lab.descriptors_en
            others = [t for other, ts in normalised.items() if other != lab.id for t in ts]
            self.descriptors[lab.id] = [d for d in descs if _safe_descriptor(d, others, norm)]

    def term(self, rng: np.random.Generator, label: str) -> str:
        abbrevs = self.terms.get(label + "#abbr", [])
        if abbrevs and rng.random() < (0.12 if self.lang == "en" else 0.06):
            return str(rng.choice(abbrevs))
        names = self.terms[label]
        # The canonical name most often, synonyms for variety.
        if len(names) == 1 or rng.random() < 0.45:
            return names[0]
        return str(rng.choice(names[1:]))

    def descriptor(self, rng: np.random.Generator, label: str) -> str | None:
        ds = self.descriptors.get(label) or []
        return str(rng.choice(ds)) if ds else None


def _normaliser(ontology: Any):
    """The ontology's own normalisation (case, width, separators) plus its spelling variants
    (British/American, common typos), so a descriptor is checked the way the extractor will read it."""
    try:
        from vilref_fed.ontology.loader import normalise_term
    except ImportError:  # pragma: no cover - older ontology package
        normalise_term = str.lower
    canon_of = {v: canon for canon, variants in getattr(ontology, "spelling", ()) for v in variants}
    word = re.compile(r"[a-z]+")

    def respell(m: re.Match) -> str:
        w = m.group(0)
        if w in canon_of:
            return canon_of[w]
        if w.endswith("s") and w[:-1] in canon_of:  # plural of a variant: "haemorrhages"
            return canon_of[w[:-1]] + "s"
        return w

    def norm(text: str) -> str:
        return word.sub(respell, normalise_term(text))

    return norm


def _safe_descriptor(desc: str, other_terms: list[str], norm) -> bool:
    """A descriptor may be used as a finding only if it names no other label (other_terms, normalised
    with `norm`) and holds no negation or hedge cue."""
    if not desc or _NEGATION_OR_HEDGE.search(desc):
        return False
    low = norm(desc)
    for tl in other_terms:  # already normalised
        if len(tl) < 2:
            continue
        if tl.isascii():
            if re.search(r"(?<![a-z0-9])" + re.escape(tl) + r"(?![a-z0-9])", low):
                return False
        elif tl in low:
            return False
    return True


_LEXICONS: dict[tuple[int, str], tuple[Any, _Lexicon]] = {}


def _lexicon(ontology: Any, lang: str) -> _Lexicon:
    """Compiled once per (ontology object, language); the ontology is kept alive with its lexicon."""
    key = (id(ontology), lang)
    hit = _LEXICONS.get(key)
    if hit is None or hit[0] is not ontology:
        hit = (ontology, _Lexicon(ontology, lang))
        _LEXICONS[key] = hit
    return hit[1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s and s[0].islower() else s


def _join_en(items: list[str], conj: str = "or") -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


# --------------------------------------------------------------------------------------------- English


def _positive_en(rng, lex: _Lexicon, label: str, hedge: bool) -> str:
    t = lex.term(rng, label)
    if hedge:
        form = int(rng.integers(0, 5))
        return [
            f"Suspected {t}.",
            f"Possible {t}.",
            f"Cannot exclude {t}.",
            f"Findings suspicious for {t}.",
            f"{_cap(t)}?",
        ][form]
    d = lex.descriptor(rng, label) if label != "normal" else None
    if d and rng.random() < 0.45:
        # Name first most of the time ("Glaucoma: an enlarged cup ..."), so short-context text
        # towers still read the finding's name; description first otherwise.
        form = int(rng.integers(0, 3))
        return [f"{_cap(t)}: {d}.", f"{_cap(t)}, with {d}.", f"{_cap(d)}, consistent with {t}."][form]
    form = int(rng.integers(0, 4))
    return [f"{_cap(t)}.", f"There is {t}.", f"{_cap(t)} is present.", f"Findings of {t}."][form]


def _negated_en(rng, lex: _Lexicon, labels: list[str]) -> str:
    ts = [lex.term(rng, label) for label in labels]
    if len(ts) == 1 and rng.random() < 0.4:
        return rng.choice([f"{_cap(ts[0])} is not seen.", f"Negative for {ts[0]}.", f"No {ts[0]}."])
    return rng.choice([f"No {_join_en(ts)}.", f"No evidence of {_join_en(ts)}.", f"Without {_join_en(ts)}."])


def _eye_sentences_en(rng, lex, profile: SiteProfile, labels: frozenset[str], st: EyeStatement, deny):
    out = []
    for label in sorted(labels, key=lambda x: rng.random()):
        if label == "normal":
            out.append(f"{_cap(lex.term(rng, 'normal'))}.")
            st.positive.append("normal")
            continue
        hedge = rng.random() < profile.hedge_p
        out.append(_positive_en(rng, lex, label, hedge))
        (st.uncertain if hedge else st.positive).append(label)
    if deny:
        out.append(_negated_en(rng, lex, deny))
        st.negated.extend(deny)
    return out


# --------------------------------------------------------------------------------------------- Chinese


def _positive_zh(rng, lex: _Lexicon, label: str, hedge: bool) -> str:
    t = lex.term(rng, label)
    if hedge:
        form = int(rng.integers(0, 5))
        return [f"疑似{t}。", f"可疑{t}。", f"考虑{t}可能。", f"{t}待排。", f"不除外{t}。"][form]
    d = lex.descriptor(rng, label) if label != "normal" else None
    if d and rng.random() < 0.45:
        form = int(rng.integers(0, 3))
        return [f"{t}：{d}。", f"{t}，{d}。", f"{d}，符合{t}表现。"][form]
    form = int(rng.integers(0, 4))
    return [f"{t}。", f"可见{t}。", f"提示{t}。", f"见{t}改变。"][form]


def _negated_zh(rng, lex: _Lexicon, labels: list[str]) -> str:
    ts = [lex.term(rng, label) for label in labels]
    if len(ts) == 1:
        return rng.choice([f"未见{ts[0]}。", f"无{ts[0]}。", f"未见明显{ts[0]}。"])
    listed = "、".join(ts[:-1]) + "及" + ts[-1]
    return rng.choice([f"未见{listed}。", f"未见明显{listed}。", f"无{listed}。"])


def _eye_sentences_zh(rng, lex, profile: SiteProfile, labels: frozenset[str], st: EyeStatement, deny):
    out = []
    for label in sorted(labels, key=lambda x: rng.random()):
        if label == "normal":
            out.append(f"{lex.term(rng, 'normal')}。")
            st.positive.append("normal")
            continue
        hedge = rng.random() < profile.hedge_p
        out.append(_positive_zh(rng, lex, label, hedge))
        (st.uncertain if hedge else st.positive).append(label)
    if deny:
        out.append(_negated_zh(rng, lex, deny))
        st.negated.extend(deny)
    return out


# ---------------------------------------------------------------------------------------------- report


def _denials(rng, profile: SiteProfile, labels: frozenset[str], label_ids: tuple[str, ...]) -> list[str]:
    """Which absent findings a reader would explicitly deny: mostly the ones this clinic looks for."""
    if rng.random() >= profile.negation_p:
        return []
    common = sorted(profile.priors, key=lambda k: -profile.priors[k])[:5]
    pool = [x for x in common if x not in labels]
    pool += [
        x for x in label_ids if x not in labels and x != "normal" and x not in pool and rng.random() < 0.15
    ]
    if not pool:
        return []
    k = min(int(rng.integers(1, 4)), len(pool))
    return [str(x) for x in rng.choice(pool, size=k, replace=False)]


def make_report(
    rng: np.random.Generator,
    ontology: Any,
    profile: SiteProfile,
    eyes: dict[str, frozenset[str]],
    age: int,
    sex: str,
    diabetic: bool,
    hypertensive: bool,
) -> SynthReport:
    """One visit's report. `eyes` maps "OD"/"OS" to the eye's true labels (one or both eyes imaged).

    A one-eye report names its eye in the examination line and may or may not use a section
    heading; a both-eye report always has per-eye sections (so each image's labels are recoverable).
    Findings come first: short-context text towers (the `tiny` model reads 32 tokens) see them.
    """
    lang = profile.language
    lex = _lexicon(ontology, lang)
    label_ids = tuple(lab.id for lab in ontology.labels)
    statements = {eye: EyeStatement() for eye in eyes}
    both = len(eyes) == 2
    parts: list[str] = []
    absent_for_all = [x for x in label_ids if x != "normal" and all(x not in v for v in eyes.values())]
    if lang == "zh":
        for eye, labels in eyes.items():
            body = "".join(
                _eye_sentences_zh(
                    rng, lex, profile, labels, statements[eye], _denials(rng, profile, labels, label_ids)
                )
            )
            if both or rng.random() < 0.5:
                parts.append(f"{rng.choice(EYE_HEADINGS_ZH[eye])}{body}")
            else:
                parts.append(body)
        exam = "双眼" if both else EYE_WORDS_ZH[next(iter(eyes))]
        parts.append(f"检查：{exam}彩色眼底照相。")
        hist = [f"患者{'男' if sex == 'M' else '女'}，{age}岁。"]
        if diabetic:
            hist.append(f"糖尿病史{int(rng.integers(1, 25))}年。")
        if hypertensive:
            hist.append("高血压病史。")
        if rng.random() < 0.12:
            hist.append("白内障术后。")
        if rng.random() < 0.08 and "glaucoma" in absent_for_all:
            hist.append(f"有{lex.term(rng, 'glaucoma')}家族史。")
        parts.append("病史：" + "".join(hist))
        recs = []
        if any(v != frozenset({"normal"}) for v in eyes.values()):
            recs.append(str(rng.choice(["建议眼科门诊随诊。", "建议转诊眼底病专科。", "建议进一步检查。"])))
        else:
            recs.append(str(rng.choice(["定期复查。", "一年后复查眼底。"])))
        if absent_for_all and rng.random() < 0.25:
            target = str(rng.choice(absent_for_all))
            recs.append(f"建议行OCT检查以排除{lex.term(rng, target)}。")
        parts.append("建议：" + "".join(recs))
        text = "\n".join(parts)
    else:
        for eye, labels in eyes.items():
            body = " ".join(
                _eye_sentences_en(
                    rng, lex, profile, labels, statements[eye], _denials(rng, profile, labels, label_ids)
                )
            )
            if both or rng.random() < 0.5:
                parts.append(f"{rng.choice(EYE_HEADINGS_EN[eye])} {body}")
            else:
                parts.append(body)
        exam = "both eyes" if both else EYE_WORDS_EN[next(iter(eyes))]
        parts.append(f"Examination: colour fundus photography, {exam}.")
        hist = [f"{age}-year-old {'man' if sex == 'M' else 'woman'}"]
        if diabetic:
            hist.append(f"type 2 diabetes for {int(rng.integers(1, 25))} years")
        if hypertensive:
            hist.append("hypertension")
        history = "History: " + ", ".join(hist) + "."
        if rng.random() < 0.12:
            history += " History of cataract surgery."
        if rng.random() < 0.08 and "glaucoma" in absent_for_all:
            history += f" Family history of {lex.term(rng, 'glaucoma')}."
        parts.append(history)
        recs = []
        if any(v != frozenset({"normal"}) for v in eyes.values()):
            recs.append(
                str(
                    rng.choice(
                        ["Refer to the retina clinic.", "Refer to ophthalmology.", "Follow-up in 3 months."]
                    )
                )
            )
        else:
            recs.append(str(rng.choice(["Routine screening in 12 months.", "Annual review."])))
        if absent_for_all and rng.random() < 0.25:
            target = str(rng.choice(absent_for_all))
            recs.append(f"Recommend OCT to rule out {lex.term(rng, target)}.")
        parts.append("Recommendation: " + " ".join(recs))
        text = "\n".join(parts)
    # A false hedge: the reader suspects something the eye does not have (real label noise).
    if rng.random() < profile.false_hedge_p:
        eye = next(iter(eyes))
        st = statements[eye]
        cands = [x for x in label_ids if x != "normal" and x not in eyes[eye] and x not in st.negated]
        if cands:
            x = str(rng.choice(cands))
            t = lex.term(rng, x)
            line = f"疑似{t}。" if lang == "zh" else f"Suspected {t}."
            first, _, rest = text.partition("\n")
            text = f"{first}{'' if lang == 'zh' else ' '}{line}\n{rest}" if rest else f"{first} {line}"
            st.uncertain.append(x)
            if "normal" in st.positive:  # "normal" holds only when nothing is positive or uncertain
                st.positive.remove("normal")
    return SynthReport(text=text, eye="" if both else next(iter(eyes)), statements=statements)
