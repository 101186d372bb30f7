"""``heal_model_file``: distil a reduced model back toward its original, safely, into the same graph.

The paper never ships a fused model untrained (Puzzle and Ultra are distilled after FFN Fusion);
this is that stage at calibration scale:

1. teacher (the original) and student (the reduced model: removed sublayers, fused groups, refits)
   as torch modules built from their ONNX files (:mod:`.student`);
2. the student's changes as spans of sublayers (:func:`~.student.changed_spans`);
3. **local**: each span's FFNs alone learn the original's stream at the span's output from the
   original's stream at its input (inputs captured once, on disk);
4. **global**: ``KL(teacher ‖ student)`` on next-token distributions, the changed FFNs trainable
   (``train="all"``: every decoder weight);
5. **safe**: each calibration source keeps held-out windows; both stages stop early on them, and the
   healed weights are kept only where they lower KL to the original on *every* source's held-out
   windows — spans that make any source worse go back to their input weights, and when none helps
   the output equals the input and the report says so;
6. the kept values are written into the student's own initializers (:func:`~.student.write_back`):
   same graph, same checks (``check-trt``, ``export-hf``, ``verify``).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.files import staged_directory
from ffnfusion.core.model_io import model_file
from ffnfusion.runtime import calibration
from ffnfusion.runtime.heal import distill
from ffnfusion.runtime.heal.student import (
    Span,
    changed_spans,
    check_parent,
    check_parent_configs,
    check_trainable,
    fold_ungained_norms,
    load_torch_model,
    trainable_parameters,
    write_back,
)

logger = logging.getLogger(__name__)

# Broad English plus code (README: "Calibration data"); the perplexity texts are neither.
DEFAULT_SOURCES = ("brown", "wikipedia", "sotu", "python-docs")
DEFAULT_TOKENS = 32768
DEFAULT_SELECT_TOKENS = 1024  # held out per source


@dataclasses.dataclass(frozen=True)
class HealOptions:
    tokens: int = DEFAULT_TOKENS  # fitting tokens, split over the sources
    select_tokens: int = DEFAULT_SELECT_TOKENS
    window: int = calibration.DEFAULT_WINDOW
    local_epochs: int = 8
    local_lr: float = 3e-4
    global_epochs: int = 2
    global_lr: float = 3e-5
    hidden_weight: float = 0.0  # global stage: weight of the final-stream term beside KL
    batch_windows: int = 2
    eval_every: int = 16
    train: str = "changed"  # or "all"
    stages: tuple[str, ...] = ("local", "global")
    device: str = "cpu"
    compute_dtype: str = "auto"  # training matrix products: float32, bfloat16 (autocast), or auto
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class HealReport:
    spans: list[Span]
    sources: dict[str, dict[str, int]]  # name -> fit/held-out tokens
    local: dict[int, distill.Curve]  # span index -> curve
    global_curve: distill.Curve | None
    kl_input: dict[str, float]  # held-out KL(original ‖ input model) per source
    kl_healed: dict[str, float]  # ... of the trained model, before the safety check
    kl_output: dict[str, float]  # ... of what was written
    kept_spans: list[int]
    reverted_spans: list[int]
    written: list[str]
    options: HealOptions
    seconds: dict[str, float]

    @property
    def changed(self) -> bool:
        return bool(self.written)

    def describe(self) -> str:
        if not self.changed:
            return ("kept the input weights: no healed state lowered KL to the original on every source's held-out "
                    "tokens")
        kl = ", ".join(f"{name} {self.kl_input[name]:.4f} -> {self.kl_output[name]:.4f}" for name in self.kl_input)
        return f"healed {len(self.kept_spans)} of {len(self.spans)} span(s); held-out KL {kl}"

    def to_dict(self) -> dict:
        return {"changed": self.changed, "summary": self.describe(), "options": self.options.to_dict(),
                "sources": self.sources, "spans": [s.to_dict() for s in self.spans],
                "kept_spans": self.kept_spans, "reverted_spans": self.reverted_spans,
                "held_out_kl": {"input": _rounded(self.kl_input), "healed": _rounded(self.kl_healed),
                                "output": _rounded(self.kl_output)},
                "local": {str(i): c.to_dict() for i, c in self.local.items()},
                "global": self.global_curve.to_dict() if self.global_curve else None,
                "written_tensors": len(self.written), "seconds": self.seconds}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


def heal_sources(model_dir: pathlib.Path, texts: Sequence[str] = (), ids_files: Sequence[str] = (), *,
                 options: HealOptions) -> list[calibration.CalibrationSource]:
    return calibration.repair_sources(model_dir, texts=texts, ids_files=ids_files, tokens=options.tokens,
                                      window=options.window, select_tokens=options.select_tokens,
                                      default=DEFAULT_SOURCES)


StageProgress = Callable[[str, int, int, float], None]  # (stage, step, steps, training loss)


def heal(model_path, reference_path, sources: Sequence[calibration.CalibrationSource], options: HealOptions,
         progress: StageProgress | None = None):
    """Train ``model_path`` toward ``reference_path``; returns ``(values, report)``: checkpoint-named
    float32 arrays to write (empty when nothing is kept) and the report. Writes nothing."""
    import torch

    path, reference = _checked_inputs(model_path, reference_path, options)
    options = dataclasses.replace(options, compute_dtype=distill.resolve_compute_dtype(options.compute_dtype,
                                                                                       options.device))
    logger.info(f"heal: training products in {options.compute_dtype} on {options.device}")
    torch.manual_seed(options.seed)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ffnfusion-heal-") as tmp:
        work = pathlib.Path(tmp)
        teacher = load_torch_model(reference, work / "teacher", options.device)
        student = load_torch_model(path, work / "student", options.device)
        check_parent(student, teacher)
        spans = changed_spans(student, teacher)
        seconds["load"] = round(time.perf_counter() - clock, 1)
        logger.info(f"heal: {len(spans)} changed span(s): " + "; ".join(s.describe() for s in spans))
        initial = {name: p.detach().clone() for name, p in student.module.named_parameters()}
        fit = np.concatenate([s.fit for s in sources])
        held = {s.name: s.select for s in sources}
        device = options.device
        fit_ids = torch.from_numpy(fit).to(device)
        held_ids = {name: torch.from_numpy(ids).to(device) for name, ids in held.items()}
        clock = time.perf_counter()
        positions = sorted({p for s in spans for p in (s.start, s.stop)})
        fit_streams, fit_final = _capture(teacher, fit_ids, positions, work / "fit", options.batch_windows)
        captured = {name: _capture(teacher, ids, positions, work / f"held-{name}", options.batch_windows)
                    for name, ids in held_ids.items()}
        held_streams = {name: streams for name, (streams, _) in captured.items()}
        held_final = {name: final for name, (_, final) in captured.items()}
        seconds["capture"] = round(time.perf_counter() - clock, 1)

        local: dict[int, distill.Curve] = {}
        if "local" in options.stages:
            clock = time.perf_counter()
            local = _local_stage(student, spans, fit_streams, held_streams, options, progress)
            seconds["local"] = round(time.perf_counter() - clock, 1)

        head = _head(teacher)
        data = distill.GlobalData(fit_ids, torch.from_numpy(np.asarray(fit_final)).to(device), held_ids,
                                  {n: torch.from_numpy(np.asarray(v)).to(device) for n, v in held_final.items()})
        kl_input = _kl_with(student, initial, head, data, options.batch_windows)
        global_curve = None
        if "global" in options.stages:
            clock = time.perf_counter()
            global_curve = _global_stage(student, spans, head, data, options, progress)
            seconds["global"] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        kl_healed = distill.held_out_kl(student.module, head, data, options.batch_windows)
        kept, reverted, kl_output = _keep_where_better(student, spans, initial, head, data, kl_input, kl_healed,
                                                       options)
        seconds["selection"] = round(time.perf_counter() - clock, 1)
        fold_ungained_norms(student)
        values = {name: p.detach().float().cpu().numpy() for name, p in student.module.named_parameters()
                  if not torch.equal(p.detach().cpu(), initial[name].cpu())} if kept else {}
        del fit_streams, held_streams, fit_final, held_final
    report = HealReport(spans, {s.name: {"fit_tokens": int(s.fit.size), "held_out_tokens": int(s.select.size)}
                                for s in sources}, local, global_curve, kl_input, kl_healed, kl_output, kept, reverted,
                        sorted(values), options, seconds)
    return values, report


def _checked_inputs(model_path, reference_path, options: HealOptions) -> tuple[pathlib.Path, pathlib.Path]:
    """The model and reference files, once the options and the model are known to allow a heal."""
    import torch

    if options.train not in ("changed", "all"):
        raise InvalidArgumentError(f"--train must be 'changed' or 'all', not {options.train!r}")
    unknown = set(options.stages) - {"local", "global"}
    if unknown or not options.stages:
        raise InvalidArgumentError(f"stages must be among local, global (got {', '.join(options.stages) or 'none'})")
    if options.compute_dtype not in distill.COMPUTE_DTYPES:
        raise InvalidArgumentError(f"compute dtype must be one of {', '.join(distill.COMPUTE_DTYPES)}, not "
                                   f"{options.compute_dtype!r}")
    if options.hidden_weight < 0:
        raise InvalidArgumentError(f"--hidden-weight must be at least 0, not {options.hidden_weight}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: torch sees no CUDA device here; use --device cpu")
    path, reference = model_file(model_path), model_file(reference_path)
    if path.resolve() == reference.resolve():
        raise InvalidArgumentError("the model and its --reference are the same file")
    check_parent_configs(path.parent, reference.parent)
    check_trainable(path)
    return path, reference


def _local_stage(student, spans: Sequence[Span], fit_streams, held_streams, options: HealOptions,
                 progress: StageProgress | None) -> dict[int, distill.Curve]:
    """Each span with FFNs of its own trained alone on the teacher's streams at its ends."""
    import torch

    def rows(streams, position):
        return torch.from_numpy(np.asarray(streams[position]).reshape(-1, streams[position].shape[-1])).to(
            options.device)

    curves = {}
    for index, span in enumerate(spans):
        if not span.units:
            continue
        params = trainable_parameters(student, span.units, "changed")
        for p in params.values():
            p.requires_grad_(True)
        x_held = torch.cat([rows(streams, span.start) for streams in held_streams.values()])
        y_held = torch.cat([rows(streams, span.stop) for streams in held_streams.values()])
        curve = distill.train_span([student.decoder_layer(u) for u in span.units], params,
                                   rows(fit_streams, span.start), rows(fit_streams, span.stop), x_held, y_held,
                                   lr=options.local_lr, epochs=options.local_epochs, seed=options.seed + index,
                                   compute_dtype=options.compute_dtype,
                                   progress=_stage(progress, f"local {index}"))
        for p in params.values():
            p.requires_grad_(False)
        curves[index] = curve
        logger.info(f"heal: local, span {span.describe()}: held-out error {curve.initial:.4f} -> "
                    f"{curve.best:.4f} ({curve.steps} steps, best at {curve.best_step}, {curve.seconds:.0f} s)")
    return curves


