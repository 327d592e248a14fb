"""Storage formats: one module per format (container, packing, dequantization, invariants, its linear module)."""
