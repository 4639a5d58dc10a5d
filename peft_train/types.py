"""Types shared by every layer above: the one definition of a progress callback, kept free of heavy imports
(dpsel's config reads it without loading transformers)."""
from __future__ import annotations

from collections.abc import Callable

# progress(step, total_steps, latest diagnostics); diagnostics["phase"] may name the loop
ProgressFn = Callable[[int, int, dict], None]
