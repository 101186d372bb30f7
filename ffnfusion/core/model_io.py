"""Load and save ONNX models safely: clear errors, atomic writes, external data beside the graph.

The bottom layer: no ONNX Runtime, no graph rewriting; every other layer reads and writes models here."""

from __future__ import annotations

import os
import pathlib

import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError, ModelFileError
from ffnfusion.core.files import staged_model

MODEL_FILE = "model.onnx"
METADATA_FILE = "ffnfusion.json"  # beside every model ffnfusion writes: source, config, rewrites
# Files a runtime needs beside model.onnx; copied so a rewritten model directory is self-contained.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "config.json", "generation_config.json", "genai_config.json")
EXTERNAL_DATA_THRESHOLD = 256 * 2**20  # bytes of initializers above which weights go to a .data file


def model_file(path: str | os.PathLike) -> pathlib.Path:
    """A model path as users give it: the ``.onnx`` file, or a directory holding ``model.onnx``."""
    path = pathlib.Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_model(path: str | os.PathLike) -> ir.Model:
    """``onnx_ir.load`` (external tensors stay memory-mapped) with one-line errors."""
    path = model_file(path)
    if not path.is_file():
        raise ModelFileError(f"model {path} not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty, not an ONNX model")
    try:
        model = ir.load(path)  # lazy: external tensors are only memory-mapped when read
    except Exception as err:  # protobuf's DecodeError and friends
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFileError(f"{path} is not a readable ONNX model: {detail}") from err
    check_external_data(model, path.parent)
    return model


def check_external_data(model: ir.Model, model_dir: pathlib.Path) -> None:
    """Refuse, before any byte is read, external data that escapes the model's directory
    (absolute paths, ``..``, symlinks out: the path-traversal class of bugs onnx has had CVEs
    for), and data files that are missing or shorter than a tensor declares."""
    root = model_dir.resolve()
    sizes: dict[pathlib.Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = pathlib.PurePath(str(tensor.location))
        if location.is_absolute() or ".." in location.parts:
            raise ModelFileError(f"tensor {value.name!r}: external data location {str(location)!r} "
                                 "is not a relative path inside the model directory; refusing to read it")
        target = (root / location).resolve()
        if not target.is_relative_to(root):
            raise ModelFileError(f"tensor {value.name!r}: external data {str(location)!r} resolves outside "
                                 f"{root} (symlink?); refusing to read it")
        if target not in sizes:
            if not target.is_file():
                raise ModelFileError(f"tensor {value.name!r}: external data file {target} is missing")
            sizes[target] = target.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[target]:
            raise ModelFileError(f"tensor {value.name!r}: external data file {target.name} has "
                                 f"{sizes[target]} bytes, the tensor needs bytes up to {end}")


def external_data_files(model: ir.Model, base_dir: pathlib.Path) -> set[pathlib.Path]:
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add((base_dir / tensor.location).resolve())
    return files


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, out_path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
               external: bool | None = None) -> pathlib.Path:
    """Write ``model`` to ``out_path`` atomically; weights go to ``<name>.data`` when large
    (or as ``external`` says).

    Written to a temporary folder in the target directory, then renamed into place: an
    interrupted run never leaves a half-written model, and the input is never touched.
    """
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".onnx":
        raise InvalidArgumentError(f"output {out_path} must end in .onnx")
    data_name = out_path.name + ".data"
    if input_path is not None:
        input_path = pathlib.Path(input_path)
        if out_path.resolve() == input_path.resolve():
            raise InvalidArgumentError(f"output {out_path} is the input model; choose another path")
        inputs = external_data_files(model, input_path.parent)
        if (out_path.parent.resolve() / data_name) in inputs:
            raise InvalidArgumentError(f"output data file {out_path.parent / data_name} is read by the input model")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelFileError(f"cannot create output directory {out_path.parent}: {err.strerror}") from None
    if not os.access(out_path.parent, os.W_OK):
        raise ModelFileError(f"output directory {out_path.parent} is not writable")
    if external is None:
        # A model that reads external data keeps doing so: saved without external_data, onnx-ir
        # would keep pointing at the input's data file, relative to the *output's* directory.
        external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD or any(
            isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    try:
        with staged_model(out_path, external=external) as staged:
            ir.save(model, staged, external_data=data_name if external else None)
    except OSError as err:
        raise ModelFileError(f"cannot write {out_path}: {err.strerror or err}") from None
    return out_path
