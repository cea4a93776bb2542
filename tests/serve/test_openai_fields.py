"""OpenAI fields the server honours, through real HTTP on loopback: ``logprobs`` (completions: the top-N object;
chat: ``logprobs`` + ``top_logprobs``), ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``. Each is
checked against loratune's own model run step by step outside the server (the formula applied by hand), and
greedy answers with logprobs still equal ``generate``."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from served import Running, expected, make_files  # noqa: E402

from loratune.models import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
PROMPT = "the red cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("fields"))


@pytest.fixture(scope="module")
def server(files):
    running = Running(files)
    yield running
    running.close()


@pytest.fixture(scope="module")
def base(files):
    return load_model(files["base"], dtype=torch.float32, device="cpu")[0].eval()


@torch.no_grad()
def by_hand(model, ids: list[int], steps: int, bias: dict[int, float] = {}, presence: float = 0.0,
            frequency: float = 0.0, stops=()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens with OpenAI's definitions applied to each step's logits, and each step's log-softmax."""
    out, logprobs = [], []
    for _ in range(steps):
        logits = model.logits(model.hidden_states(torch.tensor([ids + out]))[:, -1])[0].float()
        for token, b in bias.items():
            logits[token] += b
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)
        token = int(logits.argmax())
        if token in stops:
            break
        out.append(token)
        logprobs.append(torch.log_softmax(logits, -1))
    return out, logprobs


def post(server, path: str, body: dict) -> dict:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post(path, json={"model": "base", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_logprobs_are_the_models(files, server, base):
    tok = files["tokenizer"]
    answer = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "logprobs": 3})
    choice = answer["choices"][0]
    assert choice["text"] == expected(files, PROMPT, None, 8)  # logprobs change nothing in the answer
    tokens, logprobs = by_hand(base, tok.encode(PROMPT), answer["usage"]["completion_tokens"], stops=tok.eos_ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in tokens]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for i, (token, want) in enumerate(zip(tokens, logprobs)):
        assert math.isclose(lp["token_logprobs"][i], float(want[token]), abs_tol=1e-4)
        top = torch.topk(want, 3)
        assert len(lp["top_logprobs"][i]) <= 3 and max(lp["top_logprobs"][i].values()) == lp["token_logprobs"][i]
        assert math.isclose(max(lp["top_logprobs"][i].values()), float(top.values[0]), abs_tol=1e-4)
    plain = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == choice["text"]


def test_chat_logprobs_and_streamed_logprobs(files, server):
    messages = [{"role": "user", "content": "where does the cat"}]
    whole = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "logprobs": True,
                                                  "top_logprobs": 2})["choices"][0]
    content = whole["logprobs"]["content"]
    assert "".join(c["token"] for c in content).startswith(whole["message"]["content"])
    for c in content:
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"} and len(c["top_logprobs"]) == 2
        assert c["bytes"] == list(c["token"].encode()) and c["logprob"] == c["top_logprobs"][0]["logprob"] <= 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        events = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 6,
                                                          "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                                          "stream": True}).text
    chunks = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    streamed = [c for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")
                for c in choice["logprobs"]["content"]]
    assert streamed == content  # every token's logprobs once, in order


def test_logit_bias_forces_and_forbids(files, server, base):
    tok = files["tokenizer"]
    greedy = by_hand(base, tok.encode(PROMPT), 1)[0][0]
    forced = next(t for t in range(5, 300) if t != greedy and t not in tok.eos_ids)
    answer = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "logit_bias": {str(forced): 100},
                                              "logprobs": 0})
    choice = answer["choices"][0]
    assert answer["usage"]["completion_tokens"] == 5 and choice["text"] == tok.decode([forced] * 5)
    assert all(lp > -1e-3 for lp in choice["logprobs"]["token_logprobs"])  # reported after the bias: ~certain
    refused = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1,
                                               "logit_bias": {str(greedy): -100}})["choices"][0]["text"]
    assert refused != tok.decode([greedy])
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                 "logit_bias": {str(forced): 100}})["choices"][0]
    assert chat["message"]["content"] == tok.decode([forced] * 3)


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (2.0, 0.0), (1.5, 0.5), (-2.0, 0.0)])
def test_penalties_follow_openais_definition(files, server, base, presence, frequency):
    tok = files["tokenizer"]
    want, _ = by_hand(base, tok.encode(PROMPT), 16, presence=presence, frequency=frequency, stops=tok.eos_ids)
    got = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "presence_penalty": presence,
                                           "frequency_penalty": frequency})["choices"][0]["text"]
    assert got == tok.decode(want)


def test_the_penalties_change_a_repetitive_answer(files, server, base):
    """The case the test above could pass without: plain greedy repeats tokens here, penalised greedy does not
    repeat them as often."""
    tok = files["tokenizer"]
    plain, _ = by_hand(base, tok.encode(PROMPT), 24, stops=tok.eos_ids)
    penalised, _ = by_hand(base, tok.encode(PROMPT), 24, frequency=2.0, stops=tok.eos_ids)
    assert len(set(plain)) < len(plain) and penalised != plain
