"""One module per stage. Each stage is one function, `stage(run, *input_artifacts) -> StageArtifact`, that runs
without Prefect; the flow (flows/finetune_then_quantize.py) wraps them as Prefect tasks in one place."""
