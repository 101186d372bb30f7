"""Virtual environments for engines that cannot share ffnfusion's (they pin transformers < 5, or
depend on ``onnxruntime``, which clashes with ``onnxruntime-gpu``): made once under
``$FFNFUSION_CACHE/envs`` (default ``~/.cache/ffnfusion``), never inside the repository."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from ffnfusion.exporters.sources import cache_dir

TORCH = "torch==2.13.0"  # pinned: an unpinned torch pulls a multi-GB CUDA build
READY = ".ffnfusion-ready"


def log(message: str) -> None:
    print(f"[environment] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv``; on failure exit with its last output lines; log how long it took."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise SystemExit(f"{what} failed ({result.returncode}):\n{(result.stderr or result.stdout)[-4000:]}")
    log(f"{what}: {time.perf_counter() - start:.0f} s")
    return result


def environment(name: str, installs: list[list[str]]) -> pathlib.Path:
    """The python of venv ``name``, made once: each entry of ``installs`` is one ``pip install``
    (torch first, alone, so its pin holds). A half-made venv (no stamp) is made again."""
    venv = cache_dir() / "envs" / name
    python = venv / "bin" / "python"
    if not (venv / READY).is_file():
        log(f"creating {venv} (once)")
        venv.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "venv", "--clear", str(venv)], "venv")
        for packages in installs:
            run([str(python), "-m", "pip", "install", "--quiet", *packages], f"pip install {' '.join(packages)}")
        (venv / READY).touch()
    return python


def run_script(python: pathlib.Path, script: str, model_dir: str | os.PathLike, request: dict, what: str) -> dict:
    """Run ``script`` (Python source) in an environment as ``python -c script MODEL_DIR REQUEST.json``;
    it prints one JSON line last, returned. The request goes to a temporary file, not the model's folder."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(request, file)
    try:
        result = run([str(python), "-c", script, str(model_dir), file.name], what)
    finally:
        os.unlink(file.name)
    return json.loads(result.stdout.strip().splitlines()[-1])
