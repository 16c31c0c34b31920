"""Fixtures of the fine-tuning tests: tiny checkpoints written once per session (tiny_hf)."""

from tiny_hf import tiny_bert, tiny_llama  # noqa: F401  (fixtures)
