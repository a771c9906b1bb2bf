"""Metrics match the evaluators the papers used: pycocoevalcap (CIDEr), GT-Vision-Lab vqaEval.py (VQA), ROC-AUC."""

import random

import pytest
from ea_helpers import TRICKY_CAPTIONS, java_ptb_tokenize, pairwise_auc, random_captions, reference_cider

from flamingo_eval.metrics import cider, roc_auc, vqa_accuracy
from flamingo_eval.metrics.cider import cider_scores
from flamingo_eval.metrics.okvqa_stem import MANUAL_MATCHES, okvqa_stem
from flamingo_eval.metrics.ptb_tokenizer import ptb_tokenize, ptb_tokenize_batch
from flamingo_eval.metrics.vqa import (
    normalize_digits_articles,
    normalize_punctuation,
    official_accuracy,
    question_accuracy,
    vqa_rule,
)

# ----------------------------------------------------------------------------------------------- PTB + CIDEr
RANDOM_CAPTIONS = random_captions(1500, seed=0)


@pytest.fixture(scope="module")
def tokenized():
    """Every caption these tests use, tokenised as one batch (a single Java call) by both implementations."""
    texts = TRICKY_CAPTIONS + RANDOM_CAPTIONS
    return texts, java_ptb_tokenize(texts), ptb_tokenize_batch(texts)


def _mismatches(tokenized, lo, hi):
    texts, java, python = tokenized
    return [(texts[i], java[i], python[i]) for i in range(lo, hi) if java[i] != python[i]]


def test_python_ptb_tokenizer_equals_java_on_tricky_captions(tokenized):
    mismatches = _mismatches(tokenized, 0, len(TRICKY_CAPTIONS))
    assert not mismatches, mismatches[:5]


def test_python_ptb_tokenizer_equals_java_on_random_caption_like_text(tokenized):
    mismatches = _mismatches(tokenized, len(TRICKY_CAPTIONS), len(tokenized[0]))
    assert not mismatches, mismatches[:5]


def test_ptb_tokenizer_sees_the_next_caption_of_the_batch_like_corenlp():
    # CoreNLP reads a one-letter acronym's period as a sentence end before "The" -- even across a line break.
    batch = ["vitamin C.", "The dog", "vitamin C.", "the dog"]
    assert ptb_tokenize_batch(batch) == ["vitamin c", "the dog", "vitamin c.", "the dog"] == java_ptb_tokenize(batch)


def test_one_letter_acronym_before_a_sentence_start_word_matches_java_within_and_across_lines():
    words = "A After All Also An At But By For He His In It Mr. Mrs. On She So The They This To Two We What You".split()
    batch = [f"see a. {w} x" for w in words] + [f"vitamin C. {w}? x" for w in words[:6]] + ["see B.", "The dog", "I.", "The"]
    assert ptb_tokenize_batch(batch) == java_ptb_tokenize(batch)


def test_java_backend_returns_the_same_strings_as_the_python_backend():
    texts = TRICKY_CAPTIONS[:20]
    assert ptb_tokenize_batch(texts, backend="java") == ptb_tokenize_batch(texts)


def test_ptb_tokenizer_splits_clitics_and_drops_punctuation_but_keeps_brackets():
    # Hand-checkable: pycocoevalcap's filter list is upper case, so the lowercased -lrb- / -rrb- survive it.
    assert ptb_tokenize("A man's dog (brown) isn't running.") == "a man 's dog -lrb- brown -rrb- is n't running"


def test_cider_equals_pycocoevalcap_on_a_caption_corpus():
    rng = random.Random(1)
    lines = random_captions(400, seed=1) + TRICKY_CAPTIONS
    references = {i: rng.sample(lines, 5) for i in range(120)}
    # A mix of exact hits, near misses and unrelated captions, so every n-gram order and the length penalty matter.
    predictions = {
        i: rng.choice(refs) if i % 3 == 0 else rng.choice(refs)[: rng.randint(5, 40)] if i % 3 == 1 else rng.choice(lines)
        for i, refs in references.items()
    }
    assert cider(predictions, references) == pytest.approx(reference_cider(predictions, references), rel=1e-12)


