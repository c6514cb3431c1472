"""Report-language cues: negation, hedges, history, plans, eyes, clause breaks — English and Chinese.

These are the mechanics of reading a report, not expert knowledge about diseases, so they live here and
not in the ontology file (and do not change the ontology hash). Terms are written lower case with
single spaces; the matcher accepts any run of spaces/hyphens where a space is written.

Direction: PRE cues govern the findings after them (to the end of the clause, or of a comma list),
POST cues the findings just before them, BOTH cues are resolved by position (a hedge followed by a
finding in its segment is PRE, otherwise POST).
"""

from __future__ import annotations

# Cue types
NEG = "neg"
HEDGE = "hedge"
HIST = "hist"
PLAN = "plan"

PRE = 1
POST = 2
BOTH = 3

NEGATION: dict[str, int] = {
    # English
    "no": PRE, "not": PRE, "without": PRE, "negative for": PRE, "free of": PRE, "clear of": PRE,
    "absence of": PRE, "absent": POST, "no evidence of": PRE, "no evidence for": PRE, "no signs of": PRE,
    "no sign of": PRE, "no features of": PRE, "no definite": PRE, "no obvious": PRE, "no apparent": PRE,
    "no significant": PRE, "no clear": PRE, "no further": PRE, "no active": PRE,
    "no frank": PRE, "no visible": PRE, "no evident": PRE, "no gross": PRE,
    "not consistent with": PRE, "neither": PRE,
    "denies": PRE, "denied": PRE, "rules out": PRE, "ruled out": BOTH, "excluded": POST, "never": PRE,
    "not seen": POST, "not present": POST, "not detected": POST, "not identified": POST, "not noted": POST,
    "not observed": POST, "not visible": POST, "not evident": POST, "not found": POST,
    "not appreciated": POST, "negative": POST, "none": POST, "nil": POST, "resolved": POST,
    "has resolved": POST, "unlikely": BOTH,
    "(-)": POST, "( - )": POST, "r0": POST, "grade r0": POST, "m0": POST, "grade 0": POST,
    # Chinese
    "无": PRE, "未见": PRE, "未见明显": PRE, "未见确切": PRE, "未见明确": PRE, "未发现": PRE, "没有": PRE,
    "否认": PRE, "排除": BOTH, "除外": BOTH, "已排除": POST, "未见到": PRE, "未查见": PRE, "无明显": PRE,
    "无明确": PRE, "未探及": PRE, "未及": PRE, "不伴": PRE, "不伴有": PRE, "并无": PRE, "未出现": PRE,
    "阴性": POST, "消失": POST, "消退": POST, "不明显": POST, "依据不足": POST, "证据不足": POST,
    "不支持": PRE, "未证实": POST, "未确诊": POST,
    # English, continued
    "not confirmed": POST, "rather than": PRE, "instead of": PRE,
}

HEDGES: dict[str, int] = {
    "suspected": BOTH, "suspect": BOTH, "suspicious for": PRE, "suspicious of": PRE, "suspicion of": PRE,
    "possible": BOTH, "possibly": BOTH, "probable": BOTH, "probably": BOTH, "likely": BOTH, "query": PRE,
    "questionable": BOTH, "equivocal": BOTH, "borderline": PRE, "cannot exclude": PRE,
    "cannot rule out": PRE, "can not exclude": PRE, "can not rule out": PRE, "can't exclude": PRE,
    "can't rule out": PRE, "could not exclude": PRE, "cannot be excluded": POST, "cannot be ruled out": POST,
    "could not be excluded": POST, "can not be excluded": POST, "not excluded": POST, "not ruled out": POST,
    "not be ruled out": POST, "to be ruled out": POST, "to be excluded": POST, "rule out": PRE, "r/o": PRE,
    "consider": PRE, "considered": POST, "suggestive of": PRE, "suggests": PRE, "suggesting": PRE,
    "may have": PRE, "may represent": PRE, "may be": PRE, "might be": PRE, "could be": PRE, "presumed": BOTH,
    "presumably": PRE, "doubtful": BOTH, "uncertain": BOTH, "differential": PRE,
    "differential diagnosis": PRE, "ddx": PRE, "early signs of": PRE, "unable to exclude": PRE,
    "unable to rule out": PRE, "not able to exclude": PRE, "difficult to exclude": PRE,
    "cannot be completely excluded": POST,
    # Chinese
    "疑似": BOTH, "可疑": BOTH, "考虑": PRE, "考虑为": PRE, "首先考虑": PRE, "待排": POST, "待排除": POST,
    "待除外": POST, "待查": POST, "不除外": BOTH, "不能除外": BOTH, "不排除": BOTH, "不能排除": BOTH,
    "可能": BOTH, "可能为": PRE, "可能是": PRE, "倾向": PRE, "倾向于": PRE, "怀疑": PRE, "疑": PRE, "似": PRE,
    "拟诊": PRE, "疑诊": PRE,
}

