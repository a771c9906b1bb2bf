"""The micro model: a whole Flamingo small enough to ship inside the package (:mod:`flamingo.micro.shipped`,
loaded by the name ``"micro"``), and the synthetic world it is trained on (:mod:`flamingo.micro.world`)."""

from .shipped import MICRO_MODEL_DIR, MICRO_MODEL_NAME, resolve_model_path

__all__ = ["MICRO_MODEL_DIR", "MICRO_MODEL_NAME", "resolve_model_path"]
