"""Module-name patterns as users write them: `query` (any module whose last part is query),
`encoder.layer.*.value` (glob on the full path), `re:...` (regular expression)."""
from __future__ import annotations

import fnmatch
import re


def matches(module: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    # Like PEFT's target_modules: an exact name, or a suffix on a dot boundary.
    return module == pattern or module.endswith("." + pattern)


def any_match(module: str, patterns) -> bool:
    return any(matches(module, p) for p in patterns)
