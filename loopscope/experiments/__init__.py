"""Experiments: analyses combined for a model and a task (what the CLI and the paper call)."""
