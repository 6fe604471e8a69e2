"""Rows in, tokens out: reading and validating rows, chat templates and masks, near-duplicate search."""
