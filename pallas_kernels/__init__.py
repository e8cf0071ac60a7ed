"""Pallas kernels for the hot paths of block stitching, each with a pure-JAX reference in its
module: `selective_attention` (few queries at arbitrary positions over stitched, ragged KV),
`gather_rerotate` (block-store gather fused with RoPE re-rotation), `paged_attention` (queries
over cached pages where they are stored, through a block table; not yet used by the engine).
The kernels take everything they need as arguments and import nothing of `rcllm_jax`;
`rcllm_jax.kernels` picks kernel or reference per backend (`--attention_impl=auto|pallas|xla`)."""
