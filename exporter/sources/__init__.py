"""Where weights come from: checkpoints users have (Hugging Face folders and files, NGC Megatron
files; `checkpoints`), Megatron-LM's tensor- and pipeline-parallel ranks merged into one
(`megatron_parallel`), and the demo checkpoints that ship with the exporter (`demo`, the `demo/`
folder) with the training that made them (`training`). Every source ends as a `LoadedModel`: a
reference head with its weights. May import `exporter.model` and `runtime`.
"""
