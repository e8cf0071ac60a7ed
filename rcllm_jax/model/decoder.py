"""Llama-family decoder as pure functions over a parameter pytree.

Every token carries an explicit position and a segment id; attention is allowed by
`attention_mask` alone, so KV blocks computed apart can later be stitched into one prompt.
Glossary (see WORKSPACE_NOTES.md): B batch, T query tokens, S key tokens, L layers, D model dim,
F MLP dim, V vocab, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.rope import apply_rope, inv_freq, layer_inv

Params = dict[str, Any]

# Segment ids. SEG_SHARED keys are visible to every query (ordinary causal text, the instruction).
# SEG_GLOBAL queries see every earlier key (glue, question). A positive id is a block whose
# queries see only their own block and SEG_SHARED keys (a block encoded apart).
SEG_SHARED = 0
SEG_GLOBAL = -1

_NEG_INF = -1e30  # finite, so a fully masked (padding) row gives no NaN


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values of S tokens, with the metadata that decides who may attend them."""

    k: jax.Array  # [L, B, S, K, H], post-RoPE at `pos`
    v: jax.Array  # [L, B, S, K, H]
    pos: jax.Array  # [B, S] int32
    seg: jax.Array  # [B, S] int32
    valid: jax.Array  # [B, S] bool; False = padding, never attended

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
        dt = jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dt),
            v=jnp.zeros(shape, dt),
            pos=jnp.zeros((batch, length), jnp.int32),
            seg=jnp.zeros((batch, length), jnp.int32),
            valid=jnp.zeros((batch, length), bool),
        )

    def concat(self, other: "KVCache") -> "KVCache":
        return jax.tree.map(lambda a, b, ax: jnp.concatenate([a, b], axis=ax), self, other,
                            KVCache(k=2, v=2, pos=1, seg=1, valid=1))

    def write(self, other: "KVCache", start) -> "KVCache":
        """Copy `other` (same B, fewer tokens) into this buffer at token index `start`."""
        def put(buf, new, axis):
            idx = [0] * buf.ndim
            idx[axis] = start
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), idx)
        return KVCache(k=put(self.k, other.k, 2), v=put(self.v, other.v, 2),
                       pos=put(self.pos, other.pos, 1), seg=put(self.seg, other.seg, 1),
                       valid=put(self.valid, other.valid, 1))


def attention_mask(q_pos, q_seg, k_pos, k_seg, k_valid, sliding_window: int | None = None):
    """May query t attend key s? [B, T, S] bool. The one definition used by every mode.

    Causal by global position (not by index), padding never attended, and the segment rule above.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    qs, ks = q_seg[:, :, None], k_seg[:, None, :]
    ok = (kp <= qp) & k_valid[:, None, :]
    ok &= (qs == ks) | (ks == SEG_SHARED) | (qs == SEG_GLOBAL)
    if sliding_window is not None:
        ok &= (qp - kp) < sliding_window
    return ok


def layer_masks(q_pos, q_seg, k_pos, k_seg, k_valid, cfg: ModelConfig):
    """`attention_mask` under the model's windows: one [B, T, S] mask for every layer, or for a model
    whose layers differ (`cfg.mixed_layers`) the pair (global layers', sliding layers') that
    `layer_mask` picks from."""
    if not cfg.mixed_layers:
        return attention_mask(q_pos, q_seg, k_pos, k_seg, k_valid, cfg.sliding_window)
    glob = attention_mask(q_pos, q_seg, k_pos, k_seg, k_valid)
    return glob, glob & ((q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window)


def layer_mask(masks, cfg: ModelConfig, i):
    """Layer i's mask from `layer_masks` (i may be traced)."""
    if not isinstance(masks, tuple):
        return masks
    if isinstance(i, int):
        return masks[1] if cfg.sliding_layers[i] else masks[0]
    return jnp.where(jnp.asarray(cfg.sliding_layers)[i], masks[1], masks[0])


