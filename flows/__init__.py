"""The pipeline's entry points: the Prefect flow, the command line, the one-machine scheduler.

Importing this package first quiets the dependency messages that would otherwise bury a run's first lines
(pipeline/quiet.py lists each and why it is harmless); it happens here because those messages are printed while
torch, transformers and torchao are imported, before any entry point's code runs.
"""

from pipeline.quiet import quiet_dependencies

quiet_dependencies()
