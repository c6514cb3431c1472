"""Behaviour of the label extractor, one convention per test, plus two slow references:
a brute-force leftmost-longest matcher for the compiled trie regex, and sentence-by-sentence
extraction for a 20,000-character report."""

from __future__ import annotations

import logging
import re
import unicodedata

import pytest
from test_labels_gold import load_gold

from vilref_fed.labels import EMPTY, LabelExtractor, LabelPolicy, ReportLabels, get_extractor, normalise_eye
from vilref_fed.labels.compiler import MENTION, WEAK
from vilref_fed.ontology import load_ontology


@pytest.fixture(scope="module")
def x() -> LabelExtractor:
    return get_extractor()


def states(x: LabelExtractor, text: str, eye: str | None = None) -> tuple[set, set, set]:
    r = x.extract(text, eye)
    return set(r.positive), set(r.uncertain), set(r.negated)


# ---- matching ---------------------------------------------------------------------------------------


def test_longest_synonym_is_one_hit(x):
    assert [m[2] for m in x.mentions("non-proliferative diabetic retinopathy")] == ["diabetic_retinopathy"]
    hits = x.mentions("central retinal vein occlusion and branch retinal artery occlusion")
    assert [m[2] for m in hits] == ["retinal_vein_occlusion", "retinal_artery_occlusion"]
    assert hits[0][:2] == (0, len("central retinal vein occlusion"))


def test_normalisation_case_width_spelling_and_typos(x):
    for text in (
        "MACULAR OEDEMA",
        "macular edema",
        "ｍａｃｕｌａｒ　ｏｅｄｅｍａ",  # full width
        "Macular-oedema",
        "macular   edema",
        "maculer oedema",
    ):
        assert states(x, text)[0] == {"macular_edema"}, text
    assert states(x, "diabetic retinopahty")[0] == {"diabetic_retinopathy"}
    assert states(x, "glaucomma")[0] == {"glaucoma"}
    assert states(x, "haemorrhages and microaneurism")[0] == {"diabetic_retinopathy"}
    assert states(x, "ＣＲＶＯ")[0] == {"retinal_vein_occlusion"}


def test_two_letter_abbreviations_are_case_sensitive(x):
    assert states(x, "Mild DR.")[0] == {"diabetic_retinopathy"}
    assert states(x, "Dr. Lee graded the image.") == (set(), set(), set())
    assert states(x, "RD in the left eye")[0] == {"retinal_detachment"}


def test_words_inside_other_words_do_not_match(x):
    assert x.mentions("abnormalities of the notch") == []  # no "normal", "no", "notching"
    assert states(x, "The patient had ophthalmic review.") == (set(), set(), set())


# A slow, obviously correct matcher: every term of the table found with str.find, then leftmost-longest.
def _reference_mentions(x: LabelExtractor, text: str) -> list[tuple[int, int, str]]:
    orig = unicodedata.normalize("NFKC", text)
    low = orig.lower()
    cands = []
    for form, entry in x.scanner.forms.items():
        cjk = re.search(r"[\u4e00-\u9fff、]", form) is not None
        start = low.find(form)
        while start >= 0:
            end = start + len(form)
            ok = entry.case_forms is None or orig[start:end] in entry.case_forms
            if ok and not cjk:
                ok = not (start and low[start - 1].isascii() and low[start - 1].isalnum())
                if ok:
                    for suffix in ("es", "s", ""):
                        after = end + len(suffix)
                        if low.startswith(suffix, end) and not (
                            after < len(low) and low[after].isascii() and low[after].isalnum()
                        ):
                            end = after
                            break
                    else:
                        ok = False
            if ok:
                cands.append((start, end, entry))
            start = low.find(form, start + 1)
    cands.sort(key=lambda c: (c[0], -c[1]))
    out, last = [], -1
    for start, end, entry in cands:
        if start >= last:
            if entry.kind in (MENTION, WEAK):
                out.append((start, end, x.ontology.label_ids[entry.a]))
            last = end
    return out


def test_trie_regex_agrees_with_brute_force_matcher_on_gold_texts(x):
    checked = 0
    for text in sorted({g.text for g in load_gold()}):
        low = unicodedata.normalize("NFKC", text).lower()
        # the reference knows single-spaced forms only, and not the C/D value pattern
        if re.search(r"  |-|c/d|cdr|杯盘比", low):
            continue
        assert x.mentions(text) == _reference_mentions(x, text), text
        checked += 1
    assert checked >= 150


