"""Shared test set-up: real database servers come from the ``servers`` plugin (servers.py)."""

pytest_plugins = ["servers", "pytester"]
