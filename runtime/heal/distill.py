"""The two distillation stages, as torch training loops with early stopping on held-out tokens.

* **Local** (Puzzle's blockwise local distillation): a span's FFNs alone map the original's stream
  at the span's input to the original's stream at its output. Loss: the per-token relative squared
  error ``mean_t ‖f(x_t) − y_t‖² / ‖y_t‖²`` (a plain squared error would be ruled by the few tokens
  whose stream is hundreds of times larger than the rest, the first one above all). Token by token
  (no attention inside a span), so a step costs a few FFN evaluations.
* **Global**: ``KL(teacher ‖ student)`` of the next-token distributions, the student run whole; the
  teacher's final (normed) stream is cached once and its logits recomputed per batch from it.
  Optionally (``hidden_weight`` w > 0, Puzzle's GKD) plus ``w · mean_t ‖h_t − h*_t‖² / ‖h*_t‖²`` on
  that final normed stream itself: all of its width is matched, not only what the next-token
  distribution shows of it, which is more signal from each calibration token. Held-out selection
  stays on KL alone.

Both keep the best parameters seen on held-out tokens (the initial ones included), so a stage that
does not help changes nothing.

Training steps may run their matrix products in bfloat16 (``compute_dtype``; autocast, the weights
and the optimiser stay float32): on a CPU with AVX-512 BF16 a global step takes less than half the
time (products alone ~4×), so the same minutes train on twice the tokens. ``auto`` picks bfloat16
where the hardware has it (CUDA with bf16, a CPU with AVX-512 BF16 or AMX) and float32 elsewhere,
where emulated bfloat16 would be slower. Held-out losses, and so every choice made on them, stay
float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (step, total steps, last training loss)


@dataclasses.dataclass
class Curve:
    """A stage's record: training loss per step, held-out loss at each evaluation, the best step."""

    lr: float
    steps: int = 0
    train: list[float] = dataclasses.field(default_factory=list)
    held_out: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0

    @property
    def initial(self) -> float:
        return self.held_out[0][1]

    @property
    def best(self) -> float:
        return min(loss for _, loss in self.held_out)

    def to_dict(self) -> dict:
        return {"lr": self.lr, "steps": self.steps, "best_step": self.best_step, "seconds": round(self.seconds, 1),
                "held_out_initial": round(self.initial, 6), "held_out_best": round(self.best, 6),
                "train_loss": [round(v, 6) for v in self.train],
                "held_out_loss": [[s, round(v, 6)] for s, v in self.held_out]}


def _snapshot(params: dict) -> dict:
    return {name: p.detach().clone() for name, p in params.items()}


