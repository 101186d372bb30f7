"""Latency of ONNX models side by side: ``benchmark(paths, shapes) -> list of rows``.

Runs are interleaved (A B, B A, A B, ...: who goes first rotates) after a warm-up so that the machine's drift hits every model
alike; each row reports the median and the interquartile spread, and the ratio of its median to the
first model's. Prefill feeds ``batch × seq`` tokens with an empty KV cache; decode (models with a KV
cache) times single-token steps after a prefill of ``seq`` tokens.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import numpy as np

from ffnfusion.runtime.onnxruntime import create_session, default_feeds


@dataclasses.dataclass
class BenchRow:
    model: str
    batch: int
    seq: int
    phase: str  # "prefill" | "decode"
    median_ms: float
    p25_ms: float
    p75_ms: float
    ratio_to_first: float = 1.0
    tokens_per_s: float = 0.0


def _decode_feeds(session, input_ids: np.ndarray, warm: list[np.ndarray]) -> dict:
    """One-token step after a prefill of ``input_ids`` whose presents are ``warm``."""
    batch, seq = input_ids.shape
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    feeds = {"input_ids": input_ids[:, -1:], "attention_mask": np.ones((batch, seq + 1), np.int64),
             "position_ids": np.full((batch, 1), seq, np.int64), **dict(zip(past_names, warm))}
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def benchmark(paths: list[str], batches: list[int], seqs: list[int], *, repeats: int = 20, warmup: int = 3,
              decode: bool = False, threads: int | None = None, vocab: int = 128,
              provider: str = "cpu") -> tuple[list[BenchRow], float]:
    """Returns the rows and the process's peak RSS in GiB."""
    sessions = [create_session(path, threads=threads, provider=provider) for path in paths]
    rng = np.random.default_rng(0)
    rows: list[BenchRow] = []
    for batch in batches:
        for seq in seqs:
            input_ids = rng.integers(0, vocab, (batch, seq))
            feeds = [default_feeds(s, input_ids) for s in sessions]
            phases = [("prefill", feeds)]
            if decode:
                step_feeds: list[dict] = []
                for session, feed in zip(sessions, feeds):
                    if not any(i.name.startswith("past_key_values") for i in session.get_inputs()):
                        step_feeds = []  # a model without a KV cache: no decode phase for any
                        break
                    warm = session.run(None, feed)[1:]
                    step_feeds.append(_decode_feeds(session, input_ids, warm))
                if step_feeds:
                    phases.append(("decode", step_feeds))
            for phase, phase_feeds in phases:
                times: list[list[float]] = [[] for _ in sessions]
                for round_index in range(warmup + repeats):
                    # rotate who goes first: a run can warm the caches for the next one
                    for step in range(len(sessions)):
                        index = (round_index + step) % len(sessions)
                        session, feed = sessions[index], phase_feeds[index]
                        start = time.perf_counter()
                        session.run(None, feed)
                        if round_index >= warmup:
                            times[index].append((time.perf_counter() - start) * 1000)
                first = float(np.median(times[0]))
                for path, samples in zip(paths, times):
                    median = float(np.median(samples))
                    tokens = batch * (seq if phase == "prefill" else 1)
                    rows.append(BenchRow(str(path), batch, seq, phase, median, float(np.percentile(samples, 25)),
                                         float(np.percentile(samples, 75)), median / first, tokens / median * 1000))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rows, peak_gib


def format_rows(rows: list[BenchRow]) -> str:
    lines = ["| model | batch | seq | phase | median ms | p25-p75 ms | tokens/s | ratio to first |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.model} | {row.batch} | {row.seq} | {row.phase} | {row.median_ms:.2f} | "
                     f"{row.p25_ms:.2f}-{row.p75_ms:.2f} | {row.tokens_per_s:.0f} | {row.ratio_to_first:.3f} |")
    return "\n".join(lines)
