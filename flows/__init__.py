"""The pipeline's entry points: the Prefect flow (finetune_then_quantize.py), the command line (cli.py) and the
one-machine scheduler (serve.py)."""
