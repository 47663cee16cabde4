"""runtime.Session's task helpers: ONNX Runtime's outputs through a helper give what the reference
PyTorch head's outputs give through the same helper, for every head."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_same_result, torch_backend
from runtime import Session, UserError
from runtime.generation import Generator, SamplingOptions

CALLS = {
    "base": [lambda s: s.embed("the cat sat on the mat", pooling=p) for p in ("cls", "mean", "pooler")]
    + [lambda s: s.embed(["a b c", "the cat sat on the mat today"], pooling="mean")],
    "mlm": [lambda s: s.fill_mask("the cat [MASK] on the mat", top_k=3),
            lambda s: s.fill_mask(["[MASK] is it", "it is [MASK] and [MASK]"], top_k=2)],
    "pretraining": [lambda s: s.fill_mask("the cat [MASK] on the mat"),
                    lambda s: s.next_sentence(["it rained", "no"], ["the road is wet", "yes it is"])],
    "nsp": [lambda s: s.next_sentence("it rained", "the road is wet")],
    "sequence-classification": [lambda s: s.classify("what a fine day"),
                                lambda s: s.classify(["bad", "good", "so so"], top_k=None),
                                lambda s: s.classify("is it", text_pair="it is")],
    "multiple-choice": [lambda s: s.choose("the sky is", ["blue", "green"]),
                        lambda s: s.choose(["a", "b"], [["x", "y", "z"], ["p", "q", "r", "s"]])],
    "token-classification": [lambda s: s.tag("john lives in the new city of york", aggregation=a)
                             for a in ("none", "simple", "first", "max", "average")]
    + [lambda s: s.tag(["a b c", "the thing is there"])],
    "qa": [lambda s: s.answer("who sat", "the cat sat on the mat in the sun"),
           lambda s: s.answer(["who sat", "where"], ["the cat sat on the mat", "on the mat"], top_k=3),
           lambda s: s.answer("where", "in the park " * 30, handle_impossible_answer=True, doc_stride=8)],
    "causal-lm": [lambda s: s.generate("the sky is", max_new_tokens=6),
                  lambda s: s.generate(["the sky is", "a b"], max_new_tokens=5),
                  lambda s: s.generate("it is", max_new_tokens=6, do_sample=True, seed=3, top_k=20, top_p=0.9)],
}


def sessions(built, head):
    manifest_path, _ = built[head]
    onnx_session = Session(manifest_path)
    torch_session = Session(manifest_path)
    torch_session._backend = torch_backend(onnx_session.manifest.source["checkpoint"], head)
    return onnx_session, torch_session


@pytest.mark.parametrize("head", list(CALLS))
def test_helpers_on_onnx_equal_helpers_on_pytorch(built, head):
    onnx_session, torch_session = sessions(built, head)
    for call in CALLS[head]:
        assert_same_result(call(onnx_session), call(torch_session))


def test_helper_results_have_the_documented_shape(built):
    qa = Session(built["qa"][0])
    found = qa.answer("who sat", "the cat sat on the mat")
    assert set(found) == {"answer", "score", "start", "end"}
    assert found["answer"] == "the cat sat on the mat"[found["start"]:found["end"]] and 0 < found["score"] <= 1
    classifier = Session(built["sequence-classification"][0])
    labels = classifier.classify("a b", top_k=None)
    assert [r["label"] for r in labels] in (["LABEL_0", "LABEL_1"], ["LABEL_1", "LABEL_0"])
    assert sum(r["score"] for r in labels) == pytest.approx(1.0)
    tags = Session(built["token-classification"][0]).tag("john lives in york", aggregation="none")
    assert all(t["word"] == "john lives in york"[t["start"]:t["end"]] for t in tags)
    embedder = Session(built["base"][0])
    assert embedder.embed("a b").shape == (32,) and embedder.embed(["a", "b c"]).shape == (2, 32)


def test_wrong_helper_names_the_right_ones(built):
    with pytest.raises(UserError, match=r"classify\(\) is not a helper of the qa head; it has: answer\(\)"):
        Session(built["qa"][0]).classify("text")
    with pytest.raises(UserError, match=r"fill_mask\(\), next_sentence\(\)"):
        Session(built["pretraining"][0]).answer("q", "c")


class SpottingBackend:
    """A QA 'model' that points at one token id wherever it occurs: isolates the windowing logic."""

    name = "spotting"

    def __init__(self, token: int):
        self.token = token

    def run(self, graph, feed, keep=frozenset()):
        hit = np.where(feed["input_ids"] == self.token, 8.0, 0.0).astype(np.float32)
        return {"start_logits": hit, "end_logits": hit}


def test_qa_finds_an_answer_in_the_last_window_of_a_long_context(built):
    qa = Session(built["qa"][0])
    qa._backend = SpottingBackend(qa.tokenizer.token_to_id("?"))
    context = "the cat sat on the mat . " * 20 + "it was ? there"
    assert len(qa.tokenizer.encode(context).ids) > 3 * qa.max_length
    found = qa.answer("where", context, doc_stride=16)
    assert (found["answer"], found["start"]) == ("?", context.index("?"))
    windows = qa._windows(qa._window_tokenizer(16), 16, "where", context)
    assert len(windows) >= 4 and "?" in qa.tokenizer.decode(windows[-1].ids, skip_special_tokens=False)
    assert "?" not in qa.tokenizer.decode(windows[0].ids)


def test_qa_no_answer(built):
    qa = Session(built["qa"][0])
    qa._backend = SpottingBackend(qa.tokenizer.token_to_id("[CLS]"))  # only "no answer" scores
    found = qa.answer("where", "the cat sat", handle_impossible_answer=True)
    assert (found["answer"], found["start"], found["end"]) == ("", 0, 0) and found["score"] > 0.99
    assert qa.answer("where", "the cat sat")["answer"] != ""  # without the option, the best span


# ---- generation ------------------------------------------------------------------------------

def hf_greedy(hf, ids: list[int], steps: int) -> list[int]:
    import torch

    sequence = torch.tensor([ids])
    for _ in range(steps):
        with torch.no_grad():
            next_token = hf(input_ids=sequence).logits[0, -1].argmax()
        sequence = torch.cat([sequence, next_token.view(1, 1)], dim=1)
    return sequence[0, len(ids):].tolist()


def test_greedy_generation_equals_transformers(built):
    manifest_path, hf = built["causal-lm"]
    session = Session(manifest_path)
    generator = Generator(session, SamplingOptions(max_new_tokens=7))
    prompts = generator.prompt_ids(["the sky is", "a b c d e f"])
    tokens = np.array(list(generator.steps(prompts))).T
    sep = session.special["sep"]
    for prompt, row in zip(prompts, tokens):
        expected = hf_greedy(hf, prompt, 7)
        stop = expected.index(sep) + 1 if sep in expected else len(expected)
        assert row.tolist()[:stop] == expected[:stop]
    text = session.generate("the sky is", max_new_tokens=7)
    assert text == session._generator(7, False, 1.0, 0, 1.0, None, ())._text(prompts[0], tokens[0].tolist())[0]


def test_batched_prompts_generate_what_each_generates_alone(built):
    session = Session(built["causal-lm"][0])
    prompts = ["the sky is", "a", "it is on"]
    together = session.generate(prompts, max_new_tokens=8)
    assert together == [session.generate(p, max_new_tokens=8) for p in prompts]
    assert len(set(together)) > 1


def test_seeded_sampling_is_reproducible_and_streaming_matches(built):
    session = Session(built["causal-lm"][0])
    sample = lambda seed: session.generate("the sky", max_new_tokens=8, do_sample=True, seed=seed, temperature=1.5)
    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(6)}) > 1
    assert "".join(session.generate_stream("the sky", max_new_tokens=8)) == session.generate("the sky", max_new_tokens=8)
    streamed = "".join(session.generate_stream("the sky", max_new_tokens=8, do_sample=True, seed=7, temperature=1.5))
    assert streamed == sample(7)


def test_generation_stops_at_stop_strings(built):
    session = Session(built["causal-lm"][0])
    full = session.generate("the sky", max_new_tokens=8)
    stop = full.strip()[1:3]
    cut = session.generate("the sky", max_new_tokens=8, stop=[stop])
    assert cut == full[:full.index(stop)] and stop not in cut
