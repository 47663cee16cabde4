"""Delivery: what happens to artifacts once built. `triton` writes a Triton model repository, `serve`
runs a real Triton server on it behind `http_guard` (which refuses requests that declare more than they
carry), `verify` says whether an artifact is good to serve on this machine, and `bench` measures
latency, throughput and memory beside PyTorch; `predict` answers a whole corpus offline. `triton`, `serve`,
`http_guard`, `verify` and `predict` need only `runtime` (production machines have no torch); `bench` may
import every stage before it.
"""
