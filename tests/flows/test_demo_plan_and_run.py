"""The demo's plan at a small size: a pretrained base cached under the run folder, then curation and both
adapter methods (QLoRA and the SURM structure) on the curated and the uncurated rows."""
import dataclasses
import json

from dpsel import demo
from dpsel.demo_base import SETTINGS_FILE, BaseSettings
from dpsel.demo_estimate import Rates

SMALL = dataclasses.replace(
    demo.QUICK, rows=60, meta_rows=16, test_rows=8, base=BaseSettings(steps=2, rows=64), surm_steps=2,
    overrides={**demo.QUICK.overrides, "curate.steps": 4, "tune.steps": 2, "curate.select.max_length": 48,
               "tune.max_length": 48, "curate.select.extra": {"ref_patience": 1, "ref_steps": 4}})


def test_plan_names_both_adapter_methods_and_estimates_from_measured_rates(tmp_path):
    config = demo.demo_config(tmp_path, size=demo.QUICK)
    rates = Rates(full_step=0.1, adapter_step={"qlora": 0.2, "surm-ldr": 0.3}, eval_row=0.01)
    lines = demo.plan(config, demo.QUICK, rates)
    assert "qlora (r=8" in lines[3] and "surm-ldr (r=1" in lines[3] and "60 steps" in lines[3]
    assert lines[-1].startswith("estimate: about") and "qlora 200 ms" in lines[-1] and "probe" in lines[-1]
    slower = demo.plan(config, demo.QUICK, dataclasses.replace(rates, full_step=0.2))
    assert float(slower[-1].split()[2]) > float(lines[-1].split()[2])  # the estimate follows the measured rates


def test_small_demo_tunes_both_adapters_and_reuses_its_base(prefect_server, tmp_path):
    summary = demo.run_demo(tmp_path, device="cpu", size=SMALL, seeds=2)
    base = tmp_path / "base"
    assert summary["base"]["reused"] is False and (base / "config.json").is_file()
    by_method = summary["eval_loss_by_seed"]
    assert set(by_method) == {"qlora", "surm-ldr"}
    for label, figures in by_method.items():
        assert figures["seeds"] == [0, 1] and len(figures["curated"]) == len(figures["uncurated"]) == 2
        assert 0 < figures["trainable_params"] < figures["total_params"] / 10, label  # adapters, not the base
        assert figures["peak_memory_bytes"] > 0
    for folder, method in (("tune-curated", "qlora"), ("tune-uncurated", "qlora"),
                           ("tune-surm-ldr-curated-seed1", "surm-ldr"), ("tune-qlora-uncurated-seed1", "qlora")):
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["model"] == str(base)
        assert 0 < metrics["trainable_params"] < metrics["total_params"] / 10
    assert by_method["qlora"]["trainable_params"] != by_method["surm-ldr"]["trainable_params"]
    lines = demo.headline(summary)
    assert sum("curated beats uncurated beyond the seed spread" in line for line in lines) == 2

    written = (base / SETTINGS_FILE).stat().st_mtime_ns
    again = demo.run_demo(tmp_path, device="cpu", size=SMALL, seeds=2)
    assert again["base"]["reused"] is True and (base / SETTINGS_FILE).stat().st_mtime_ns == written
    changed = dataclasses.replace(SMALL, base=dataclasses.replace(SMALL.base, steps=3))
    from dpsel.demo_base import pretrained_base
    _, info = pretrained_base(base, tmp_path / "data", changed.base, "cpu", progress=False)
    assert info["reused"] is False and info["steps"] == 3  # other settings: pretrained again

