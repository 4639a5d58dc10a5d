"""Prefect flows over the dpsel and peft_train libraries. The only package that imports Prefect."""
