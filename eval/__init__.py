"""Evaluation entry points (import name: flamingo_eval)."""
