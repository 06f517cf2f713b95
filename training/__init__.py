"""Datasets, synthetic boards, AOI candidates, samplers, augmentation, models, losses and the training loop."""