def _global_stage(student, spans: Sequence[Span], head, data: distill.GlobalData, options: HealOptions,
                  progress: StageProgress | None) -> distill.Curve | None:
    """KL to the teacher with the changed FFNs (or, ``train="all"``, every decoder weight) trainable;
    None when there is nothing to train."""
    units = sorted({u for s in spans for u in s.trained})
    params = trainable_parameters(student, units, options.train)
    if not params:
        logger.info("heal: global: nothing to train (no changed FFN)")
        return None

    def on_eval(step: int, kl: dict) -> None:
        logger.info(f"heal: global, step {step}: held-out KL " + ", ".join(f"{k} {v:.4f}" for k, v in kl.items()))

    curve, _, _ = distill.train_global(
        student.module, head, params, data, lr=options.global_lr, epochs=options.global_epochs,
        batch=options.batch_windows, eval_every=options.eval_every, hidden_weight=options.hidden_weight,
        seed=options.seed, compute_dtype=options.compute_dtype, progress=_stage(progress, "global"), on_eval=on_eval)
    return curve


def _stage(progress: StageProgress | None, stage: str) -> distill.Progress | None:
    return None if progress is None else lambda done, total, loss: progress(stage, done, total, loss)


def _capture(teacher, ids, positions: Sequence[int], where: pathlib.Path, batch: int):
    """The teacher's stream at ``positions`` (memory-mapped ``[n, seq, hidden]`` each, on disk) and
    its final normed stream, for token windows ``ids``."""
    import torch

    from ffnfusion.exporters.llama_surgery import decoder_layers

    where.mkdir(parents=True)
    n, seq = ids.shape
    hidden = teacher.config["hidden_size"]
    layers = decoder_layers(teacher.module)
    streams = {p: np.lib.format.open_memmap(where / f"{p}.npy", "w+", np.float32, (n, seq, hidden)) for p in positions}
    final = np.lib.format.open_memmap(where / "final.npy", "w+", np.float32, (n, seq, hidden))
    rows = slice(0, 0)

    def keep(position):
        def hook(_module, args, kwargs=None):
            value = args[0] if args else kwargs["hidden_states"]
            streams[position][rows] = value.detach().float().cpu().numpy()
        return hook

    handles = []
    for p in positions:
        if p == 2 * len(layers):
            module = teacher.module.model.norm
        elif p % 2 == 0:
            module = layers[p // 2]
        else:
            module = layers[p // 2].post_attention_layernorm
        handles.append(module.register_forward_pre_hook(keep(p), with_kwargs=True))

    def keep_final(_module, _args, output):
        final[rows] = output.detach().float().cpu().numpy()

    handles.append(teacher.module.model.norm.register_forward_hook(keep_final))
    try:
        with torch.no_grad():
            for i in range(0, n, batch):
                rows = slice(i, min(n, i + batch))
                teacher.module.model(input_ids=ids[rows])
    finally:
        for handle in handles:
            handle.remove()
    return streams, final


def _head(teacher):
    """Teacher logits from its cached final normed stream (its own head)."""
    weight = teacher.module.lm_head.weight

    def head(final):
        return final @ weight.T
    return head


def _kl_with(student, state: dict, head, data, batch: int) -> dict[str, float]:
    """Held-out KL of the student with ``state``'s values (restored afterwards)."""
    import torch

    named = dict(student.module.named_parameters())
    current = {name: p.detach().clone() for name, p in named.items()}
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name])
        kl = distill.held_out_kl(student.module, head, data, batch)
        for name, p in named.items():
            p.copy_(current[name])
    return kl


