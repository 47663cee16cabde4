"""The reference model: MegatronBERT and its nine heads in PyTorch (`megatron_bert`), its configuration
(`config`, the fields of a Hugging Face config.json, checked on the way in) and the synthetic inputs that
trace and validate it (`samples`). The first stage: it may import torch and `runtime`, nothing else of
the exporter's.
"""