# ---- negation, hedges, history, plans ---------------------------------------------------------------


def test_one_negation_governs_a_list(x):
    assert states(x, "No haemorrhages, exudates or macular oedema.") == (
        set(),
        set(),
        {"diabetic_retinopathy", "macular_edema"},
    )
    assert states(x, "未见出血、渗出及黄斑水肿。")[2] == {"diabetic_retinopathy", "macular_edema"}
    assert states(x, "Exudates, haemorrhages and drusen absent.")[2] == {
        "diabetic_retinopathy",
        "age_related_macular_degeneration",
    }


def test_negation_stops_at_a_new_statement(x):
    assert states(x, "No haemorrhages, drusen present.") == (
        {"age_related_macular_degeneration"},
        set(),
        {"diabetic_retinopathy"},
    )
    assert states(x, "No DR but drusen.")[0] == {"age_related_macular_degeneration"}
    assert states(x, "未见明显出血，黄斑区可见玻璃膜疣。")[0] == {"age_related_macular_degeneration"}
    assert states(x, "Drusen; no haemorrhages.")[0] == {"age_related_macular_degeneration"}


def test_hedges_give_uncertain(x):
    for text in (
        "Suspected glaucoma.",
        "Glaucoma suspect.",
        "?glaucoma",
        "glaucoma?",
        "Glaucoma cannot be excluded.",
        "cannot rule out glaucoma",
        "青光眼待排。",
        "疑似青光眼",
        "不除外青光眼",
        "考虑青光眼",
        "Glaucoma: possible.",
    ):
        assert states(x, text) == (set(), {"glaucoma"}, set()), text


def test_structured_negative_values(x):
    assert states(x, "DR: none. Maculopathy: nil.")[2] == {"diabetic_retinopathy", "macular_edema"}
    assert states(x, "黄斑水肿（-）")[2] == {"macular_edema"}
    assert states(x, "Macula: no oedema.")[2] == {"macular_edema"}
    assert states(x, "黄斑区未见水肿。")[2] == {"macular_edema"}
    assert states(x, "Disc: pale.")[0] == {"optic_atrophy"}


def test_history_and_plans_are_not_findings(x):
    for text in (
        "History of retinal detachment.",
        "s/p macular hole surgery",
        "Retinal detachment repair 2019.",
        "Refer to glaucoma clinic.",
        "Recommend screening for diabetic retinopathy in 1 year.",
        "既往青光眼病史。",
        "右眼视网膜脱离术后。",
        "建议排除青光眼。",
        "Plan: rule out CRVO.",
    ):
        assert states(x, text) == (set(), set(), set()), text
    # a finding next to history stays a finding
    assert states(x, "Cystoid macular oedema following cataract surgery.")[0] == {"macular_edema"}


def test_cup_to_disc_ratio_thresholds(x):
    assert states(x, "C/D ratio 0.8")[0] == {"glaucoma"}
    assert states(x, "cup-to-disc ratio of 0.7")[0] == {"glaucoma"}
    assert states(x, "杯盘比约0.7")[0] == {"glaucoma"}
    assert states(x, "CDR 0.65")[1] == {"glaucoma"}
    assert states(x, "C/D 0.3") == (set(), set(), set())
    assert states(x, "Moderate NPDR, C/D 0.7.")[0] == {
        "diabetic_retinopathy",
        "glaucoma",
    }  # value ends a sentence
    assert states(x, "C/D 1.0; CDR 0.9")[0] == {"glaucoma"}


def test_positive_wins_over_negated_for_the_same_eye(x):
    assert states(x, "No drusen in the right eye. Drusen in the right eye.", "OD")[0] == {
        "age_related_macular_degeneration"
    }
    assert states(x, "Glaucoma. No glaucoma.")[0] == {"glaucoma"}


# ---- eyes -------------------------------------------------------------------------------------------


