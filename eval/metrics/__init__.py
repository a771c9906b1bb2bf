"""Benchmark metrics: CIDEr-D (with PTB tokenisation), VQA accuracy (official evaluator, optional OK-VQA stemming),
ROC-AUC. All return percentages, as the papers report them."""

from .cider import cider
from .ptb_tokenizer import ptb_tokenize
from .roc_auc import roc_auc
from .vqa import normalize_answer, question_accuracy, vqa_accuracy

__all__ = ["cider", "ptb_tokenize", "roc_auc", "vqa_accuracy", "question_accuracy", "normalize_answer"]
