"""The reference MegatronBERT in PyTorch: the architecture and its nine heads, for inference.

MegatronBERT is BERT with the LayerNorms moved *before* each sub-layer (pre-LN):

    embeddings = word + position + token_type          (no LayerNorm here, unlike BERT)
    each layer:  x = x + Attention(LN(x));  x = x + MLP(LN(x))
    after the last layer: one final LN;  pooler = tanh(dense(h[:, 0]))

Module and parameter names mirror Hugging Face's `MegatronBert*` classes, so their state dicts load
unchanged. Dropout is left out: this model is only ever run in inference. Every head's forward
returns a dict named the way the exported ONNX outputs are named.

The causal-LM head takes and returns an explicit key/value cache (one (key, value) pair per layer,
each [batch, heads, past_length, head_size]) and explicit position ids, so that prefill and a
one-token decode step are both plain tensor functions that export to ONNX.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.model.config import MegatronBertConfig

KVCache = list[tuple[Tensor, Tensor]]

# Added to the attention scores of masked keys. Finite on purpose: a row whose keys are all masked
# (a left-pad position) stays finite instead of NaN, and the value survives conversion to fp16.
MASK_VALUE = -10000.0

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {  # keyed by config.hidden_act
    "gelu": F.gelu,  # the exact, erf-based GELU that BERT and Megatron use
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class Embeddings(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        return (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                + self.position_embeddings(position_ids))


class SelfAttention(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.num_heads, self.head_size = config.num_attention_heads, config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, x: Tensor) -> Tensor:  # [batch, seq, hidden] -> [batch, heads, seq, head_size]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: Tensor, mask_bias: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size) + mask_bias
        context = scores.softmax(dim=-1) @ v
        context = context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return context, (k, v)


class SelfOutput(nn.Module):  # HF keeps the attention's output projection in a module of its own
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class Attention(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self = SelfAttention(config)
        self.output = SelfOutput(config)

    def forward(self, x: Tensor, mask_bias: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        context, present = self.self(self.ln(x), mask_bias, past)
        return x + self.output.dense(context), present


class Intermediate(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]


class Output(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class Layer(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(self, x: Tensor, mask_bias: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, present = self.attention(x, mask_bias, past)
        mlp = self.output.dense(self.intermediate.act(self.intermediate.dense(self.ln(x))))
        return x + mlp, present


class Encoder(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # the final LayerNorm


class Pooler(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def attention_bias(attention_mask: Tensor, query_length: int, causal: bool, dtype: torch.dtype) -> Tensor:
    """[batch, keys] 0/1 mask -> additive bias [batch, 1, queries, keys]; queries are the last keys."""
    keep = attention_mask[:, None, None, :].bool()
    if causal:
        key_length = attention_mask.shape[1]
        key_pos = torch.arange(key_length, device=attention_mask.device)
        query_pos = key_pos[key_length - query_length:]
        keep = keep & (key_pos[None, :] <= query_pos[:, None])
    return torch.where(keep, 0.0, MASK_VALUE).to(dtype)


class MegatronBertModel(nn.Module):
    """Embeddings, the pre-LN encoder and (optionally) the pooler: HF's `MegatronBertModel`."""

    def __init__(self, config: MegatronBertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None) -> tuple[Tensor, Tensor | None, KVCache]:
        batch, length = input_ids.shape
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=input_ids.device).expand(batch, -1)

        x = self.embeddings(input_ids, token_type_ids, position_ids)
        mask_bias = attention_bias(attention_mask, length, self.config.is_decoder, x.dtype)
        present: KVCache = []
        for i, layer in enumerate(self.encoder.layer):
            x, kv = layer(x, mask_bias, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        hidden = self.encoder.ln(x)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return hidden, pooled, present


# ---- the heads -------------------------------------------------------------------------------

class PredictionHeadTransform(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class LMPredictionHead(nn.Module):
    """Vocabulary logits; `decoder.weight` is the word-embedding table when tie_word_embeddings."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class OnlyMLMHead(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.predictions = LMPredictionHead(config)


class OnlyNSPHead(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class PreTrainingHeads(nn.Module):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.predictions = LMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class HeadModel(nn.Module):
    """What every head shares: the encoder under `bert.`, and tying of the LM decoder if there is one."""

    bert: MegatronBertModel

    def tie_weights(self) -> None:
        cls = getattr(self, "cls", None)
        if cls is not None and hasattr(cls, "predictions") and self.bert.config.tie_word_embeddings:
            cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


class ForBase(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, pooled, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        assert pooled is not None
        return {"last_hidden_state": hidden, "pooler_output": pooled}


class ForMaskedLM(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.cls = OnlyMLMHead(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, _, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return {"logits": self.cls.predictions(hidden)}


class ForCausalLM(HeadModel):
    """Left-to-right LM over MegatronBERT (is_decoder): masked LM weights, causal attention, a KV cache."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.cls = OnlyMLMHead(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: KVCache | None = None
                ) -> tuple[Tensor, KVCache]:
        """attention_mask covers past and new tokens: [batch, past_length + new_length]."""
        hidden, _, present = self.bert(input_ids, attention_mask, None, position_ids, past_key_values)
        return self.cls.predictions(hidden), present


class ForNextSentencePrediction(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config)
        self.cls = OnlyNSPHead(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        _, pooled, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return {"logits": self.cls.seq_relationship(pooled)}


class ForPreTraining(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config)
        self.cls = PreTrainingHeads(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, pooled, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return {"prediction_logits": self.cls.predictions(hidden),
                "seq_relationship_logits": self.cls.seq_relationship(pooled)}


class ForSequenceClassification(HeadModel):
    """Logits over config.num_labels; the problem_type (softmax, sigmoid, regression) is post-processing."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        _, pooled, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return {"logits": self.classifier(pooled)}


class ForMultipleChoice(HeadModel):
    """Inputs are [batch, num_choices, seq]; each choice is scored on its own, one logit per choice."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1, t.shape[-1])

        _, pooled, _ = self.bert(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids))
        return {"logits": self.classifier(pooled).view(input_ids.shape[0], input_ids.shape[1])}


class ForTokenClassification(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, _, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return {"logits": self.classifier(hidden)}


class ForQuestionAnswering(HeadModel):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, _, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        start, end = self.qa_outputs(hidden).unbind(dim=-1)
        return {"start_logits": start, "end_logits": end}


HEAD_MODELS: dict[str, type[HeadModel]] = {
    "base": ForBase,
    "mlm": ForMaskedLM,
    "causal-lm": ForCausalLM,
    "nsp": ForNextSentencePrediction,
    "pretraining": ForPreTraining,
    "sequence-classification": ForSequenceClassification,
    "multiple-choice": ForMultipleChoice,
    "token-classification": ForTokenClassification,
    "qa": ForQuestionAnswering,
}


def build_head(head: str, config: MegatronBertConfig) -> HeadModel:
    """An uninitialized head in eval mode; causal-lm switches the config to a decoder."""
    if head == "causal-lm":
        config = dataclasses.replace(config, is_decoder=True)
    model = HEAD_MODELS[head](config)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def init_weights(model: nn.Module, initializer_range: float, seed: int) -> None:
    """BERT's initialization (normal linears and embeddings, unit LayerNorms), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
