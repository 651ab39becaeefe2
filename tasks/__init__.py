"""One module per stage: a plain function that does the work, and a thin Prefect task over it."""
