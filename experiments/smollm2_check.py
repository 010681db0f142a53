"""Check the GGUF importer on SmolLM2-135M-Instruct: perplexity and greedy chat, JAX vs PyTorch.

    python -m experiments.fetch_smollm2              # once: GGUF + text into runs/models/smollm2
    python -m experiments.smollm2_check [--out=runs/smollm2_check/results.json]

Loads the Q4_1 GGUF into the NNX decoder with `gguf_import.load_gguf` and, as an independent
reference, into transformers' LlamaForCausalLM with transformers' own GGUF loader. Reports the
perplexity of both on the first --n_tokens tokens of the 1911 Britannica entry on Shakespeare
(non-overlapping windows of --window tokens), their largest logit difference, and a greedy
answer of each to a chat prompt built with the tokenizer's chat template.
"""

import contextlib
import json
import os
import re
import time
from unittest import mock

import jax
import numpy as np
from absl import app, flags

from experiments.fetch_smollm2 import DEFAULT_OUT, GGUF_NAME, TEXT_NAME
from stride_jax.models import gguf_import, transformer


def torch_model_from_gguf(path):
    """transformers' LlamaForCausalLM (float32, eval mode) from its own GGUF loader.

    `from_pretrained` refuses GGUF files when accelerate is not installed, although its CPU path
    does not use it; accelerate is no dependency of ours, so that one check is bypassed.
    """
    import torch
    import transformers
    from transformers import modeling_utils

    path = os.path.abspath(path)
    with mock.patch.object(modeling_utils, "is_accelerate_available", return_value=True):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    return model.eval()


def britannica_text(path):
    """The article's prose: scan markers and page numbers dropped, lines joined."""
    paragraphs, lines = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("#") or re.fullmatch(r"p\.\d+:\d+", line):
                continue
            if line:
                lines.append(line)
            elif lines:
                paragraphs.append(" ".join(lines))
                lines = []
    return "\n\n".join(paragraphs + [" ".join(lines)] * bool(lines))


def windows(ids, n_tokens, window):
    """tokens_WxL: the first n_tokens ids cut into non-overlapping windows of `window`."""
    if len(ids) < n_tokens or n_tokens < window:
        raise ValueError(f"need n_tokens ({n_tokens}) <= {len(ids)} text tokens and >= window")
    n = n_tokens // window
    return np.asarray(ids[: n * window], np.int32).reshape(n, window)


def nll_from_logits(logits_WxLxV, tokens_WxL):
    """Mean next-token negative log-likelihood (nats), float64."""
    logits = np.asarray(logits_WxLxV, np.float64)[:, :-1]
    logz = np.logaddexp.reduce(logits, axis=-1)
    picked = np.take_along_axis(logits, tokens_WxL[:, 1:, None], axis=-1)[..., 0]
    return float(np.mean(logz - picked))


def jax_logits(graphdef, params, tokens_WxL):
    """logits_WxLxV of the NNX model, one jitted window at a time."""
    fwd = jax.jit(lambda p, t: transformer.apply(graphdef, p, t))
    return np.concatenate([np.asarray(fwd(params, row[None])) for row in tokens_WxL])


def torch_logits(model, tokens_WxL):
    """logits_WxLxV of the PyTorch reference, one window at a time."""
    import torch

    with torch.no_grad():
        rows = [model(torch.from_numpy(row[None]).long()).logits.numpy() for row in tokens_WxL]
    return np.concatenate(rows)