def embed(params: Params, cfg: ModelConfig, tokens):
    """Token embeddings [..., D] (Gemma: times sqrt(D), rounded to the weights' dtype first)."""
    x = params["embed"][tokens]
    return x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype) if cfg.embed_scale else x


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


# Queries are processed in chunks of this many tokens, so that the f32 scores of one chunk
# ([K, G, 128, S]) stay near the caches; measured 2.7x faster than one dense [K, G, T, S] block at
# T=2048 on the 2-core CPU (WORKSPACE_NOTES.md), bit-identical results.
ATTN_Q_CHUNK = 128


def _attend_dense(q, parts, cfg: ModelConfig, with_lse: bool = False):
    """q [B, T, K, G, H] over one or more key sets parts = ((k, v, mask), ...): k, v [B, S_i, K, H],
    mask [B, T, S_i] -> [B, T, K, G, H]: one softmax over the union of the sets, without
    concatenating them (each set's scores, a shared running max, the summed denominators).
    with_lse: also its log-sum-exp [B, T, K, G] (about _NEG_INF where a row sees no key).

    Head-major batched matmuls ([B, K, T*G, H] x [B, K, S, H]): 1.4-1.8x faster on the CPU than
    contracting in the token-major layout (WORKSPACE_NOTES.md)."""
    b, t, kh, g, h = q.shape
    qq = q.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    scores = []
    for k, _, mask in parts:
        s = jnp.einsum("bkqh,bskh->bkqs", qq, k, preferred_element_type=jnp.float32)
        s = s.reshape(b, kh, t, g, -1) * cfg.attn_scale
        scores.append(jnp.where(mask[:, None, :, None, :], s, _NEG_INF))
    m = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    den, out = 0.0, 0.0
    for s, (_, v, _) in zip(scores, parts):
        e = jnp.exp(s - m)
        den = den + jnp.sum(e, axis=-1, keepdims=True)
        out = out + jnp.einsum("bkqs,bskh->bkqh", e.astype(v.dtype).reshape(b, kh, t * g, -1), v,
                               preferred_element_type=jnp.float32).reshape(b, kh, t, g, h)
    out = (out / den).astype(q.dtype).transpose(0, 2, 1, 3, 4)
    if not with_lse:
        return out
    return out, (m + jnp.log(den))[..., 0].transpose(0, 2, 1, 3)


def _attend(q, parts, cfg: ModelConfig, with_lse: bool = False):
    """q [B, T, N, H] over key sets ((k, v, mask [B, T, S_i]), ...) -> [B, T, N*H]; with_lse:
    (out [B, T, N, H], log-sum-exp [B, T, N])."""
    parts = tuple(x for x in parts if x[0].shape[1]) or parts[:1]  # an empty set adds nothing
    b, t = q.shape[:2]
    qg = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    c = ATTN_Q_CHUNK
    if t <= c:
        out = _attend_dense(qg, parts, cfg, with_lse)
    else:
        n = -(-t // c)
        pad = n * c - t  # padded query rows see nothing and are dropped
        qg = jnp.pad(qg, ((0, 0), (0, pad)) + ((0, 0),) * 3)
        qc = qg.reshape(b, n, c, *qg.shape[2:]).swapaxes(0, 1)
        mc = tuple(jnp.pad(m, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, m.shape[-1]).swapaxes(0, 1)
                   for _, _, m in parts)
        out = jax.lax.map(lambda x: _attend_dense(x[0], [(k, v, m) for (k, v, _), m in zip(parts, x[1])], cfg,
                                                  with_lse), (qc, mc))
        out = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(b, n * c, *a.shape[3:])[:, :t], out)
    if with_lse:
        o, lse = out
        return o.reshape(b, t, cfg.num_heads, cfg.head_dim), lse.reshape(b, t, cfg.num_heads)
    return out.reshape(b, t, cfg.num_heads * cfg.head_dim)


