"""Tokenized, memory-mapped shards with document boundaries, a train/validation split and a
manifest naming every source and its licence.

Layout of a prepared directory:
  manifest.json                      sources, tokenizer, dtype, splits, shard files
  {split}-{k:05d}.bin                token ids, little-endian uint16 (vocab <= 65536) or uint32
  {split}-{k:05d}.docs.npy           int64 start offset of every document in that shard
  {split}-{k:05d}.loss.bin           only where a source trains on part of its text (chats with
                                     the loss on the assistant's turns): uint8, 1 where the token
                                     is a training target
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

from ..errors import DataError
from .sources import Document, SourceSpec, read_documents

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class ShardWriter:
    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    with_loss_mask: bool  # keep and write the per-token loss mask (else every token is a target)

    def __post_init__(self) -> None:
        self.files: list[str] = []
        self.tokens: list[int] = []
        self.trained: list[int] = []
        self.docs: list[int] = []
        self.total_tokens = self.total_docs = self.total_trained = 0

    def add(self, ids: list[int], trained: list[int]) -> None:
        if self.tokens and len(self.tokens) + len(ids) > self.shard_tokens:
            self.flush()
        self.docs.append(len(self.tokens))
        self.tokens.extend(ids)
        if self.with_loss_mask:
            self.trained.extend(trained)
        self.total_tokens += len(ids)
        self.total_trained += sum(trained)
        self.total_docs += 1

    def flush(self) -> None:
        if not self.tokens:
            return
        stem = f"{self.split}-{len(self.files):05d}"
        np.asarray(self.tokens, dtype=self.dtype).tofile(self.directory / f"{stem}.bin")
        np.save(self.directory / f"{stem}.docs.npy", np.asarray(self.docs, dtype=np.int64))
        if self.with_loss_mask:
            np.asarray(self.trained, dtype=np.uint8).tofile(self.directory / f"{stem}.loss.bin")
        self.files.append(stem)
        self.tokens, self.trained, self.docs = [], [], []


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


def tokenize(doc: Document, tokenizer, eos: int) -> tuple[list[int], list[int]]:
    """Token ids of a document plus the closing EOS, and 1/0 per token: is it a training target.
    A token is a target when it starts inside one of the document's trained spans; the EOS
    always is (the model must learn where documents end)."""
    if doc.trained is None:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        return ids + [eos], [1] * (len(ids) + 1)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("a loss on part of the text needs a fast tokenizer (character offsets)")
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [int(any(a <= start < b for a, b in doc.trained)) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"] + [eos], trained + [1]


def _write(sources: list[SourceSpec], tokenizer, out: Path, val_fraction: float, seed: int, shard_tokens: int) -> dict:
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    with_loss_mask = any(spec.loss_on != "all" for spec in sources)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens, with_loss_mask) for split in ("train", "val")}
    rng = random.Random(seed)
    recorded = []
    for spec in sources:
        docs = tokens = 0
        digest = hashlib.sha256()
        for doc in read_documents(spec, tokenizer):
            digest.update(doc.text.encode())
            ids, trained = tokenize(doc, tokenizer, eos)
            writers["val" if rng.random() < val_fraction else "train"].add(ids, trained)
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
        "loss_mask": with_loss_mask,
        "sources": recorded,
        "splits": {
            split: {"files": w.files, "tokens": w.total_tokens, "documents": w.total_docs,
                    "trained_tokens": w.total_trained}
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
        # 1 where a token is a training target; None: every token is (no loss mask written)
        self.trained = [np.memmap(self.directory / f"{stem}.loss.bin", dtype=np.uint8, mode="r")
                        for stem in self.manifest["splits"][split]["files"]] if self.manifest.get("loss_mask") else None

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token id must be one of the model's (data prepared with another tokenizer fails here)."""
        top = max((int(s.max()) for s in self.shards if len(s)), default=-1)
        if top >= vocab_size:
            raise DataError(f"{self.directory}: token id {top} is outside the model's vocabulary of {vocab_size} "
                            "(prepared with another tokenizer?)")

    def documents(self):
        """Token ids of every document, EOS included, in order."""
        for shard, starts in zip(self.shards, self.doc_starts):
            ends = list(starts[1:]) + [len(shard)]
            for a, b in zip(starts, ends):
                yield np.asarray(shard[a:b], dtype=np.int64)
