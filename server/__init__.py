"""Flower ServerApp of fed_unlearn: strategy, pipeline, unlearning orchestration."""
