"""The `bads` scorer: the run's posterior weights for seen rows, the weight network for unseen ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpsel.select.scorers import SeenTableScorer


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
        x = torch.as_tensor(stats.apply(row_features(self.lm, rows)), dtype=torch.float32)
        draws = []
        with torch.no_grad():
            for state in self.phi_samples:
                self.net.load_state_dict(state)
                draws.append(torch.sigmoid(self.net(x)).double().numpy())
        draws = np.stack(draws)
        return np.clip(draws.mean(0), 0, 1), draws.std(0)

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
