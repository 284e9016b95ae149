"""The language: grammar, parser, IR, checks and the symbolic shapes (no torch, no triton)."""
