"""Pallas kernels for the hot paths of block stitching, each with a pure-JAX reference in its
module: `gather_rerotate` (block-store gather fused with RoPE re-rotation) and `paged_attention`
(queries over cached pages where they are stored, through a block table; the engine's Pallas path
attends the user prefix and stored spans with it). `masked_attention` is the dense definition
both references and the engine's XLA paths share. The kernels take everything they need as
arguments and import nothing of `rcllm_jax`; `rcllm_jax.kernels` picks kernel or reference per
backend (`--attention_impl=auto|pallas|xla`)."""