def _keep_where_better(student, spans, initial, head, data, kl_input, kl_healed, options):
    """Keep the healed values where every source's held-out KL is lower than the input's; otherwise
    put back, one span at a time, the span whose reverting helps the worst source most, until every
    source improves or no span is left."""
    import torch

    named = dict(student.module.named_parameters())

    def improves(kl):
        return all(kl[name] < kl_input[name] for name in kl_input)

    def worst(kl):
        return max(kl[name] / kl_input[name] for name in kl_input)

    candidates = [i for i, s in enumerate(spans) if s.trained]
    kept, reverted, kl = list(candidates), [], kl_healed
    if options.train == "all" and not improves(kl):
        kept, kl = [], kl_input  # weights outside the spans changed too: all or nothing
    while kept and not improves(kl):
        trials = []
        for index in kept:
            names = trainable_parameters(student, spans[index].trained, "changed")
            state = {n: (initial[n] if n in names else p.detach()) for n, p in named.items()}
            trials.append((worst(_kl_with(student, state, head, data, options.batch_windows)), index, names))
        _, index, names = min(trials)
        with torch.no_grad():
            for n in names:
                named[n].copy_(initial[n])
        kept.remove(index)
        reverted.append(index)
        kl = distill.held_out_kl(student.module, head, data, options.batch_windows)
        logger.info(f"heal: span {spans[index].describe()} made a source worse: reverted")
    if not kept:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(initial[n])
        return [], sorted(candidates), dict(kl_input)
    return kept, sorted(reverted), kl


