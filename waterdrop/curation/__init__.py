"""Data-curation tools that sit on top of training: noisy-label ranking (O2U-Net),
active-learning selection, and the cleaning filters run before training."""
