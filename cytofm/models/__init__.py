"""The Vision Transformer backbone, projection heads and checkpoint loading."""
