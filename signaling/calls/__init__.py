"""Calls (docs/api.md §5): the state table, and the registry that applies it."""
