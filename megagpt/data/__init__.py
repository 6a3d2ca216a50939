"""Data: indexed token files, tokenizers, preprocessing, sample indices and blending."""
