"""Where adapters go after training: each serving engine's rules (for export and preflight) and the mixed-adapter batching scheduler behind `loraft serve`."""