def qkv(cfg: ModelConfig, inv, x, p, positions):
    """Pre-attention half of a layer: x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] (RoPE applied)."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"], cfg.rms_eps)
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q, k = q.reshape(b, t, cfg.num_heads, cfg.head_dim), k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # per head, before RoPE (Qwen3)
        q, k = rms_norm(q, p["q_norm"], cfg.rms_eps), rms_norm(k, p["k_norm"], cfg.rms_eps)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    return q, k, v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)


def attn_mlp(cfg: ModelConfig, x, p, q, keys, vals, mask):
    """Post-projection half of a layer: attention of q over keys/vals [B, S, K, H], then the MLP."""
    return out_mlp(cfg, x, p, _attend(q, ((keys, vals, mask),), cfg))


def attend(cfg: ModelConfig, q, keys, vals, mask):
    """Attention of q [B, T, N, H] over keys/vals [B, S, K, H] under mask [B, T, S] -> [B, T, N*H]."""
    return _attend(q, ((keys, vals, mask),), cfg)


def attend_parts(cfg: ModelConfig, q, parts, with_lse: bool = False):
    """Attention of q [B, T, N, H] over the union of key sets ((keys, vals, mask [B, T, S_i]), ...)
    read where each lies (no concatenated copy) -> [B, T, N*H]; with_lse: (out [B, T, N, H],
    log-sum-exp [B, T, N]), to merge with attention over other key sets."""
    return _attend(q, tuple(parts), cfg, with_lse)


def out_mlp(cfg: ModelConfig, x, p, attn):
    """Output projection of an attention result [B, T, N*H] into the residual stream, then the MLP."""
    o = attn @ p["wo"]
    x = x + (rms_norm(o, p["post_attn_norm"], cfg.rms_eps) if cfg.sandwich_norm else o)
    h = rms_norm(x, p["mlp_norm"], cfg.rms_eps)
    gate = h @ p["w_gate"]
    gate = jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
    m = (gate * (h @ p["w_up"])) @ p["w_down"]
    return x + (rms_norm(m, p["post_mlp_norm"], cfg.rms_eps) if cfg.sandwich_norm else m)


def decoder_layer(cfg: ModelConfig, inv, x, p, positions, past_k, past_v, mask):
    """One decoder layer. Returns the new residual stream and this layer's fresh k, v."""
    q, k, v = qkv(cfg, inv, x, p, positions)
    keys = k if past_k is None else jnp.concatenate([past_k, k], axis=1)
    vals = v if past_v is None else jnp.concatenate([past_v, v], axis=1)
    return attn_mlp(cfg, x, p, q, keys, vals, mask), k, v


def lm_head(params: Params, cfg: ModelConfig, x, vocab_ids=None):
    """Final norm + vocabulary projection, f32 logits. x [..., D] -> [..., V], or only the
    columns `vocab_ids` [M] -> [..., M] (reads M rows of the projection instead of V)."""
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    if cfg.tie_embeddings:
        w = (params["embed"] if vocab_ids is None else params["embed"][vocab_ids]).T
    else:
        w = params["lm_head"] if vocab_ids is None else params["lm_head"][:, vocab_ids]
    return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits", "return_hidden"))
