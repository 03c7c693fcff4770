"""Pretraining and fine-tuning loops."""
