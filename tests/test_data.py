"""Corpora: text, nanoGPT token files, the standard library; validation splits and per-peer batches."""

import numpy as np
import pytest
import torch

from optim.data import DataError, decode, encode, load_corpus, stdlib_files


def test_the_default_corpus_is_the_standard_library_without_its_tests():
    files = stdlib_files()
    assert any(f.name == "os.py" for f in files) and not any("test" in f.parts for f in files)
    corpus = load_corpus(max_bytes=2_000_000)
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000 and corpus.vocab_size == 256
    assert "def " in decode(corpus.train[:100_000])


def test_a_directory_of_text_holds_out_whole_files_and_skips_binaries(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    corpus = load_corpus(str(tmp_path))
    text_train, text_val = decode(corpus.train), decode(corpus.val)
    assert "\0" not in text_train + text_val
    held_out = {w for w in text_val.split() if w.isdigit()}
    assert held_out and not held_out & {w for w in text_train.split() if w.isdigit()}


def test_nanogpt_token_files_and_their_vocabulary(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(500, dtype=np.uint16) + 100).tofile(tmp_path / "val.bin")
    corpus = load_corpus(str(tmp_path))
    assert corpus.vocab_size == 5000 and corpus.train[4999] == 4999
    corpus.check(block_size=64, vocab_size=50257)
    with pytest.raises(DataError, match="do not fit"):
        corpus.check(block_size=64, vocab_size=256)
    (tmp_path / "val.bin").write_bytes(b"\1\2\3")
    with pytest.raises(DataError, match="whole number"):
        load_corpus(str(tmp_path))


def test_a_corpus_smaller_than_a_context_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world")
    corpus = load_corpus(str(tmp_path / "tiny.txt"))
    with pytest.raises(DataError, match="fewer than one context"):
        corpus.check(block_size=64, vocab_size=256)


def test_batches_are_deterministic_per_seed_and_differ_between_peers():
    corpus = load_corpus(max_bytes=1_000_000)
    a1, _ = corpus.batch("train", 4, 32, b"peer-a/7")
    a2, _ = corpus.batch("train", 4, 32, b"peer-a/7")
    b, _ = corpus.batch("train", 4, 32, b"peer-b/7")
    x, y = corpus.batch("train", 4, 32, b"peer-a/8")
    assert torch.equal(a1, a2) and not torch.equal(a1, b) and not torch.equal(a1, x)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert decode(encode("héllo")) == "héllo"
