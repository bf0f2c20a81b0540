"""Module-level settings, as a script's config module holds them (read by tests of followed globals)."""

L1_WEIGHT = 0.0