HISTORY: dict[str, int] = {
    "history of": PRE, "hx of": PRE, "h/o": PRE, "past history of": PRE, "family history of": PRE,
    "known history of": PRE, "history": PRE, "past history": PRE, "s/p": PRE, "status post": PRE,
    "previous": PRE, "previously": PRE, "prior": PRE, "post": PRE, "past": PRE, "treated for": PRE,
    "had": PRE, "underwent": PRE, "repair": POST, "repaired": POST, "surgery": POST, "operation": POST,
    "post op": POST, "postoperative": POST, "postop": POST, "post operative": POST,
    "treated previously": POST,
    # Chinese
    "既往": PRE, "曾患": PRE, "曾行": PRE, "曾有": PRE, "曾": PRE, "既往史": PRE, "病史": BOTH, "史": POST,
    "术后": POST, "手术后": POST, "修复术后": POST, "复位": POST, "复位良好": POST, "已复位": POST,
    "reattached": POST, "repaired successfully": POST,
}

PLANS: dict[str, int] = {
    "refer": PRE, "refer to": PRE, "referral": PRE, "referred": PRE, "recommend": PRE, "recommended": PRE,
    "recommendation": PRE, "recommendations": PRE, "advise": PRE, "advised": PRE, "follow up": PRE,
    "f/u": PRE, "review": PRE, "re examine": PRE, "reexamine": PRE, "recheck": PRE, "please": PRE,
    "plan": PRE, "schedule": PRE, "monitor": PRE, "monitoring": PRE, "assess for": PRE, "to assess for": PRE,
    "evaluate for": PRE, "evaluation for": PRE, "screen for": PRE, "screening for": PRE, "consult": PRE,
    "suggest": PRE, "should": PRE, "needs": PRE,
    # Chinese
    "建议": PRE, "随访": PRE, "复查": PRE, "转诊": PRE, "定期": PRE, "请": PRE, "进一步": PRE, "观察": PRE,
    "必要时": PRE, "排查": PRE, "择期": PRE, "门诊": PRE,
}

# Words that close the clause: what follows is a new statement ("no haemorrhages but drusen present").
BOUNDARY_WORDS: tuple[str, ...] = (
    "but", "however", "although", "though", "whereas", "except", "except for", "apart from", "other than",
    "besides", "aside from", "otherwise", "但", "但是", "然而", "不过", "另外", "此外",
)

# Affirmations: they end a pending post-cue window and stop a negated list from running on
# ("no haemorrhages, drusen present").
AFFIRMATIONS: tuple[str, ...] = (
    "present", "seen", "noted", "visible", "observed", "evident", "identified", "detected", "shows", "show",
    "showing", "shown", "demonstrates", "demonstrated", "reveals", "revealed", "with", "has", "have",
    "there is", "there are", "consistent with", "in keeping with", "compatible with", "confirmed", "found",
    "secondary to", "due to", "caused by", "associated with", "继发于", "所致",
    # a statement about change, not about absence: "no change in the known BRVO"
    "no change", "no change in", "no interval change", "no progression", "no progression of",
    "no worsening", "no worsening of", "unchanged", "stable", "无变化", "无明显变化", "较前无变化",
    "未见明显变化", "未见变化",
    "可见", "见", "有", "伴", "伴有", "呈", "示", "存在", "显示", "提示", "合并", "出现", "明确",
)

# List connectors: a negated/hedged list keeps its cue across commas when joined by these.
CONNECTORS: tuple[str, ...] = ("or", "nor", "and", "and/or", "或", "或者", "及", "和", "与", "以及", "、")

# Eye markers. Values: "OD", "OS", "OU". Two-letter English codes are accepted in upper case only where
# the lower-case form is an ordinary word ("re", "le").
EYES: dict[str, str] = {
    "od": "OD", "os": "OS", "ou": "OU", "right eye": "OD", "left eye": "OS", "both eyes": "OU",
    "each eye": "OU", "either eye": "OU", "right fundus": "OD", "left fundus": "OS", "both fundi": "OU",
    "r eye": "OD", "l eye": "OS", "rt eye": "OD", "lt eye": "OS", "bilateral": "OU", "bilaterally": "OU",
    "both retinas": "OU", "right": "OD", "left": "OS",
    "右眼": "OD", "左眼": "OS", "双眼": "OU", "双侧": "OU", "两眼": "OU", "右眼底": "OD", "左眼底": "OS",
    "双眼底": "OU", "双眼眼底": "OU", "右侧": "OD", "左侧": "OS",
}
EYES_CASE_SENSITIVE: dict[str, str] = {"RE": "OD", "LE": "OS", "BE": "OU"}

# "normal" on its own is a finding only when nothing else in its segment says what is normal.
NORMAL_WORDS: tuple[str, ...] = ("normal", "正常", "基本正常", "大致正常")
NORMAL_CONTEXT_WORDS: tuple[str, ...] = (
    "impression", "diagnosis", "findings", "finding", "conclusion", "result", "fundus", "fundi", "exam",
    "examination", "retina", "retinal", "photo", "photograph", "image", "study", "is", "are", "appears",
    "appear", "appearance", "appearances", "otherwise", "essentially", "overall", "grossly", "looks",
    "the", "both", "eyes", "eye",
    "眼底", "诊断", "印象", "检查", "结果", "所见", "照相", "均", "双眼", "右眼", "左眼", "眼", "彩照",
)