def test_cider_of_a_single_image_is_zero_because_every_ngram_has_idf_zero():
    # With one image, idf = log(1) - log(df=1) = 0 for every reference n-gram: a property of CIDEr-D's definition.
    assert cider({1: "a dog on a bench"}, {1: ["a dog on a bench", "a dog sitting"]}) == 0.0


def test_cider_length_penalty_counts_bigrams_like_pycocoevalcap():
    # A one-word and a two-word candidate against a two-word reference: pycocoevalcap's "length" is the bigram
    # count (0 vs 1), so the penalty is exp(-1/72) in both orders; derive the expected per-image score by hand.
    import math

    refs = {"a": ["red bus"], "b": ["blue car"]}
    scores = cider_scores({"a": "red bus", "b": "blue"}, refs)
    # Image b: only the unigram "blue" matches; its idf is log(2) - log(1) on both sides, the reference's unigram
    # norm is sqrt(2) * log(2), the candidate's log(2): cosine 1/sqrt(2); other orders 0; mean over 4 orders, x10.
    expected_b = (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert scores["b"] == pytest.approx(expected_b, rel=1e-12)
    assert scores["a"] == pytest.approx(10 * (1 + 1) / 4, rel=1e-12)  # exact match: unigram and bigram cosines are 1


def test_cider_names_images_without_a_prediction():
    with pytest.raises(ValueError, match="no prediction for 1 image.*'b'"):
        cider({"a": "x"}, {"a": ["x"], "b": ["y"]})


# ----------------------------------------------------------------------------------------------- VQA
TEN_MIXED = ["two", "2", "2", "2", "2", "two", "2", "2", "2", "2"]


def test_vqa_punctuation_is_removed_next_to_a_space_and_replaced_by_a_space_elsewhere():
    assert normalize_punctuation("hot dog, bun") == "hot dog bun"  # ", " -> removed
    assert normalize_punctuation("hot-dog") == "hot dog"  # no space next to "-" anywhere -> becomes a space


def test_vqa_digit_comma_digit_removes_every_mark_without_inserting_spaces():
    assert normalize_punctuation("1,000-ish") == "1000ish"


def test_vqa_period_is_removed_unless_a_digit_follows():
    assert normalize_punctuation("2.5 ft.") == "2.5 ft"
    assert normalize_punctuation("mr.smith") == "mrsmith"


def test_vqa_colon_and_apostrophe_are_not_punctuation_in_the_official_list():
    assert normalize_punctuation("10:30 o'clock") == "10:30 o'clock"


def test_vqa_number_words_become_digits_and_none_becomes_zero():
    assert normalize_digits_articles("Two dogs none") == "2 dogs 0"


def test_vqa_articles_are_dropped_as_whole_words_only():
    assert normalize_digits_articles("a man at the anthem") == "man at anthem"


def test_vqa_apostrophe_less_contractions_are_expanded():
    assert normalize_digits_articles("dont know") == "don't know"
    assert normalize_digits_articles("Im here") == "im here"  # the table's capitalised keys never match (official)


def test_vqa_answers_all_identical_means_no_normalisation_at_all():
    assert question_accuracy("Yes", ["yes"] * 10) == 0.0  # not even lowercased, as in the official code
    assert question_accuracy("yes", ["yes"] * 10) == 1.0


def test_vqa_answers_that_differ_normalise_both_sides():
    # "Two" -> "2" matches all ten normalised answers.
    assert question_accuracy("Two", TEN_MIXED) == 1.0


def test_vqa_newlines_and_tabs_are_stripped_before_anything_else():
    assert question_accuracy("\tyes\n", ["yes"] * 10) == 1.0


def test_vqa_leave_one_out_average_on_hand_checkable_counts():
    # The prediction matches k of 10 answers. Leaving out a matching answer leaves k-1 matches, else k:
    # score = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
    for k in range(11):
        answers = ["cat"] * k + ["dog", "bird", "cow", "pig", "owl", "elk", "ant", "bee", "fox", "rat"][: 10 - k]
        expected = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
        assert question_accuracy("cat", answers) == pytest.approx(expected), k
    # Spot values that are easy to check by eye: 1 match -> 0.3, 3 matches -> 0.9, 4+ matches -> 1.
    assert question_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)