def test_eye_sections_and_local_eye_mentions(x):
    text = "Right eye: moderate NPDR. Left eye: drusen, no diabetic retinopathy."
    assert states(x, text, "OD")[0] == {"diabetic_retinopathy"}
    assert states(x, text, "OS") == ({"age_related_macular_degeneration"}, set(), {"diabetic_retinopathy"})
    assert states(x, text)[0] == {"diabetic_retinopathy", "age_related_macular_degeneration"}
    text = "Drusen in the left eye, haemorrhages in the right eye."
    assert states(x, text, "OS")[0] == {"age_related_macular_degeneration"}
    assert states(x, text, "OD")[0] == {"diabetic_retinopathy"}
    assert states(x, "双眼黄斑前膜。", "OD")[0] == {"epiretinal_membrane"}
    assert states(x, "右眼黄斑水肿，左眼正常。", "OS")[0] == {"normal"}
    assert states(x, "右眼黄斑水肿，左眼正常。", "右")[0] == {"macular_edema"}


def test_eye_values_are_normalised():
    assert normalise_eye("od") == "OD" and normalise_eye("L") == "OS" and normalise_eye("左眼") == "OS"
    assert normalise_eye("OU") is None and normalise_eye("") is None and normalise_eye(None) is None
    with pytest.raises(ValueError, match="unrecognised eye"):
        normalise_eye("third")


# ---- normal -----------------------------------------------------------------------------------------


def test_normal_needs_a_statement_and_no_disease(x):
    assert states(x, "Normal fundus.")[0] == {"normal"}
    assert states(x, "Fundus: normal.")[0] == {"normal"}
    assert states(x, "眼底未见明显异常。")[0] == {"normal"}
    assert states(x, "Normal fundus apart from a few drusen.")[0] == {"age_related_macular_degeneration"}
    assert states(x, "Optic disc normal.") == (set(), set(), set())  # a normal disc is not a normal fundus
    assert states(x, "No diabetic retinopathy.") == (set(), set(), {"diabetic_retinopathy"})
    assert states(x, "Normal fundus; glaucoma suspect.")[:2] == (set(), {"glaucoma"})


# ---- edge inputs ------------------------------------------------------------------------------------


def test_empty_and_blank_reports(x):
    assert x.extract("") == EMPTY
    assert x.extract("   \n\t ") == EMPTY
    assert x.extract(None) == EMPTY  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        x.extract(b"glaucoma")  # type: ignore[arg-type]


def test_unexpected_scripts_give_no_labels_and_no_error(x):
    assert x.extract("Нормальное глазное дно, без патологии.") == EMPTY
    assert x.extract("قاع العين طبيعي") == EMPTY
    assert x.extract("ตาปกติ 👁️ \u200b\ufeff\x00") == EMPTY
    assert states(x, "Глаукома? glaucoma suspect")[1] == {"glaucoma"}


def test_a_20000_character_report_equals_its_sentences_merged(x):
    """Reference: extract each report alone and merge (positive > uncertain > negated, normal rule)."""
    eyes = re.compile(r"\b(OD|OS|OU|RE|LE|right|left|both|bilateral)\b|眼", re.IGNORECASE)
    gold = [g for g in load_gold() if g.eye is None and not eyes.search(g.text)]
    parts, total = [], 0
    i = 0
    while total < 20000:
        text = gold[i % len(gold)].text.rstrip("。.") + ".\n"
        parts.append(text)
        total += len(text)
        i += 1
    report = "".join(parts)[:20000]
    report = report[: report.rfind("\n") + 1]
    assert len(report) > 19000
    got = x.extract(report)
    best: dict[str, int] = {}
    for part in report.splitlines():
        r = x.extract(part)
        for state, labs in ((3, r.positive), (2, r.uncertain), (1, r.negated)):
            for lab in labs:
                best[lab] = max(best.get(lab, 0), state)
    if any(v >= 2 for k, v in best.items() if k != "normal"):
        best.pop("normal", None) if best.get("normal", 0) >= 2 else None
    assert set(got.positive) == {k for k, v in best.items() if v == 3}
    assert set(got.uncertain) == {k for k, v in best.items() if v == 2}
    assert set(got.negated) == {k for k, v in best.items() if v == 1}


# ---- outputs ----------------------------------------------------------------------------------------


