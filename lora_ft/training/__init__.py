"""What runs inside `loraft train`: preflight, the SFT config and Trainer, guards, progress, distributed launch."""
