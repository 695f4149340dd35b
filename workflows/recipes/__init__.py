"""Shipped recipes (YAML)."""
