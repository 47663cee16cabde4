"""The causal-LM head with an explicit KV cache: prefill + one-token steps equal one full forward."""

import torch

from exporter.sources import checkpoints
from exporter.model.config import MegatronBertConfig
from tests.conftest import CONFIGS


def causal_lm(config_name="odd"):
    return checkpoints.random_model("causal-lm", MegatronBertConfig.from_hf_dict(CONFIGS[config_name]), seed=3).model


def left_padded(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_prefill_then_steps_equal_full_forward():
    model = causal_lm()
    ids = torch.randint(5, 1000, (3, 14), generator=torch.Generator().manual_seed(0))
    full, full_cache = model(ids)
    logits, cache = model(ids[:, :6])
    steps = [logits]
    for t in range(6, 14):
        logits, cache = model(ids[:, t:t + 1], torch.ones(3, t + 1, dtype=torch.long),
                              torch.full((3, 1), t), cache)
        steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    assert len(cache) == 3 and cache[0][0].shape == (3, 4, 14, 12)
    for (k, v), (fk, fv) in zip(cache, full_cache):
        assert (k - fk).abs().max() <= 1e-5 and (v - fv).abs().max() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone():
    model = causal_lm()
    prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    ids, mask = left_padded(prompts)
    logits, cache = model(ids, mask, positions(mask))
    step_ids = torch.tensor([[30], [40]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_logits, _ = model(step_ids, mask, positions(mask)[:, -1:], cache)
    for row, prompt in enumerate(prompts):
        alone, _ = model(torch.tensor([prompt + [step_ids[row, 0].item()]]))
        assert (logits[row, -1] - alone[0, len(prompt) - 1]).abs().max() <= 1e-5
        assert (step_logits[row, 0] - alone[0, -1]).abs().max() <= 1e-5