def _restore(params: dict, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def _schedule(optimizer, step: int, total: int, lr: float, warmup: int) -> None:
    """Linear warm-up, then cosine decay to a tenth."""
    scale = (step + 1) / warmup if step < warmup else \
        0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr * scale


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_compute_dtype(compute_dtype: str, device: str) -> str:
    """``auto`` as float32 or bfloat16 for ``device``; the others as they are."""
    import torch

    if compute_dtype != "auto":
        return compute_dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    cpu = torch.cpu
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return "bfloat16" if native else "float32"


def autocast(device, compute_dtype: str):
    """The context a training forward runs in: float32 as is, or bfloat16 autocast on ``device``."""
    import contextlib

    import torch

    if compute_dtype == "float32":
        return contextlib.nullcontext()
    assert compute_dtype == "bfloat16", compute_dtype  # HealOptions are checked before any work
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _step(optimizer, loss, curve: Curve, total: int, progress: Progress | None) -> None:
    """One optimiser step on ``loss``, recorded."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    curve.steps += 1
    curve.train.append(loss.item())
    if progress:
        progress(curve.steps, total, curve.train[-1])


def relative_error(hidden, target):
    """Mean over tokens of ``‖h − h*‖² / ‖h*‖²`` (``[..., hidden]``): the local stage's loss and
    the global stage's final-stream term."""
    return (((hidden - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)).mean()


def train_span(units: Sequence, params: dict, x_fit, y_fit, x_held, y_held, *, lr: float, epochs: int,
               batch: int = 512, patience: int = 2, seed: int = 0, compute_dtype: str = "float32",
               progress: Progress | None = None) -> Curve:
    """Local stage for one span: ``units`` are decoder layers whose FFN updates run in sequence;
    ``params`` the parameters trained (left at the best held-out state)."""
    import torch

    def run(x):
        for unit in units:
            x = x + unit.mlp(unit.post_attention_layernorm(x))
        return x

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(relative_error(run(x_held[i:i + 4096]), y_held[i:i + 4096])) * len(x_held[i:i + 4096])
                       for i in range(0, len(x_held), 4096)) / len(x_held)

    curve = Curve(lr)
    clock = time.perf_counter()
    best, best_state, stale = held_out(), _snapshot(params), 0
    curve.held_out.append((0, best))
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(x_fit) // batch)
    total = epochs * per_epoch
    for _ in range(epochs):
        order = torch.randperm(len(x_fit), generator=generator)
        for k in range(per_epoch):
            rows = order[k * batch:(k + 1) * batch]
            _schedule(optimizer, curve.steps, total, lr, max(1, total // 20))
            with autocast(x_fit.device, compute_dtype):
                loss = relative_error(run(x_fit[rows]), y_fit[rows])
            _step(optimizer, loss.float(), curve, total, progress)
        current = held_out()
        curve.held_out.append((curve.steps, current))
        if current < best:
            best, best_state, stale, curve.best_step = current, _snapshot(params), 0, curve.steps
        else:
            stale += 1
            if stale >= patience:
                break
    _restore(params, best_state)
    curve.seconds = time.perf_counter() - clock
    return curve


def next_token_kl(student_logits, teacher_logits):
    """Mean ``KL(teacher ‖ student)`` over positions, from logits ``[..., vocab]``."""
    import torch

    teacher = torch.log_softmax(teacher_logits.float(), -1)
    student = torch.log_softmax(student_logits.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@dataclasses.dataclass
class GlobalData:
    """Token windows and the teacher's final normed stream for them (``[n, seq, hidden]``)."""

    fit_ids: Any  # torch int64 [n, seq]
    fit_final: Any  # torch float [n, seq, hidden]
    held_ids: dict[str, Any]  # source -> [m, seq]
    held_final: dict[str, Any]


def held_out_kl(model, head, data: GlobalData, batch: int) -> dict[str, float]:
    """``KL(teacher ‖ model)`` per calibration source on its held-out windows."""
    import torch

    result = {}
    with torch.no_grad():
        for name, ids in data.held_ids.items():
            total = 0.0
            for i in range(0, len(ids), batch):
                logits = model(input_ids=ids[i:i + batch]).logits
                total += float(next_token_kl(logits, head(data.held_final[name][i:i + batch]))) * len(ids[i:i + batch])
            result[name] = total / len(ids)
    return result


def train_global(model, head, params: dict, data: GlobalData, *, lr: float, epochs: int, batch: int,
                 eval_every: int, hidden_weight: float = 0.0, patience: int = 3, seed: int = 0,
                 compute_dtype: str = "float32", progress: Progress | None = None,
                 on_eval: Callable[[int, dict], None] | None = None) -> tuple[Curve, dict[str, float], dict[str, float]]:
    """Global stage: ``params`` of ``model`` trained on KL to the teacher's next-token distributions.
    Returns the curve, the per-source held-out KL before, and at the best state (which is restored)."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    curve = Curve(lr)
    clock = time.perf_counter()
    model.eval()  # no dropout in these models; eval also keeps attention kernels deterministic
    before = held_out_kl(model, head, data, batch)
    best = float(np.mean(list(before.values())))
    best_state, best_kl, stale = _snapshot(params), dict(before), 0
    curve.held_out.append((0, best))
    if on_eval:
        on_eval(0, before)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(data.fit_ids) // batch)
    total = epochs * per_epoch
    stop = False
    for _ in range(epochs):
        order = torch.randperm(len(data.fit_ids), generator=generator)
        for k in range(per_epoch):
            rows = order[k * batch:(k + 1) * batch]
            _schedule(optimizer, curve.steps, total, lr, max(1, total // 20))
            target_final = data.fit_final[rows]
            with autocast(target_final.device, compute_dtype):
                final = model.model(input_ids=data.fit_ids[rows]).last_hidden_state
                with torch.no_grad():
                    target = head(target_final)
                loss = next_token_kl(model.lm_head(final), target)
                if hidden_weight:
                    loss = loss + hidden_weight * relative_error(final.float(), target_final)
            _step(optimizer, loss, curve, total, progress)
            if curve.steps % eval_every == 0 or curve.steps == total:
                kl = held_out_kl(model, head, data, batch)
                mean = float(np.mean(list(kl.values())))
                curve.held_out.append((curve.steps, mean))
                if on_eval:
                    on_eval(curve.steps, kl)
                if mean < best:
                    best, best_state, best_kl, stale, curve.best_step = mean, _snapshot(params), kl, 0, curve.steps
                else:
                    stale += 1
                    if stale >= patience:
                        stop = True
                        break
        if stop:
            break
    _restore(params, best_state)
    for p in params.values():
        p.requires_grad_(False)
    curve.seconds = time.perf_counter() - clock
    return curve, before, best_kl
