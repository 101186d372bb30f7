"""Greedy generation with ONNX Runtime, reading the model's actual inputs and outputs.

With a KV cache (``past_key_values.N.key/value`` in, ``present.N.*`` out) the prompt runs once and
each new token is one step; layers whose attention was removed simply have no cache tensors. A
model without a cache re-runs the whole sequence each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ffnfusion.core.errors import ModelRunError
from ffnfusion.runtime.onnxruntime import default_feeds


def _cache_names(session) -> list[tuple[str, str]]:
    """``(past input, present output)`` pairs, matched by layer and kind."""
    outputs = {o.name for o in session.get_outputs()}
    pairs = []
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            present = "present." + spec.name[len("past_key_values."):]
            if present not in outputs:
                raise ModelRunError(f"model takes {spec.name} but has no {present} output")
            pairs.append((spec.name, present))
    return pairs


def greedy_tokens(session, prompt_ids: np.ndarray, max_new_tokens: int,
                  eos_token_id: int | None = None, io_binding: bool | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` greedy tokens after ``prompt_ids`` (1-D), stopping at EOS.

    ``io_binding`` (default: on for a GPU provider) keeps the KV cache where the provider wrote it
    between steps instead of copying every present tensor to the host and back.
    """
    pairs = _cache_names(session)
    if io_binding is None:
        io_binding = session.get_providers()[0] != "CPUExecutionProvider"
    run = _bound_runner(session, pairs) if io_binding and pairs else _plain_runner(session)
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]
    feeds, cache = default_feeds(session, ids), dict[str, np.ndarray]()
    for _ in range(max_new_tokens):
        logits, cache = run(feeds, cache)
        token = int(logits[0, -1].argmax())
        yield token
        if token == eos_token_id:
            return
        ids = np.concatenate([ids, [[token]]], axis=1)
        if pairs:
            total = ids.shape[1]
            step = {"input_ids": ids[:, -1:], "attention_mask": np.ones((1, total), np.int64),
                    "position_ids": np.array([[total - 1]], np.int64)}
            feeds = {name: step[name] for name in (i.name for i in session.get_inputs()) if name in step}
        else:
            feeds = default_feeds(session, ids)


def _plain_runner(session):
    """``run(feeds, cache) -> (logits, cache)`` with numpy arrays on the host."""
    names = [o.name for o in session.get_outputs()]
    pairs = _cache_names(session)

    def run(feeds, cache):
        outputs = dict(zip(names, session.run(None, {**feeds, **cache})))
        return outputs["logits"], {past: outputs[present] for past, present in pairs}

    return run


def _bound_runner(session, pairs):
    """The same with IO binding: logits come to the host, presents stay on the provider's device
    and are bound as the next step's pasts."""
    device = "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"
    binding = session.io_binding()

    def run(feeds, cache):
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feeds.items():
            if name not in cache:
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for past, value in cache.items():
            binding.bind_ortvalue_input(past, value)
        binding.bind_output("logits", "cpu")
        for _, present in pairs:
            binding.bind_output(present, device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), {past: value for (past, _), value in zip(pairs, outputs[1:])}

    return run


def generate_text(session, tokenizer, prompt: str, max_new_tokens: int,
                  on_text: Callable[[str], None] | None = None) -> list[int]:
    """Greedy-decode ``prompt``; ``on_text`` receives each newly decoded piece of text as it comes."""
    prompt_ids = tokenizer(prompt, return_tensors="np")["input_ids"][0]
    tokens: list[int] = []
    shown = ""
    for token in greedy_tokens(session, prompt_ids, max_new_tokens, tokenizer.eos_token_id):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown):])  # whole characters only: a byte-level token may split one
            shown = text
    return tokens
