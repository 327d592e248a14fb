"""Pure quantization math: activation quantizers and weight scale choosers (functions of tensors)."""
