"""Renamed arguments: the new name wins, the old one still works for a while and says so with a FutureWarning."""

from __future__ import annotations

import warnings


def renamed_argument(value, old_value, *, new: str, old: str, where: str):
    """An argument given under its name ``new`` or its deprecated name ``old`` (which warns)."""
    if old_value is None:
        return value
    if value is not None:
        raise ValueError(f"Give {new} or its deprecated name {old}, not both.")
    warnings.warn(f"{where}({old}=...) is deprecated; pass {new}=.", FutureWarning, stacklevel=3)
    return old_value