def test_report_labels_are_in_ontology_order_and_serialise(x):
    r = x.extract("Laser scars. Drusen. Glaucoma suspect. No macular hole.")
    ids = load_ontology().label_ids
    assert list(r.positive) == sorted(r.positive, key=ids.index)
    assert r.to_json_dict("A1") == {
        "report_id": "A1",
        "positive": ["age_related_macular_degeneration", "laser_scars"],
        "uncertain": ["glaucoma"],
        "negated": ["macular_hole"],
    }
    assert ReportLabels().is_empty and not r.is_empty


def test_policy_vector():
    ids = load_ontology().label_ids
    r = ReportLabels(positive=("glaucoma",), uncertain=("macular_hole",), negated=("normal",))
    v = LabelPolicy().vector(r, ids)
    assert len(v) == 19 and sum(v) == 2
    assert v[ids.index("glaucoma")] == 1 and v[ids.index("macular_hole")] == 1
    assert sum(LabelPolicy(uncertain_as_positive=False).vector(r, ids)) == 1
    assert LabelPolicy().vector(EMPTY, ids) == [0] * 19


def test_extractor_is_compiled_once_and_cached():
    assert get_extractor() is get_extractor()
    onto = load_ontology()
    assert get_extractor(onto) is get_extractor(onto)


def test_report_text_is_never_logged(x, caplog):
    secret = "Patient ZHANG-SECRET-991 has glaucoma"
    with caplog.at_level(logging.DEBUG):
        x.extract(secret)
        x.extract(secret, "OD")
    assert "SECRET" not in caplog.text


def test_shared_lesions_count_only_when_nothing_else_explains_them(x):
    assert states(x, "Scattered haemorrhages and exudates.")[0] == {"diabetic_retinopathy"}
    assert states(x, "CRVO with widespread haemorrhages.")[0] == {"retinal_vein_occlusion"}
    assert states(x, "视盘水肿，视盘周围出血。")[0] == {"optic_disc_edema"}
    # microaneurysms are specific: diabetic retinopathy even next to a vein occlusion
    assert states(x, "BRVO; microaneurysms elsewhere.")[0] == {
        "diabetic_retinopathy",
        "retinal_vein_occlusion",
    }
    # explained in the other eye only: still diabetic retinopathy in this one
    text = "Right eye: CRVO. Left eye: haemorrhages."
    assert states(x, text, "OS")[0] == {"diabetic_retinopathy"}
    assert states(x, text, "OD")[0] == {"retinal_vein_occlusion"}


def test_trailing_eye_applies_to_its_clause(x):
    text = "Myopic degeneration with Fuchs spot, left eye. Right eye tessellated."
    assert states(x, text, "OD")[0] == {"tessellated_fundus"}
    assert states(x, text, "OS")[0] == {"pathological_myopia"}
    assert states(x, "视网膜神经纤维层楔形缺损，右眼。", "OS") == (set(), set(), set())
    # an eye heading followed by a colon is a section, not a trailing eye
    assert states(x, "Right eye: drusen, left eye: haemorrhages.", "OD")[0] == {
        "age_related_macular_degeneration"
    }


def test_hedge_does_not_reach_a_stated_cause_or_a_new_statement(x):
    assert states(x, "Possible macular hole secondary to ERM.")[:2] == (
        {"epiretinal_membrane"},
        {"macular_hole"},
    )
    assert states(x, "No DR，无黄斑水肿，cataract 轻度。")[0] == {"media_opacity"}


def test_eye_asides_between_commas(x):
    assert states(x, "There is no sign, in either eye, of diabetic retinopathy.")[2] == {
        "diabetic_retinopathy"
    }
    text = "Drusen, left eye, haemorrhages, right eye."
    assert states(x, text, "OS")[0] == {"age_related_macular_degeneration"}
    assert states(x, text, "OD")[0] == {"diabetic_retinopathy"}


def test_change_statements_and_contrasts(x):
    assert states(x, "No change in the known BRVO.")[0] == {"retinal_vein_occlusion"}
    assert states(x, "No progression of diabetic retinopathy.")[0] == {"diabetic_retinopathy"}
    assert states(x, "Glaucoma was not confirmed.")[2] == {"glaucoma"}
    assert states(x, "Diabetic retinopathy rather than hypertensive retinopathy.")[:3:2] == (
        {"diabetic_retinopathy"},
        {"hypertensive_retinopathy"},
    )
    assert states(x, "左眼视网膜脱离复位良好。") == (set(), set(), set())
