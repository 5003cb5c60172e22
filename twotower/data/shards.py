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
import logging
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from ..files import prepare_output_dir, read_json, remove_leftovers, sha256_file, write_json
from .sources import Document, SourceSpec, read_documents

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: with the data files' SHA-256
TEMPORARY_PREFIX = ".prepare-"  # a corpus being written


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
        raise UsageError("no sources given")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if val_fraction == 0:
        log.warning("twotower: val_fraction 0 writes no validation documents; `twotower train` needs some")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise UsageError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to mark document boundaries")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose another directory")
    prepare_output_dir(out.parent)
    # a killed run's half-written corpus (see below) goes before a new one starts
    remove_leftovers(out.parent, f"{TEMPORARY_PREFIX}{out.name}.*")
    # write beside the target and rename at the end: a failed or killed run leaves no half corpus
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{out.name}.", dir=out.parent))
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
    if val_fraction and not writers["val"].total_tokens:
        documents = writers["train"].total_docs
        raise DataError(f"no document went to validation ({documents} documents, val_fraction {val_fraction}): "
                        "raise --val-fraction or add data (training needs validation documents)")
    manifest = {
        "format": MANIFEST_FORMAT,
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
        # every data file's SHA-256, checked when it is read: damage is an error, not other data
        "sha256": {f.name: sha256_file(f) for f in sorted(out.iterdir())},
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _split_files(manifest: dict, split: str, path: Path) -> tuple[list[str], np.dtype]:
    """A split's shard names and the token dtype, as the manifest at ``path`` lists them."""
    try:
        files = manifest["splits"][split]["files"]
        dtype = np.dtype(manifest["dtype"])
    except KeyError as e:
        raise DataError(f"{path}: no {e.args[0]!r} (not a manifest written by `twotower data prepare`)") from None
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed manifest ({e})") from e
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise DataError(f"{path}: token dtype {dtype} is not one `twotower data prepare` writes")
    if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f and f for f in files):
        raise DataError(f"{path}: the {split} files must be a list of file stems")
    return files, dtype


class TokenShards:
    """Read access to a prepared directory: memory-mapped tokens of one split."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory).expanduser()
        path = self.directory / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.directory}: no {MANIFEST} (run `twotower data prepare` first)")
        self.manifest = read_json(path)
        stems, dtype = _split_files(self.manifest, split, path)
        mask = bool(self.manifest.get("loss_mask"))
        self.shards, self.doc_starts = [], []
        self.trained = [] if mask else None  # 1 where a token is a training target; None: every token is
        for stem in stems:
            tokens = self._read(f"{stem}.bin", dtype)
            starts = self._read(f"{stem}.docs.npy", np.dtype(np.int64))
            if not len(starts) or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(tokens):
                raise DataError(f"{self.directory / (stem + '.docs.npy')}: document offsets do not fit "
                                f"{stem}.bin's {len(tokens)} tokens")
            self.shards.append(tokens)
            self.doc_starts.append(starts)
            if mask:
                trained = self._read(f"{stem}.loss.bin", np.dtype(np.uint8))
                if len(trained) != len(tokens):
                    raise DataError(f"{self.directory / (stem + '.loss.bin')}: {len(trained)} loss flags for "
                                    f"{len(tokens)} tokens")
                self.trained.append(trained)

    def _read(self, name: str, dtype: np.dtype) -> np.ndarray:
        """One data file of the manifest, its checksum checked (manifests written before
        checksums were kept are read unchecked)."""
        path = self.directory / name
        if not path.is_file():
            raise DataError(f"{path}: missing (the manifest lists it); prepare the data again")
        expected = self.manifest.get("sha256", {}).get(name)
        if expected is not None and sha256_file(path) != expected:
            raise DataError(f"{path} is damaged: its SHA-256 differs from the manifest's; prepare the data again")
        if name.endswith(".npy"):
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{path}: not a readable .npy array ({e})") from e
            if array.dtype != dtype or array.ndim != 1:
                raise DataError(f"{path}: expected a 1-D {dtype} array, found {array.ndim}-D {array.dtype}")
            return array
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens (truncated?)")
        return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)

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
