"""VQA accuracy as the official evaluator computes it (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).

Per question (quirks kept on purpose, so our numbers compare with published ones):

1. Newlines and tabs become spaces and the ends are stripped, in the prediction and in every human answer.
2. Only if the human answers are not all identical, the prediction and the answers are normalised: punctuation
   (``normalize_punctuation``), then lowercasing, number words -> digits, article removal and the contraction table
   (``normalize_digits_articles``). With ten identical answers nothing is normalised, so "Yes" scores 0 against ten
   "yes" -- that is what the official code does. (OpenFlamingo's copy normalises unconditionally; we do not.)
3. The prediction is scored against each leave-one-out subset of the answers as ``min(1, matches / 3)``, and the
   question's score is the mean of those.

``vqa_accuracy`` is the mean over questions, x100. For OK-VQA, ``stem=True`` first stems the prediction the way
OpenFlamingo does (``okvqa_stem``; the OK-VQA v1.1 answers are already stemmed).

Fewer than ten answers (custom data): the leave-one-out formula assumes ten human answers -- with one answer every
subset is empty and a right prediction scores 0. So ``question_accuracy`` picks a rule per question
(``accuracy_rule``):

    "official-10"      ten (or more) answers: the official formula above, unchanged.
    "exact-match-any"  one to nine answers: 1.0 if the prediction equals ANY answer after the official normalisation
                       (steps 1 and 2, applied always: the official skip for identical answers exists only for
                       the formula's sake), else 0.0.

``vqa_rule(answers)`` names the rule a scored set used -- one of the two, or "mixed" -- with per-rule counts; the
scorers report it beside the accuracy (``"vqa_rule"``, ``"vqa_rule_counts"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# Word -> digit, as in the official evaluator (note "none" -> "0").
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Apostrophe-less contraction -> contraction. Entries are case-sensitive and looked up after lowercasing, so the
# capitalised keys ("Im", "Ive", "Id've", "I'dve") can never match: kept as in the official table.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# The official list: note that "." ":" "'" are absent (periods have their own rule; colons and apostrophes stay).
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern's "(?!<=\d)" was meant as a look-behind but is a look-ahead that never fires, so the rule is
# "a period not followed by a digit" (so "2.5" keeps its period and "1." loses it).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as `count`:
# at most 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def normalize_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop a mark next to a space (or anywhere if the text has digit,digit),
    else replace it with a space; then drop periods not followed by a digit. Case is untouched."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        # The tests look at the original text, not at `out`: a quirk of the official code, kept.
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, split on whitespace, map number words to digits, drop
    articles, expand apostrophe-less contractions ("dont" -> "don't"), join with single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Both normalisation steps, in the official order."""
    return normalize_digits_articles(normalize_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


OFFICIAL_RULE = "official-10"
EXACT_MATCH_RULE = "exact-match-any"
MIXED_RULE = "mixed"
OFFICIAL_ANSWER_COUNT = 10  # VQAv2, OK-VQA, TextVQA and VizWiz all collect ten human answers per question


def accuracy_rule(answers: Sequence[str]) -> str:
    """The rule that scores a question with these human answers: "official-10" (ten or more) or "exact-match-any"."""
    if not answers:
        raise ValueError("question_accuracy needs at least one human answer")
    return OFFICIAL_RULE if len(answers) >= OFFICIAL_ANSWER_COUNT else EXACT_MATCH_RULE


def official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official score in [0, 1]: the mean over leave-one-out subsets of ``min(1, matches / 3)``."""
    if not answers:
        raise ValueError("question_accuracy needs at least one human answer")
    prediction = _clean(prediction)
    answers = [_clean(a) for a in answers]
    # The official code tests the answers for agreement after stripping but before normalising.
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for j, answer in enumerate(answers) if j != left_out and answer == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def exact_match_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0 (the rule below ten answers)."""
    if not answers:
        raise ValueError("question_accuracy needs at least one human answer")
    prediction = normalize_answer(_clean(prediction))
    return 1.0 if any(normalize_answer(_clean(a)) == prediction for a in answers) else 0.0


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's score in [0, 1], by ``accuracy_rule(answers)``: the official formula for ten answers, exact
    match against any answer for fewer (see the module docstring)."""
    if accuracy_rule(answers) == OFFICIAL_RULE:
        return official_accuracy(prediction, answers)
    return exact_match_any(prediction, answers)


def vqa_rule(answers: Mapping) -> dict:
    """Which rule scored the questions of ``answers`` (question_id -> human answers):
    ``{"vqa_rule": "official-10" | "exact-match-any" | "mixed", "vqa_rule_counts": {rule: questions}}``."""
    counts: dict[str, int] = {}
    for human in answers.values():
        rule = accuracy_rule(list(human))
        counts[rule] = counts.get(rule, 0) + 1
    name = next(iter(counts)) if len(counts) == 1 else MIXED_RULE
    return {"vqa_rule": name, "vqa_rule_counts": counts}


def vqa_accuracy(predictions: Mapping, answers: Mapping, *, stem: bool = False) -> float:
    """Mean VQA accuracy over the questions of ``answers`` (question_id -> human answers), x100.

    ``predictions`` maps question_id -> predicted answer and must cover every question of ``answers``.
    ``stem=True`` stems each prediction first (OK-VQA, see ``okvqa_stem``). Each question is scored by
    ``question_accuracy`` (official formula with ten answers, exact match with fewer); ``vqa_rule`` reports which.
    """
    if not answers:
        raise ValueError("vqa_accuracy: no questions to score")
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"vqa_accuracy: no prediction for {len(missing)} question(s), e.g. {missing[:5]}")
    if stem:
        from .okvqa_stem import okvqa_stem

    total = 0.0
    for qid, human in answers.items():
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise ValueError(f"vqa_accuracy: prediction for question {qid!r} should be a string, got {prediction!r}")
        total += question_accuracy(okvqa_stem(prediction) if stem else prediction, list(human))
    return 100.0 * total / len(answers)
