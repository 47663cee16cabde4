"""Delivery: what happens to artifacts once built. `triton` writes a Triton model repository, `serve`
runs a real Triton server on it behind `http_guard` (which refuses requests that declare more than they
carry), `verify` says whether an artifact is good to serve on this machine, `bench` measures latency,
throughput and memory beside PyTorch, and `predict` answers a whole corpus offline. What each may import:
`triton`, `serve`, `http_guard`, `verify` and `predict` only `runtime` (production machines have no
torch); `bench` every stage before it.
"""