@contextlib.contextmanager
def _timed(timings, key):
    """Store the wall time of the with-block in timings[key]."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def greedy_answers(graphdef, params, ref, tokenizer, prompt, new_tokens):
    """Greedy answers of the NNX model and the PyTorch reference to one chat prompt."""
    import torch

    chat = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    prompt_1xP = np.asarray(prompt_ids["input_ids"], np.int32)[None]
    eos, P = tokenizer.eos_token_id, prompt_1xP.shape[1]
    timings = {}
    with _timed(timings, "generate_jax_s"):
        out_jax = transformer.greedy_generate(graphdef, params, prompt_1xP, new_tokens, eos)
    with _timed(timings, "generate_torch_s"), torch.no_grad():
        out_torch = ref.generate(
            torch.from_numpy(prompt_1xP).long(),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        ).numpy()
    new_jax, new_torch = np.asarray(out_jax)[0, P:].tolist(), out_torch[0, P:].tolist()
    return {
        "prompt": prompt,
        "greedy_jax": tokenizer.decode(new_jax),
        "greedy_torch": tokenizer.decode(new_torch),
        "new_tokens": len(new_jax),
        "tokens_equal": new_jax == new_torch,
        **timings,
    }


def run(gguf_path, text_path, n_tokens, window, prompts, new_tokens):
    """Results dict: perplexities, logit agreement and greedy answers of both implementations."""
    timings = {}
    with _timed(timings, "load_jax_s"):
        cfg, graphdef, params = gguf_import.load_gguf(gguf_path)
    with _timed(timings, "load_tokenizer_s"):
        tokenizer = gguf_import.gguf_tokenizer(gguf_path)
    with _timed(timings, "load_torch_s"):
        ref = torch_model_from_gguf(gguf_path)
    text = britannica_text(text_path)
    tokens_WxL = windows(tokenizer(text).input_ids, n_tokens, window)
    with _timed(timings, "score_jax_s"):
        logits_jax = jax_logits(graphdef, params, tokens_WxL)
    with _timed(timings, "score_torch_s"):
        logits_torch = torch_logits(ref, tokens_WxL)
    nll_jax = nll_from_logits(logits_jax, tokens_WxL)
    nll_torch = nll_from_logits(logits_torch, tokens_WxL)
    answers = [greedy_answers(graphdef, params, ref, tokenizer, p, new_tokens) for p in prompts]
    return {
        "gguf": os.path.abspath(gguf_path),
        "config": cfg.to_hf(),
        "text": f"{os.path.basename(text_path)}: first {tokens_WxL.size} tokens",
        "text_start": text[:300],
        "windows": list(tokens_WxL.shape),
        "scored_tokens": int(tokens_WxL.shape[0] * (tokens_WxL.shape[1] - 1)),
        "perplexity_jax": float(np.exp(nll_jax)),
        "perplexity_torch": float(np.exp(nll_torch)),
        "max_abs_logit_diff": float(np.max(np.abs(logits_jax - logits_torch))),
        "max_abs_logit": float(np.max(np.abs(logits_torch))),
        "chat_template_example": tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False
        ),
        "answers": answers,
        "timings": timings,
        "devices": [str(d) for d in jax.devices()],
    }


def define_flags():
    """Flags live here, not at import: tests import this module beside other binaries."""
    flags.DEFINE_string("gguf", os.path.join(DEFAULT_OUT, GGUF_NAME), "GGUF checkpoint.")
    flags.DEFINE_string("text", os.path.join(DEFAULT_OUT, TEXT_NAME), "Evaluation text.")
    flags.DEFINE_string("out", "runs/smollm2_check/results.json", "Results JSON.")
    flags.DEFINE_integer("n_tokens", 1024, "Tokens of text to score.")
    flags.DEFINE_integer("window", 512, "Tokens per scored window.")
    flags.DEFINE_multi_string(
        "prompt",
        ["What is the capital of France?", "Write a short poem about the sea."],
        "Chat prompt(s) to answer greedily.",
    )
    flags.DEFINE_integer("new_tokens", 30, "Greedy tokens to generate.")


def main(argv):
    FLAGS = flags.FLAGS  # noqa: N806
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for path in (FLAGS.gguf, FLAGS.text):
        if not os.path.isfile(path):
            raise app.UsageError(f"{path} not found; run python -m experiments.fetch_smollm2 first")
    results = run(
        FLAGS.gguf, FLAGS.text, FLAGS.n_tokens, FLAGS.window, FLAGS.prompt, FLAGS.new_tokens
    )
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))
    print(f"results: {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
