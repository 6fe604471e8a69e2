"""The model side: loading bases (Hub, folder, GGUF), attaching LoRA, memory and speed planning, fused LoRA ops and their kernels."""
