"""Model assembly: timm trunk cut into feature levels, CBAM, per-task BatchNorm, heads."""
