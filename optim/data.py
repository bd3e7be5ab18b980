"""Training data: a byte-level tokenizer, corpora from text files, nanoGPT token files or the Python
standard library's own sources, a held-out validation split, and per-peer sampling.

Each peer draws its batches from positions derived from its peer id and the step, so peers read
different parts of the corpus without coordinating."""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

VAL_EVERY = 20  # one file in 20 (by hash of its path) is held out for validation
MAX_FILE_BYTES = 4 << 20


class DataError(ValueError):
    """A corpus that cannot be used: missing, empty, too small for the context, or malformed."""


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    train: np.ndarray  # uint16 tokens
    val: np.ndarray
    vocab_size: int
    description: str

    def check(self, block_size: int, vocab_size: int) -> None:
        for name, tokens in (("training", self.train), ("validation", self.val)):
            if len(tokens) <= block_size + 1:
                raise DataError(f"{self.description}: {name} split has {len(tokens)} tokens, "
                                f"fewer than one context of {block_size + 1}")
        if self.vocab_size > vocab_size:
            raise DataError(f"{self.description}: tokens up to {self.vocab_size - 1} do not fit the "
                            f"model's vocabulary of {vocab_size}")

    def batch(self, split: str, batch_size: int, block_size: int, seed: bytes) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``batch_size`` random windows; the same ``seed`` always gives the same batch."""
        import torch  # here, so that loading a corpus (and the CLI's start-up) does not import torch

        tokens = self.train if split == "train" else self.val
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
        starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
        window = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, tests excluded, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not ({"test", "tests", "idle_test", "site-packages"} & set(p.relative_to(root).parts)))


def _is_validation(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % VAL_EVERY == 0


def corpus_from_files(files: list[Path], root: Path, description: str, max_bytes: int | None) -> Corpus:
    train, val, total = [], [], 0
    for path in files:
        try:
            data = path.read_bytes()[:MAX_FILE_BYTES]
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc
        if b"\0" in data[:4096] or not data:  # binary or empty
            continue
        tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        (val if _is_validation(str(path.relative_to(root))) else train).append(tokens)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    if not train and val:  # a single file: hold out its tail instead
        train, val = [val[0][:len(val[0]) * 9 // 10]], [val[0][len(val[0]) * 9 // 10:]]
    elif train and not val:
        whole = np.concatenate(train)
        train, val = [whole[:len(whole) * 19 // 20]], [whole[len(whole) * 19 // 20:]]
    if not train:
        raise DataError(f"{description}: no text found")
    return Corpus(np.concatenate(train), np.concatenate(val), 256, description)


def load_corpus(path: str | None = None, max_bytes: int | None = None) -> Corpus:
    """``None``: the standard library corpus. A directory holding ``train.bin`` and ``val.bin``:
    nanoGPT uint16 token files. Any other directory or file: its text, byte-tokenized."""
    if path is None:
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        return corpus_from_files(files, root, f"Python {sysconfig.get_python_version()} standard library", max_bytes)
    source = Path(path)
    if not source.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if source.is_dir() and (source / "train.bin").is_file() and (source / "val.bin").is_file():
        return _token_files(source)
    if source.is_file():
        return corpus_from_files([source], source.parent, str(source), max_bytes)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"--data {path}: the directory holds no files")
    return corpus_from_files(files, source, str(source), max_bytes)


def _token_files(source: Path) -> Corpus:
    splits = []
    for name in ("train.bin", "val.bin"):
        size = (source / name).stat().st_size
        if size % 2:
            raise DataError(f"{source / name}: {size} bytes is not a whole number of uint16 tokens")
        splits.append(np.memmap(source / name, dtype=np.uint16, mode="r"))
    if min(len(s) for s in splits) == 0:
        raise DataError(f"{source}: empty token file")
    vocab = int(max(splits[0][:1 << 22].max(), splits[1].max())) + 1  # a bound from the first 4M tokens
    return Corpus(splits[0], splits[1], vocab, f"token files in {source}")
