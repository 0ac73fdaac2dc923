"""Building blocks shared by every model family.

- `linear`: `Linear` (math delegated to a quant method, adapter hooks) and checkpoint-name loading helpers.
- `attention`: `PagedAttention` over packed tokens (batched SDPA path and its per-sequence reference twin).
- `rotary`: RoPE tables and the `rope_scaling` variants.
- `norm`, `activation`, `embedding`: RMSNorm, `hidden_act` functions, the token embedding.
"""
