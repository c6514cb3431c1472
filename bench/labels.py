"""Label extraction throughput: reports per second on one core, side by side with two references.

Run:  .venv/bin/python bench/labels.py [--n 20000] [--repeats 5]

Corpus: seeded, template-built fundus reports (English ~200 characters; Chinese ~60 characters, which
carry about the same findings, and ~180-character Chinese reports), mixing findings, negated lists,
hedges, eye sections and plans.
Columns, measured in one process on the same reports:
- extractor: `LabelExtractor.extract` (what `vilref-client labels extract` does per row);
- scan_only: the compiled regex passes alone (the floor any regex-based extractor pays);
- keyword_grep: a naive baseline that tests every synonym with `in` (no negation, no eyes).
CPU time (time.process_time) is the primary clock, because the machine is shared; wall time is also
reported. Writes bench/results/labels.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vilref_fed.labels import get_extractor  # noqa: E402
from vilref_fed.labels.extractor import LabelExtractor, _normalise  # noqa: E402
from vilref_fed.ontology import load_ontology  # noqa: E402

EN_FINDINGS = [
    "mild non-proliferative diabetic retinopathy with scattered microaneurysms",
    "moderate NPDR with dot and blot haemorrhages and hard exudates",
    "soft drusen at the macula",
    "enlarged cupping, C/D ratio 0.8",
    "a wedge-shaped RNFL defect inferotemporally",
    "tessellated fundus with a myopic crescent",
    "branch retinal vein occlusion with flame haemorrhages",
    "epiretinal membrane with mild macular pucker",
    "cystoid macular oedema",
    "optic disc pallor",
    "laser photocoagulation scars in the periphery",
    "possible early age-related macular degeneration",
    "glaucoma suspect, C/D 0.65",
    "arteriolar narrowing and AV nicking",
]
EN_NEGATIVES = [
    "no haemorrhages, exudates or macular oedema",
    "no evidence of retinal detachment",
    "no diabetic retinopathy",
    "macular hole cannot be excluded",
    "disc margins clear, C/D 0.3",
    "retina flat, vessels of normal calibre",
]
EN_PLANS = [
    "Recommend review in 12 months.",
    "Refer to the glaucoma clinic for visual fields.",
    "History of cataract surgery.",
    "Image quality adequate.",
]
ZH_FINDINGS = [
    "非增殖性糖尿病视网膜病变，可见微血管瘤",
    "黄斑区散在玻璃膜疣",
    "视杯扩大，C/D约0.8",
    "视网膜神经纤维层楔形缺损",
    "豹纹状眼底",
    "视网膜分支静脉阻塞",
    "黄斑前膜",
    "黄斑囊样水肿",
    "视盘颜色苍白",
    "激光斑",
    "青光眼待排",
]
ZH_NEGATIVES = ["未见出血、渗出及黄斑水肿", "无视网膜脱离", "视盘边界清，C/D约0.3", "黄斑区未见水肿"]
ZH_PLANS = ["建议定期复查。", "建议青光眼门诊随访。", "既往白内障手术史。"]


def make_en(rng: random.Random) -> str:
    right = rng.choice(EN_FINDINGS)
    left = rng.choice(EN_FINDINGS + EN_NEGATIVES)
    return (
        f"Right eye: {right}; {rng.choice(EN_NEGATIVES)}. "
        f"Left eye: {left}; {rng.choice(EN_NEGATIVES)}. {rng.choice(EN_PLANS)}"
    )


def make_zh(rng: random.Random) -> str:
    return (
        f"眼底照相示：右眼{rng.choice(ZH_FINDINGS)}，{rng.choice(ZH_NEGATIVES)}。"
        f"左眼{rng.choice(ZH_FINDINGS + ZH_NEGATIVES)}，{rng.choice(ZH_NEGATIVES)}。{rng.choice(ZH_PLANS)}"
    )


def keyword_grep_factory(extractor: LabelExtractor):
    onto = extractor.ontology
    terms = [
        (s.lower(), lab.id)
        for lab in onto.labels
        for s in (*lab.synonyms_en, *lab.synonyms_zh, *lab.abbreviations)
    ]

    def grep(text: str) -> list[str]:
        low = text.lower()
        return sorted({lab for term, lab in terms if term in low})

    return grep


def timed(fn, texts: list[str], repeats: int) -> dict:
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for t in texts:
            fn(t)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    n = len(texts)
    return {
        "reports_per_s_cpu": round(n / best_cpu, 1),
        "reports_per_s_wall": round(n / best_wall, 1),
        "us_per_report_cpu": round(best_cpu / n * 1e6, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="reports per language")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "labels.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    extractor = LabelExtractor(load_ontology())  # fresh compile, to time it
    compile_s = time.perf_counter() - t0
    extractor = get_extractor()
    rng = random.Random(0)
    en = [make_en(rng) for _ in range(args.n)]
    zh = [make_zh(rng) for _ in range(args.n)]
    # Chinese reports as long as the English ones (about three times the information)
    zh_long = [make_zh(rng) + make_zh(rng) + make_zh(rng) for _ in range(args.n // 2)]
    grep = keyword_grep_factory(extractor)

    def scan_only(text: str) -> None:
        orig, low = _normalise(text)
        extractor._tokens(orig, low)

    results = {}
    for lang, texts in (("en", en), ("zh", zh), ("zh_long", zh_long)):
        row = {
            "mean_chars": round(sum(map(len, texts)) / len(texts), 1),
            "extractor": timed(extractor.extract, texts, args.repeats),
            "scan_only": timed(scan_only, texts, args.repeats),
            "keyword_grep": timed(grep, texts, args.repeats),
        }
        ext = row["extractor"]["us_per_report_cpu"]
        row["ratio_extractor_vs_scan_only"] = round(ext / row["scan_only"]["us_per_report_cpu"], 2)
        row["ratio_extractor_vs_keyword_grep"] = round(ext / row["keyword_grep"]["us_per_report_cpu"], 3)
        results[lang] = row

    long_report = " ".join(en)[:20000]
    c0 = time.process_time()
    for _ in range(20):
        extractor.extract(long_report)
    long_s = (time.process_time() - c0) / 20

    labelled = sum(1 for t in en if extractor.extract(t).positive)
    summary = {
        "benchmark": "labels",
        "reports_per_s": results["en"]["extractor"]["reports_per_s_cpu"],
        "reports_per_s_zh": results["zh"]["extractor"]["reports_per_s_cpu"],
        "reports_per_s_zh_long": results["zh_long"]["extractor"]["reports_per_s_cpu"],
        "target_reports_per_s": 20000,
        "meets_target": results["en"]["extractor"]["reports_per_s_cpu"] >= 20000,
        "clock": "process_time (one core, single thread)",
        "compile_s": round(compile_s, 3),
        "long_report_20000_chars_ms": round(long_s * 1000, 2),
        "en_reports_with_a_positive_label": labelled,
        "n_per_language": args.n,
        "by_language": results,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
