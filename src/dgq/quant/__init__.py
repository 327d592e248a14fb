"""The algorithm package: pure quantization math as functions of tensors (RTN and DGQ scales, the two-phase
search, smoothing factors, GPTQ, AWQ, the peers' data-free quantizers). Runtime code (formats, kernels, checkpoints)
never imports it."""
