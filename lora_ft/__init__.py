"""loraft: fine-tune causal language models with LoRA/QLoRA from one YAML file."""

__version__ = "0.1.0"
