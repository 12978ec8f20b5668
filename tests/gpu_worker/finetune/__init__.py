"""Tests of the fine-tuning package."""
