"""Greedy text generation with the engine's decoder: `python launch/generate.py --prompt="..."`."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "User message.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct); "
                             "a tuned model: <train output_dir>/merged.")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapter directory (<train output_dir>/adapter) for --model.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")
_RAW = flags.DEFINE_bool("raw", False, "Feed the prompt as is, without the chat template.")


def main(argv):
    del argv
    from rcllm_jax.model import load_model
    from rcllm_jax.model.generate import greedy_generate

    m = load_model(_MODEL.value, dtype=_DTYPE.value, adapter=_ADAPTER.value)
    tok = m.tokenizer
    if _RAW.value or not tok.chat_template:
        text = _PROMPT.value
    else:
        messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else [])
        messages.append({"role": "user", "content": _PROMPT.value})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text)
    t0 = time.perf_counter()
    out = greedy_generate(m.params, m.cfg, ids, _MAX_NEW.value, tok.stop_ids)
    dt = time.perf_counter() - t0
    logging.info("prompt %d tokens, generated %d tokens in %.2fs (incl. compile), load %.2fs",
                 len(ids), len(out), dt, m.load_seconds)
    print(tok.decode(out))


if __name__ == "__main__":
    app.run(main)
