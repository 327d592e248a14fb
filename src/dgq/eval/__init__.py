"""Evaluation: perplexity on text (``perplexity``) and zero-shot multiple-choice tasks (``tasks``)."""
