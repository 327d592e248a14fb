"""Evaluation: perplexity on text (and, later, zero-shot tasks)."""
