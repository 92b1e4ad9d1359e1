"""Metrics (numpy only), plots and the evaluation of a trained model."""
