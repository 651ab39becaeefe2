"""Plain, Prefect-free building blocks of the fine-tune -> merge -> quantize pipeline."""
