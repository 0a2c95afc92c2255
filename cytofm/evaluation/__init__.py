"""Downstream evaluation: feature extraction, ABMIL and cross-validation."""
