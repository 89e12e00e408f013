"""Evaluation of a saved checkpoint at any layout (bloom-eval)."""
