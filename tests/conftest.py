"""Shared test configuration.

Hypothesis runs derandomized with a modest example count, so every run draws the same examples
and the suite stays fast. ``HYPOTHESIS_PROFILE=thorough`` digs deeper when hunting a bug.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "fednode", derandomize=True, database=None, deadline=None, max_examples=40
)
settings.register_profile("thorough", deadline=None, max_examples=2_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fednode"))
