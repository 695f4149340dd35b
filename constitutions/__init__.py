"""YAML constitutions: data, not code."""
