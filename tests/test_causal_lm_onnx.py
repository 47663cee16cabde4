"""The causal LM's prefill and decode graphs, driven step by step through ONNX Runtime, generate
what PyTorch and transformers generate; left-padded batches generate what each prompt does alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from runtime.manifest import Manifest


class Graphs:
    def __init__(self, manifest_path):
        manifest = Manifest.load(manifest_path)
        self.layers = manifest.config["num_hidden_layers"]
        self.sessions = {g: ort.InferenceSession(str(manifest_path.parent / spec["file"]),
                                                 providers=["CPUExecutionProvider"])
                         for g, spec in manifest.graphs.items()}

    def step(self, graph, feed):
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(names, feed)))
        past = {name.replace("present", "past_key_values"): value for name, value in out.items() if name != "logits"}
        return out["logits"], past

    def greedy(self, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy tokens from a (left-padded) batch, and the logits of every step."""
        positions = np.clip(mask.cumsum(1) - 1, 0, None)
        logits, past = self.step("prefill", {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        tokens, all_logits = [], [logits]
        for _ in range(steps):
            token = logits.argmax(-1)[:, None]
            tokens.append(token)
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            logits, past = self.step("decode", {"input_ids": token, "attention_mask": mask,
                                                "position_ids": mask.sum(1, keepdims=True) - 1, **past})
            all_logits.append(logits)
        return np.concatenate(tokens, axis=1), all_logits


def test_prefill_and_decode_steps_match_a_full_forward(built):
    manifest_path, hf = built["causal-lm"]
    graphs = Graphs(manifest_path)
    ids = torch.randint(5, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    tokens, step_logits = graphs.greedy(ids.numpy(), np.ones((2, 9), dtype=np.int64), steps=6)
    sequence = torch.cat([ids, torch.from_numpy(tokens)], dim=1)
    with torch.no_grad():
        full = hf(input_ids=sequence).logits  # transformers' MegatronBertForCausalLM, no cache
    for step, logits in enumerate(step_logits):
        np.testing.assert_allclose(logits, full[:, 8 + step].numpy(), atol=1e-4, rtol=0, err_msg=f"step {step}")
    # ... and transformers' own greedy decoding picks the same tokens
    np.testing.assert_array_equal(tokens, full[:, 8:-1].argmax(-1).numpy())


def test_left_padded_batch_generates_what_each_prompt_generates_alone(built):
    graphs = Graphs(built["causal-lm"][0])
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 128, (n,), generator=generator).numpy() for n in (11, 4)]
    alone = [graphs.greedy(p[None], np.ones((1, len(p)), dtype=np.int64), steps=8)[0][0] for p in prompts]

    ids = np.zeros((2, 11), dtype=np.int64)
    mask = np.zeros((2, 11), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, 11 - len(prompt):], mask[row, 11 - len(prompt):] = prompt, 1
    together, _ = graphs.greedy(ids, mask, steps=8)
    np.testing.assert_array_equal(together[0], alone[0])
    np.testing.assert_array_equal(together[1], alone[1])
    assert not np.array_equal(alone[0], alone[1])  # the prompts lead to different text
