"""A live server on loopback (tiny model, tp=2), driven by the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.server.launch import ServerProcess
from rsd_runtime.tiny_model import ensure_tiny_model
from rsd_runtime.tokenizer import Tokenizer
from conftest import wait_until

PROMPTS = ["Hello", "The card", "Once upon a time", "PCIe links"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tp=2, extra_args=["--max-num-seqs", "16"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(shm_prefix):
    """What LLM.generate gives for PROMPTS, greedy, 12 tokens each."""
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        return {p: (o.text, o.token_ids) for p, o in zip(PROMPTS, outs)}


def metrics(server) -> dict:
    text = httpx.get(server.base_url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(server, name: str) -> float:
    return next(v for (n, _), v in metrics(server).items() if n == name)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    status, body = server.health()
    assert status == 200 and body["ok"] and len(body["cards"]) == 2
    assert all(c["alive"] and c["pid"] for c in body["cards"])


def test_greedy_completion_equals_llm_generate(client, offline):
    for prompt in PROMPTS:
        r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == offline[prompt][0]
        assert r.usage.completion_tokens == 12
        timings = r.choices[0].model_extra["timings"]
        assert timings["emu_ttft_s"] > 0 and timings["ttft_s"] > 0 and timings["emu_latency_s"] > timings["emu_ttft_s"]


def test_token_id_prompts_give_the_same_text(client, server, offline):
    tokenizer = Tokenizer.from_file(ensure_tiny_model())
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    r = client.completions.create(model="tiny-llama", prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [offline[p][0] for p in PROMPTS[:2]]
    assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_chat_streaming_with_usage(client):
    kw = dict(model="tiny-llama", messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}],
              max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.base_url + "/v1/completions",
                      json={"prompt": "Hello", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": True}),
])
def test_stream_events_are_compact_json_in_openai_key_order(server, path, body):
    """Token events come from a prebuilt frame: byte for byte what encoding the whole event gives."""
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(events) == 6
    chat = "chat" in path
    for i, raw in enumerate(events):
        obj = json.loads(raw)
        assert raw == json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        assert list(obj) == ["id", "object", "created", "model", "choices"]
        assert obj["object"] == ("chat.completion.chunk" if chat else "text_completion")
        choice = obj["choices"][0]
        keys = ["index", "delta" if chat else "text", "logprobs", "finish_reason"]
        assert list(choice)[:4] == keys and (choice["finish_reason"] is None) == (i < 5)
    assert len({json.loads(e)["id"] for e in events}) == 1


def test_stop_string_never_shown(client, offline):
    text = offline["Once upon a time"][0]
    stop = text[4:7]
    assert stop.strip(), "the greedy text is too short to cut"
    kw = dict(model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    expect = text[:text.index(stop)]
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == expect


def test_n_seed_and_logprobs(client):
    kw = dict(model="tiny-llama", prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice samples with its own seed
    r = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    c = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob for e in content)  # greedy takes the most likely


def test_32_concurrent_streams_each_get_what_they_get_alone(server, client):
    prompts = [f"Request {i} says" for i in range(32)]
    alone = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        async with aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


def test_disconnect_aborts_and_frees_blocks(server):
    aborted = metric(server, "rsd:request_aborted_total")
    with httpx.stream("POST", server.base_url + "/v1/completions",
                      json={"prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert metric(server, "rsd:kv_cache_usage_perc") > 0
    assert wait_until(lambda: metric(server, "rsd:request_aborted_total") == aborted + 1, 5)
    assert wait_until(lambda: metric(server, "rsd:kv_cache_usage_perc") == 0.0, 5)
    assert metric(server, "rsd:num_requests_running") == 0


def test_non_streaming_disconnect_aborts(server):
    aborted = metric(server, "rsd:request_aborted_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1000,
                                                              "ignore_eos": True}, timeout=0.5)
    assert wait_until(lambda: metric(server, "rsd:request_aborted_total") == aborted + 1, 5)
    assert wait_until(lambda: metric(server, "rsd:kv_cache_usage_perc") == 0.0, 5)


BAD = [  # (what, body (bytes: sent raw), status, param)
    ("not JSON", b"{prompt: 1", 400, None),
    ("body not an object", b"[1, 2]", 400, None),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("prompt a number", {"prompt": 5}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("prompt list of mixed types", {"prompt": ["a", 1]}, 400, "prompt"),
    ("token id outside vocab", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("negative token id", {"prompt": [1, -2]}, 400, "prompt"),
    ("prompt longer than context", {"prompt": [5] * 1100}, 400, "prompt"),
    ("max_tokens past context", {"prompt": "Hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a string", {"prompt": "Hi", "max_tokens": "7"}, 400, "max_tokens"),
    ("temperature negative", {"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ("top_p zero", {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("top_k below -1", {"prompt": "Hi", "top_k": -5}, 400, "top_k"),
    ("n too large", {"prompt": "Hi", "n": 1000}, 400, "n"),
    ("logprobs too many", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    ("stream not a bool", {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("empty stop string", {"prompt": "Hi", "stop": [""]}, 400, "stop"),
    ("seed a float", {"prompt": "Hi", "seed": 1.5}, 400, "seed"),
    ("unknown model", {"model": "gpt-17", "prompt": "Hi"}, 404, "model"),
    ("chat: no messages", {"messages": []}, 400, "messages"),
    ("chat: bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat: content a number", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("chat: top_logprobs without logprobs", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("chat: max_completion_tokens past context", {"messages": [{"role": "user", "content": "x"}],
                                                  "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ("seed + n past the seed range", {"prompt": "Hi", "seed": 2 ** 64 - 1, "n": 2}, 400, "seed"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_get_4xx_naming_the_field(server, what, body, status, param):
    path = "/v1/chat/completions" if what.startswith("chat") else "/v1/completions"
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.base_url + path, **kw, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    assert err["param"] == param, err


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/completions", 405), ("POST", "/health", 405),
                                                ("GET", "/v1/nosuch", 404), ("GET", "/v1/models/gpt-17", 404)])
def test_wrong_routes_and_methods_get_openai_error_bodies(server, method, path, status):
    r = httpx.request(method, server.base_url + path, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]


def test_a_seed_past_its_range_for_a_later_choice_names_the_seed_sent(server):
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "seed": 2 ** 64 - 1, "n": 2},
                   timeout=10)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "seed"
    assert str(2 ** 64 - 1) in err["message"] and str(2 ** 64) not in err["message"].replace(str(2 ** 64 - 1), "")


def test_a_model_is_retrieved_by_name(client):
    m = client.models.retrieve("tiny-llama")
    assert m.id == "tiny-llama" and m.model_extra["max_model_len"] > 0


def test_a_refused_request_queues_nothing(server):
    """Three good prompts and one too long, two choices each: 400, and no choice was queued and then
    aborted on the way (the abort counter stays)."""
    before = metric(server, "rsd:request_aborted_total")
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": [[5, 6], [7], [8, 9], [5] * 1100], "n": 2},
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert metric(server, "rsd:request_aborted_total") == before
    assert metric(server, "rsd:num_requests_waiting") == 0 and metric(server, "rsd:num_requests_running") == 0


def test_a_temperature_too_small_for_float32_samples_argmax_and_the_engine_lives_on(server, client, offline):
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=1e-46,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline[PROMPTS[0]][0]  # greedy: the limit of a vanishing temperature
    status, body = server.health()
    assert status == 200 and body["engine_error"] is None


def test_a_client_gone_before_its_body_is_not_an_error_in_the_log(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"prompt\": ")
    assert wait_until(lambda: server.health()[0] == 200, 5)
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10)
    assert r.status_code == 200
    assert "ClientDisconnect" not in server.log_tail() and "Exception in ASGI application" not in server.log_tail()


def test_server_answers_after_bad_requests(server, client):
    assert len(BAD) >= 15
    assert server.health()[0] == 200
    r = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert metric(server, "rsd:num_requests_waiting") == 0


def test_metrics_parse_and_carry_both_clocks(server, client):
    client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    m = metrics(server)
    names = {n for n, _ in m}
    for name in ("rsd:num_requests_running", "rsd:num_requests_waiting", "rsd:kv_cache_usage_perc",
                 "rsd:prompt_tokens_total", "rsd:generation_tokens_total", "rsd:card_restarts_total"):
        assert name in names, name
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        for clock in ("wall", "emulated"):
            count = m[(f"rsd:{hist}_count", (("clock", clock), ("model_name", "tiny-llama")))]
            assert count > 0, (hist, clock)
    assert metric(server, "rsd:generation_tokens_total") >= 4
