"""Declaring a configuration option: a dataclass field whose metadata carries its help text and bounds.

Kept apart from config.py so pure-logic modules (sweep tracking) can declare their own settings, which the
run configuration then takes over as a section without restating them.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "min": min, "max": max})
