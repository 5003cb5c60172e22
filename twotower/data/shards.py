"""Tokenized, memory-mapped shards with document boundaries, a train/validation split and a
manifest naming every source and its licence.

Layout of a prepared directory:
  manifest.json                      sources, tokenizer, dtype, splits, shard files
  {split}-{k:05d}.bin                token ids, little-endian uint16 (vocab <= 65536) or uint32
  {split}-{k:05d}.docs.npy           int64 start offset of every document in that shard
Documents are separated by the EOS token, which the model learns to emit at their end."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .sources import DataError, SourceSpec, read_documents

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class ShardWriter:
    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int

    def __post_init__(self) -> None:
        self.files: list[str] = []
        self.tokens: list[int] = []
        self.docs: list[int] = []
        self.total_tokens = self.total_docs = 0

    def add(self, ids: list[int]) -> None:
        if self.tokens and len(self.tokens) + len(ids) > self.shard_tokens:
            self.flush()
        self.docs.append(len(self.tokens))
        self.tokens.extend(ids)
        self.total_tokens += len(ids)
        self.total_docs += 1

    def flush(self) -> None:
        if not self.tokens:
            return
        stem = f"{self.split}-{len(self.files):05d}"
        np.asarray(self.tokens, dtype=self.dtype).tofile(self.directory / f"{stem}.bin")
        np.save(self.directory / f"{stem}.docs.npy", np.asarray(self.docs, dtype=np.int64))
        self.files.append(stem)
        self.tokens, self.docs = [], []


def prepare(
    sources: list[SourceSpec],
    tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = 1 << 24,
) -> dict:
    """Tokenize every document of ``sources`` into shards under ``out_dir``; each document
    goes to validation with probability ``val_fraction`` (seeded, so reruns agree)."""
    if not sources:
        raise DataError("no sources given")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to mark document boundaries")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target and rename at the end: a failed or killed run leaves no half corpus
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write(sources, tokenizer, tmp, val_fraction, seed, shard_tokens)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write(sources: list[SourceSpec], tokenizer, out: Path, val_fraction: float, seed: int, shard_tokens: int) -> dict:
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    rng = random.Random(seed)
    recorded = []
    for spec in sources:
        docs = tokens = 0
        digest = hashlib.sha256()
        for text in read_documents(spec, tokenizer):
            digest.update(text.encode())
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            writers["val" if rng.random() < val_fraction else "train"].add(ids)
            docs += 1
            tokens += len(ids)
        if not docs:
            raise DataError(f"{spec.path}: no documents")
        recorded.append({**asdict(spec), "documents": docs, "tokens": tokens, "sha256": digest.hexdigest()})
    for w in writers.values():
        w.flush()
    if not writers["train"].total_tokens:
        raise DataError("every document went to validation: lower val_fraction or add data")
    manifest = {
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "sources": recorded,
        "splits": {
            split: {"files": w.files, "tokens": w.total_tokens, "documents": w.total_docs}
            for split, w in writers.items()
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class TokenShards:
    """Read access to a prepared directory: memory-mapped tokens of one split."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.directory}: no {MANIFEST} (run `twotower data prepare` first)")
        self.manifest = json.loads(path.read_text())
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.directory}: no split {split!r}")
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [np.memmap(self.directory / f"{stem}.bin", dtype=dtype, mode="r")
                       for stem in self.manifest["splits"][split]["files"]]
        self.doc_starts = [np.load(self.directory / f"{stem}.docs.npy")
                           for stem in self.manifest["splits"][split]["files"]]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def documents(self):
        """Token ids of every document, EOS included, in order."""
        for shard, starts in zip(self.shards, self.doc_starts):
            ends = list(starts[1:]) + [len(shard)]
            for a, b in zip(starts, ends):
                yield np.asarray(shard[a:b], dtype=np.int64)
