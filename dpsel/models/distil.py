"""A static sentence embedder distilled offline from the packaged one (model2vec): evidence at pool scale.

MiniLM runs six transformer layers per token; on one CPU thread it embeds some tens of rows a second, hours for a
million-row pool. model2vec's distillation passes every token of the source's vocabulary through it once (about
30 s on one thread for MiniLM's 30k tokens), keeps the PCA-reduced, SIF-weighted outputs as a lookup table, and a
sentence's embedding becomes the mean of its tokens' rows: no attention, no layers. The folder it writes is a
sentence-transformers model (a StaticEmbedding module), so `--embedder DIR` loads it through the same path as
MiniLM: the same behaviour check, the weights' sha256 in the manifest, the embedding cache keyed by those weights.
`dpsel_distil.json` in the folder records the source it came from (name, weights' sha256, settings).

    dpsel embedder distil --out DIR            # or: dpsel.models.distil.distil_static("DIR")
    dpsel curate ... --embedder DIR
    dpsel curate ... --embedder static         # distilled once from the packaged MiniLM into the user cache

Needs `model2vec` and `skeletoken` (the `static` extra); nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from dpsel.errors import DpselInputError
from dpsel.models.embedder_files import DEFAULT, DISTIL_RECORD, EmbedderUnavailable, cache_root, file_sha256, \
    packaged_folder, resolve_folder, weight_files

log = logging.getLogger(__name__)
DEFAULT_DIMS = 256      # model2vec's default PCA size (MiniLM's own is 384)
STATIC = "static"       # the `--embedder` spec of the packaged MiniLM's static distillation (`static_folder`)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _keep_only(tokens) -> str:
    """A model2vec token-remove pattern that removes every token but `tokens` and the special ones."""
    kept = sorted({*SPECIAL_TOKENS, *tokens})
    return r"^(?!(?:" + "|".join(re.escape(t) for t in kept) + r")$)"


def distil_static(out: str | Path, source: str = DEFAULT, dims: int | None = DEFAULT_DIMS,
                  keep_tokens: list[str] | None = None) -> Path:
    """Distil a static embedder from `source` (an `--embedder` spec, offline) into the folder `out`.

    `dims`: PCA components kept (None keeps the source's size). `keep_tokens` restricts the vocabulary to these
    tokens of the source's tokenizer (small models for tests; words outside it become [UNK]). Returns `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from model2vec.distill import distill_from_model
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise DpselInputError(f"distilling a static embedder needs model2vec and skeletoken "
                              f"(pip install 'dpsel[static]'): {error}") from None
    try:
        name, folder = resolve_folder(source)
    except EmbedderUnavailable as error:
        raise DpselInputError(f"embedder distil: {error}") from None
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    removal = _keep_only(keep_tokens) if keep_tokens else r"\[unused\d+\]"
    static = distill_from_model(model, tokenizer, device="cpu", pca_dims=dims, token_remove_pattern=removal)
    static.config["tokenizer_name"] = name      # not the local cache path it was read from
    out = Path(out)
    static.save_pretrained(str(out))
    record = {"source": name, "source_weights_sha256": {str(p.relative_to(folder)): file_sha256(p)
                                                        for p in weight_files(folder)},
              "method": "model2vec.distill_from_model", "pca_dims": dims,
              "vocabulary": len(keep_tokens) if keep_tokens else "source tokenizer's"}
    (out / DISTIL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def static_folder() -> Path:
    """The static embedder distilled from the packaged MiniLM, built once (about 30 s) into the user cache under
    a name that carries the source's hash, so a new source builds a new one; concurrent runs build it once."""
    from filelock import FileLock
    source = packaged_folder()
    target = cache_root() / "embedders" / f"static-{source.name}-d{DEFAULT_DIMS}"
    with FileLock(str(target) + ".lock"):
        if not (target / DISTIL_RECORD).exists():
            partial = target.with_name(target.name + f".partial-{os.getpid()}")
            log.warning("building the static embedder once from %s into %s (about 30 s per core)", source, target)
            try:
                with _quiet_progress_bars():
                    distil_static(partial, source=DEFAULT)
            except DpselInputError as error:
                raise EmbedderUnavailable(f"the static embedder could not be built: {error}") from None
            partial.rename(target)
    return target


@contextlib.contextmanager
def _quiet_progress_bars():
    """model2vec draws a tqdm bar per token batch and transformers one per weight load; the run's own log says
    what happens. (tqdm reads TQDM_DISABLE only when it is imported, so the bar is switched off where drawn.)"""
    import functools
    from model2vec.distill import inference
    from transformers.utils import logging as hf_logging
    bar, bars_on = inference.tqdm, hf_logging.is_progress_bar_enabled()
    inference.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        inference.tqdm = bar
        if bars_on:
            hf_logging.enable_progress_bar()
