"""Continuous learning: rounds (settings, bookkeeping, one module per stage, the runner),
the gates, the replay reservoir, trigger policies and the round lock."""
