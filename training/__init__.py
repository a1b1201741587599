"""Torch training and evaluation: decoder, MLP memory, perplexity report."""
