"""Curation stages as small blocks (near-duplicates, semantic duplicates, decontamination, filters, PII),
run in the contract's fixed order by `pipeline.run_stages`."""
