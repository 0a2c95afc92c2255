"""iBOT pretraining: multi-crop augmentation, masking, heads, loss, schedules and the loop."""