def heal_model_file(model_path, reference_path, out_dir, *, sources=None, texts: Sequence[str] = (),
                    ids_files: Sequence[str] = (), options: HealOptions = HealOptions(),
                    progress: StageProgress | None = None, validate: bool = True) -> tuple[dict, HealReport]:
    """Heal ``model_path`` toward ``reference_path`` into ``out_dir`` (model, tokenizer, config,
    ``ffnfusion.json`` with the report). The output is replaced whole or not at all."""
    from ffnfusion.runtime.model_rewrite import rewrite_model_file

    path = model_file(model_path)
    out = pathlib.Path(out_dir)
    if out.resolve() in (path.parent.resolve(), model_file(reference_path).parent.resolve()):
        raise InvalidArgumentError(f"the output folder {out} is an input's folder; choose another")
    if sources is None:
        sources = heal_sources(path.parent, texts, ids_files, options=options)
    logger.info("heal: sources " + ", ".join(f"{s.name} ({s.fit.size} fit + {s.select.size} held out)"
                                             for s in sources))
    values, report = heal(path, reference_path, sources, options, progress)
    logger.info(f"heal: {report.describe()}")

    def rewrite(model) -> None:
        written = write_back(model, path.parent, values)
        if sorted(written) != sorted(values):
            missing = sorted(set(values) - set(written))
            raise InvalidArgumentError(f"trained values without an initializer: {', '.join(missing[:4])}")

    def record(metadata: dict) -> None:
        metadata["heal"] = {"reference": str(model_file(reference_path)), **report.to_dict()}

    with staged_directory(out) as staging:
        summary = rewrite_model_file(path, staging, rewrite, f"heal: write {len(values)} trained tensor(s)",
                                     record, validate)
    summary["output"] = str(out / pathlib.Path(summary["output"]).name)
    return summary, report


