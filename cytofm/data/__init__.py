"""Image decoding, pretraining datasets, multiple-instance bags and the synthetic demo set."""