def forward(params: Params, tokens, positions, *, cfg: ModelConfig, segments=None, valid=None,
            cache: KVCache | None = None, logit_index=None, all_logits: bool = False,
            return_hidden: bool | str = False):
    """Run T new tokens through the decoder, attending to `cache` (earlier tokens) and themselves.

    tokens, positions, segments [B, T] int32; valid [B, T] bool (False = padding).
    Returns (logits, kv): logits [B, T, V] if all_logits, else [B, V] at `logit_index` [B]
    (default: the last valid token of each row); kv is a KVCache of the T new tokens only.
    return_hidden: return the final residual stream at `logit_index` ([B, D]) instead of logits;
    "all": at every token ([B, T, D]).
    """
    b, t = tokens.shape
    positions = positions.astype(jnp.int32)
    segments = jnp.zeros((b, t), jnp.int32) if segments is None else segments.astype(jnp.int32)
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    inv = inv_freq(cfg)
    if cache is None:
        k_pos, k_seg, k_valid = positions, segments, valid
    else:
        k_pos = jnp.concatenate([cache.pos, positions], axis=1)
        k_seg = jnp.concatenate([cache.seg, segments], axis=1)
        k_valid = jnp.concatenate([cache.valid, valid], axis=1)
    masks = layer_masks(positions, segments, k_pos, k_seg, k_valid, cfg)

    x = embed(params, cfg, tokens)  # [B, T, D]

    def body(x, xs):
        i, p, pk, pv = xs
        x, k, v = decoder_layer(cfg, layer_inv(inv, i), x, p, positions, pk, pv, layer_mask(masks, cfg, i))
        return x, (k, v)

    past = (None, None) if cache is None else (cache.k, cache.v)
    x, (k, v) = jax.lax.scan(body, x, (jnp.arange(cfg.num_layers), params["layers"], *past))
    if return_hidden == "all":
        logits = x
    elif all_logits:
        logits = lm_head(params, cfg, x)
    else:
        if logit_index is None:
            logit_index = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        x = x[jnp.arange(b), logit_index]
        logits = x if return_hidden else lm_head(params, cfg, x)
    return logits, KVCache(k=k, v=v, pos=positions, seg=segments, valid=valid)


def init_params(cfg: ModelConfig, key, scale: float = 0.02) -> Params:
    """Random parameters (for tests and synthetic benchmarks)."""
    d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"wq": (l, d, nh), "wk": (l, d, kh), "wv": (l, d, kh), "wo": (l, nh, d),
              "w_gate": (l, d, f), "w_up": (l, d, f), "w_down": (l, f, d)}
    if cfg.qkv_bias:
        shapes.update(bq=(l, nh), bk=(l, kh), bv=(l, kh))
    keys = jax.random.split(key, len(shapes) + 2)
    dt = jnp.dtype(cfg.dtype)
    layers = {n: (scale * jax.random.normal(kk, s)).astype(dt) for kk, (n, s) in zip(keys, shapes.items())}
    for n in ("attn_norm", "mlp_norm") + (("post_attn_norm", "post_mlp_norm") if cfg.sandwich_norm else ()):
        layers[n] = jnp.ones((l, d), dt)
    if cfg.qk_norm:
        layers["q_norm"] = layers["k_norm"] = jnp.ones((l, cfg.head_dim), dt)
    params = {"embed": (scale * jax.random.normal(keys[-1], (cfg.vocab_size, d))).astype(dt),
              "layers": layers, "final_norm": jnp.ones((d,), dt)}
    if not cfg.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(keys[-2], (d, cfg.vocab_size))).astype(dt)
    return params


def params_from_numpy(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Assemble the stacked parameter pytree from per-layer numpy arrays named
    `embed`, `final_norm`, `lm_head`, and `layers.{i}.{name}` (already in [in, out] layout)."""
    dt = jnp.dtype(cfg.dtype)
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    if cfg.qkv_bias:
        names += ["bq", "bk", "bv"]
    if cfg.qk_norm:
        names += ["q_norm", "k_norm"]
    if cfg.sandwich_norm:
        names += ["post_attn_norm", "post_mlp_norm"]
    layers = {}
    for n in names:
        missing = [i for i in range(cfg.num_layers) if f"layers.{i}.{n}" not in tensors]
        if missing:
            raise ValueError(f"checkpoint lacks tensor {n!r} for layers {missing[:5]}")
        layers[n] = jnp.asarray(np.stack([tensors[f"layers.{i}.{n}"] for i in range(cfg.num_layers)]), dt)
    params = {"embed": jnp.asarray(tensors["embed"], dt), "layers": layers,
              "final_norm": jnp.asarray(tensors["final_norm"], dt)}
    if not cfg.tie_embeddings:
        if "lm_head" not in tensors:
            raise ValueError("checkpoint has untied embeddings but no output (lm_head) tensor")
        params["lm_head"] = jnp.asarray(tensors["lm_head"], dt)
    return params
