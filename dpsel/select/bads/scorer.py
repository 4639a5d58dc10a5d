"""The `bads` scorer: the run's posterior weights for seen rows, the weight network for unseen ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpsel.select.scorers import SeenTableScorer


def net_draws(net, phi_samples: list[dict], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of sigmoid(g_φ(e)) over the saved φ samples."""
    x = torch.as_tensor(features, dtype=torch.float32)
    draws = []
    with torch.no_grad():
        for state in phi_samples:
            net.load_state_dict(state)
            draws.append(torch.sigmoid(net(x)).double().numpy())
    draws = np.stack(draws)
    return np.clip(draws.mean(0), 0, 1), draws.std(0)


class BadsScorer(SeenTableScorer):
    """Seen rows: the run's posterior weights. Unseen rows: E_φ[sigmoid(g_φ(e))] over the saved φ samples,
    e from the saved meta-fitted reference (tiny: the whole model; otherwise its adapter)."""
    kind = "bads"

    def attach(self, lm, net, phi_samples: list[dict]) -> None:
        self.lm, self.net, self.phi_samples = lm, net, phi_samples

    def _score_unseen(self, messages, ids):
        from dpsel.select.features import FeatureStats, row_features
        from dpsel.models.lm import EncodedRows
        rows = EncodedRows(messages, self.lm.tokenizer, int(self.info.get("max_length", 256)), self.lm.pad_id)
        stats = FeatureStats.from_dict(self.info["features"])
        return net_draws(self.net, self.phi_samples, stats.apply(row_features(self.lm, rows)))

    def _save_model(self, directory: Path) -> None:
        from dpsel.models.lm import save_theta
        info = save_theta(self.lm, directory / "reference")
        torch.save({"phi_samples": self.phi_samples, "n_features": self.net.net[0].in_features,
                    "hidden": self.net.net[0].out_features, "reference": info}, directory / "weight_net.pt")

    def _load_model(self, directory: Path) -> None:
        from dpsel.select.features import WeightNet
        from dpsel.models.lm import load_theta
        saved = torch.load(directory / "weight_net.pt", weights_only=True)
        net = WeightNet(saved["n_features"], saved["hidden"])
        self.attach(load_theta(directory / "reference", saved["reference"], device="cpu"), net.eval(),
                    saved["phi_samples"])


class EmbedderBadsScorer(SeenTableScorer):
    """bads with θ in the embedder's space: seen rows get the run's weights; unseen rows the weight net over the
    same embedding features the run used (embedding_problem.embedding_features), with the saved maps."""
    kind = "bads-embedder"

    def attach(self, maps: list[tuple[torch.Tensor, torch.Tensor]], net, phi_samples: list[dict]) -> None:
        self.maps, self.net, self.phi_samples = maps, net, phi_samples

    def _embedder(self):
        """The run's embedder, loaded (and its weights checked) once per scorer, not once per scored chunk."""
        if getattr(self, "_loaded_embedder", None) is None:
            self._loaded_embedder = _same_embedder(self.info["embedder"], self.info["embedder_sha"])
        return self._loaded_embedder

    def _score_unseen(self, messages, ids):
        from dpsel.select.bads.embedding_problem import embedding_features
        from dpsel.select.consistency import answer_text
        from dpsel.select.features import FeatureStats
        from dpsel.select.semantic import row_embeddings
        q, a = row_embeddings(self._embedder(), messages)
        words = np.asarray([len(answer_text(m).split()) for m in messages])
        stats = FeatureStats.from_dict(self.info["features"])
        return net_draws(self.net, self.phi_samples, stats.apply(embedding_features(q, a, words, self.maps)))

    def _save_model(self, directory: Path) -> None:
        torch.save({"phi_samples": self.phi_samples, "n_features": self.net.net[0].in_features,
                    "hidden": self.net.net[0].out_features, "maps": [list(m) for m in self.maps]},
                   directory / "weight_net.pt")

    def _load_model(self, directory: Path) -> None:
        from dpsel.select.features import WeightNet
        saved = torch.load(directory / "weight_net.pt", weights_only=True)
        net = WeightNet(saved["n_features"], saved["hidden"])
        self.attach([tuple(m) for m in saved["maps"]], net.eval(), saved["phi_samples"])


def _same_embedder(spec: str, sha: str):
    """The embedder `spec` when it loads here with the run's weights (`sha`); else DpselInputError saying why."""
    from dpsel.errors import DpselInputError
    from dpsel.models.embedder import EmbedderUnavailable, load_embedder
    try:
        embedder = load_embedder(spec)
    except EmbedderUnavailable as error:
        why = str(error)
    else:
        if embedder.sha == sha:
            return embedder
        why = f"its weights here have sha {embedder.sha[:16]}"
    raise DpselInputError(f"this bads scorer judges rows in the space of embedder {spec!r} (sha {sha[:16]}), "
                          f"which is not available here: {why}")
