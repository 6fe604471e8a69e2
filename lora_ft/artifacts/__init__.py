"""What a run writes and how it is read back: typed manifests, the run folder and its lock, checkpoints, base-weight fingerprints, safetensors shards."""
