"""bench.serve against a live server (a few prompts), and its workload and summary functions alone."""
from __future__ import annotations

import json
import math

import pytest

from bench import serve
from bench.serve_metrics import RequestResult, parse_goodput, summarize
from bench.workload import arrival_times, load_dataset, synthetic_prompts
from rsd_runtime.server.launch import ServerProcess


def test_bench_serve_measures_a_live_server(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hello", "output_len": 5}\n{"prompt": [0, 7, 9, 11], "output_len": 3}\n'
                    '{"prompt": "The card", "output_len": 4}\n')
    out = tmp_path / "serve.json"
    with ServerProcess(tp=2) as srv:
        code = serve.main(["--base-url", srv.base_url, "--num-prompts", "3", "--request-rate", "50",
                           "--dataset", str(data), "--goodput", "ttft:60000", "tpot:60000", "--json", str(out),
                           "--disable-tqdm"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["completed"] == 3 and doc["failed"] == 0 and doc["clock"] == "wall"
    assert doc["total_output_tokens"] == 12 and doc["total_input_tokens"] > 4
    assert doc["request_goodput"] == pytest.approx(doc["request_throughput"])
    for key in ("output_throughput", "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "std_e2el_ms"):
        assert doc[key] > 0, key
    assert doc["emulated"]["clock"] == "emulated" and doc["emulated"]["mean_ttft_ms"] > 0
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_compare_offline_alternates_rounds_on_the_same_prompts(tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = serve.main(["--launch", "--tp", "1", "--num-prompts", "4", "--input-len", "8", "--output-len", "6",
                       "--max-concurrency", "2", "--compare-offline", "--rounds", "2", "--json", str(out),
                       "--disable-tqdm"])
    assert code == 0
    doc = json.loads(out.read_text())
    rounds = doc["offline"]["rounds"]
    assert len(rounds) == 2 and all(r["total_output_tokens"] == doc["total_output_tokens"] == 24 for r in rounds)
    # two streams at a time: the offline batch is held to two requests as well, or it would batch all four
    assert all(r["max_num_seqs"] == 2 and r["tokens_per_step"] <= 2 and r["server_tokens_per_step"] <= 2
               for r in rounds)
    ratios = sorted(r["server_over_offline"] for r in rounds)
    assert doc["offline"]["server_over_offline"] == pytest.approx((ratios[0] + ratios[1]) / 2)
    assert "median ratio" in capsys.readouterr().out


def test_arrivals_repeat_and_have_the_asked_rate():
    a = arrival_times(2000, 10.0, 1.0, seed=3)
    assert a == arrival_times(2000, 10.0, 1.0, seed=3) and a[0] == 0.0
    assert a == sorted(a) and 2000 / a[-1] == pytest.approx(10.0, rel=0.1)
    assert arrival_times(4, math.inf) == [0.0] * 4
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(3, 1.0, 0)
    prompts = synthetic_prompts(3, 8, 4, 512, seed=1)
    assert prompts == synthetic_prompts(3, 8, 4, 512, seed=1) and all(len(p.prompt) == 8 for p in prompts)


@pytest.mark.parametrize("line,field", [('{"prompt": "x", "output_len": 0}', "output_len"),
                                        ('{"prompt": [1, -3], "output_len": 2}', "prompt"),
                                        ('{"prompt": "x", "output_len": 2, "arrival_s": -1}', "arrival_s"),
                                        ('[1]', "object"), ('{"prompt": ', "JSON")])
def test_bad_dataset_lines_are_named(tmp_path, line, field):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok", "output_len": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: .*{field}"):
        load_dataset(f)


def test_summary_keys_and_goodput():
    rs = [RequestResult(True, 4, 3, 0.1, [0.05, 0.05], 0.2), RequestResult(True, 4, 3, 0.5, [0.1, 0.1], 0.7),
          RequestResult(False, error="HTTP 503")]
    s = summarize(rs, 2.0, parse_goodput("ttft:200 tpot:60"))
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 1, 6)
    assert s["request_goodput"] == 0.5 and s["output_throughput"] == 3.0
    assert s["mean_ttft_ms"] == pytest.approx(300) and s["mean_tpot_ms"] == pytest.approx(75)
    with pytest.raises(ValueError, match="ttft:x"):
        parse_goodput("ttft:x")
