"""Evaluation: comparing strategies across seeds."""
