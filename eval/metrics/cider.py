"""CIDEr as pycocoevalcap's ``COCOEvalCap`` reports it (the "CIDEr" of every captioning paper), x100.

Steps, each matching pycocoevalcap 1.2 (``cider/cider_scorer.py``):

* captions and references are PTB-tokenised, lowercased and stripped of punctuation (``ptb_tokenize``);
* n-grams for n = 1..4; document frequency = number of images whose references contain the n-gram, counted over the
  evaluated set only, and idf = log(number of images) - log(max(1, df));
* per n, the cosine similarity of tf-idf vectors with the candidate's weights clipped at the reference's
  (the "-D" in CIDEr-D), times a Gaussian length penalty exp(-delta^2 / (2 * 6^2));
* averaged over n and over references, times 10; then averaged over images.

One quirk is kept deliberately: pycocoevalcap measures "length" as the number of bigrams (its ``n == 1`` test is on
a 0-based n-gram index), so delta is the difference of bigram counts, not word counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from .ptb_tokenizer import ptb_tokenize_batch

N = 4
SIGMA = 6.0


def _ngrams(words: list[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, N + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def cider_scores(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, float]:
    """Per-image CIDEr-D (x10 scale, as pycocoevalcap) of already tokenised candidates against tokenised references."""
    ids = list(references)
    ref_counts = {i: [_ngrams(r.split()) for r in references[i]] for i in ids}
    document_frequency: Counter = Counter()
    for i in ids:
        document_frequency.update({gram for counts in ref_counts[i] for gram in counts})
    log_images = math.log(float(len(ids)))

    def vectorise(counts: Counter):
        vec = [{} for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = float(tf) * (log_images - math.log(max(1.0, document_frequency[gram])))
            vec[n][gram] = weight
            norm[n] += weight**2
            if n == 1:  # pycocoevalcap's length: the bigram count (see the module docstring)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = {}
    for i in ids:
        vec, norm, length = vectorise(_ngrams(candidates[i].split()))
        total = [0.0] * N
        for counts in ref_counts[i]:
            vec_ref, norm_ref, length_ref = vectorise(counts)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * SIGMA**2))
            for n in range(N):
                value = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_ref[n] != 0:
                    value /= norm[n] * norm_ref[n]
                total[n] += value * penalty
        scores[i] = sum(total) / N / len(ref_counts[i]) * 10.0
    return scores


def cider(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D x100 of ``predictions`` (image id -> caption) against ``references`` (image id -> captions).

    Scores the images of ``references``; each needs a prediction and at least one reference. Raw text is fine: both
    sides are PTB-tokenised here, as COCOEvalCap does.
    """
    if not references:
        raise ValueError("cider: no images to score")
    missing = [i for i in references if i not in predictions]
    if missing:
        raise ValueError(f"cider: no prediction for {len(missing)} image(s), e.g. {missing[:5]}")
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"cider: no reference captions for image(s) {empty[:5]}")
    ids = list(references)
    # Two tokenizer batches in COCOEvalCap's order (references image by image, then the predictions): CoreNLP's
    # look-ahead can cross caption boundaries, so the order is part of the result.
    flat_refs = ptb_tokenize_batch([r for i in ids for r in references[i]])
    candidates = dict(zip(ids, ptb_tokenize_batch([predictions[i] for i in ids])))
    tokenized_refs, start = {}, 0
    for i in ids:
        tokenized_refs[i] = flat_refs[start : start + len(references[i])]
        start += len(references[i])
    scores = cider_scores(candidates, tokenized_refs)
    return 100.0 * sum(scores.values()) / len(scores)
