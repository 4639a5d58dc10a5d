"""peft_train: models, encoding, adapters (LoRA/QLoRA, SURM) and the training loop. Knows nothing of dpsel or Prefect."""
