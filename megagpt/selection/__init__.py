"""Data selection: per-document scores of a training corpus (perplexity, TracIn influence) and selection rules."""