def test_vqa_accuracy_is_the_mean_over_questions_times_100_and_needs_every_prediction():
    answers = {1: ["yes"] * 10, 2: ["cat"] + ["dog"] * 9}
    assert vqa_accuracy({1: "yes", 2: "cat"}, answers) == pytest.approx(100 * (1.0 + 0.3) / 2)
    with pytest.raises(ValueError, match=r"no prediction for 1 question.*\[2\]"):
        vqa_accuracy({1: "yes"}, answers)


# Custom data has fewer than ten answers: the leave-one-out formula would score every single-answer question 0.
def test_vqa_single_answer_scores_100_when_right_and_0_when_wrong():
    assert vqa_accuracy({1: "cat"}, {1: ["cat"]}) == 100.0
    assert vqa_accuracy({1: "dog"}, {1: ["cat"]}) == 0.0
    # The official normalisation still applies: case, articles, final period, number words.
    assert vqa_accuracy({1: "The Cat.", 2: "Two"}, {1: ["cat"], 2: ["2"]}) == 100.0


def test_vqa_fewer_than_ten_answers_is_exact_match_against_any_answer():
    answers = ["red", "dark blue", "green"]
    assert question_accuracy("dark blue", answers) == 1.0 and question_accuracy("green", answers) == 1.0
    assert question_accuracy("blue", answers) == 0.0  # no partial credit and no vote counting
    assert question_accuracy("yes", ["yes"] * 9) == 1.0  # nine agreeing answers: still exact match, not 2/3 or 1


def test_vqa_ten_answers_keep_the_official_formula():
    assert question_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)  # 3 of 10
    assert question_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # 1 of 10
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice(["cat", "Cat", "dog", "two", "2", "a cat"]) for _ in range(10)]
        prediction = rng.choice(["cat", "dog", "2", "bird"])
        assert question_accuracy(prediction, answers) == official_accuracy(prediction, answers)


def test_vqa_rule_names_the_rule_that_scored_the_questions_with_counts():
    ten, one = ["yes"] * 10, ["yes"]
    assert vqa_rule({1: ten, 2: ten}) == {"vqa_rule": "official-10", "vqa_rule_counts": {"official-10": 2}}
    assert vqa_rule({1: one}) == {"vqa_rule": "exact-match-any", "vqa_rule_counts": {"exact-match-any": 1}}
    assert vqa_rule({1: ten, 2: one, 3: one}) == {
        "vqa_rule": "mixed",
        "vqa_rule_counts": {"official-10": 1, "exact-match-any": 2},
    }


def test_okvqa_stemming_uses_the_manual_table_then_ing_verbs_then_plurals():
    assert okvqa_stem("clothes") == MANUAL_MATCHES["clothes"] == "cloth"
    assert okvqa_stem("skiing") == "ski"
    assert okvqa_stem("two dogs running") == "two dog run"
    assert okvqa_stem("tennis") == "tennis"  # singular nouns in "s" are left alone


def test_okvqa_accuracy_stems_the_prediction_before_matching_stemmed_answers():
    answers = {7: ["ski"] * 6 + ["skis"] * 4}
    assert vqa_accuracy({7: "skiing"}, answers, stem=True) == 100.0
    assert vqa_accuracy({7: "skiing"}, answers) == 0.0


# ----------------------------------------------------------------------------------------------- ROC-AUC
def test_roc_auc_equals_the_pairwise_count_with_ties_as_one_half():
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(2, 60)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) if trial % 2 else rng.random() for _ in range(n)]
        assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-9)


def test_roc_auc_of_constant_scores_is_fifty():
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == 50.0


def test_roc_auc_rejects_a_single_class_and_bad_labels():
    with pytest.raises(ValueError, match="undefined"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.2, 0.3])
