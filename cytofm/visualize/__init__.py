"""Figures: attention maps, MIL heatmaps and embedding maps."""
