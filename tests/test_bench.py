"""The benchmark suite end to end on the CPU with the tiny model and tiny sizes: every sub-command runs, writes
its JSON (with the run's metadata), its plot and its table in results.md. Plus the bounds' arithmetic, the
workloads' exactness and the client's fallback for a server that does not stream."""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from bench import engine
from bench.__main__ import parser
from bench.http_throughput import engine_side
from bench.poisson import max_rate, within_p99_slo
from bench.roofline import distinct_kv_tokens, forward_flops, step_floor_s
from bench.scale import LONGTAIL
from bench.server import send_load
from bench.workloads import chat, long_tailed, offline, poisson_arrivals, seed_burst, shared_prefix
from client.load import Load
from client.workload import Request
from conftest import TINY, json_server, make_manager, request, run_until_idle
from engine.tokenizer import encode
from model import GPTConfig
from telemetry.latency import RequestRecord

INFO_KEYS = {"device", "torch", "dtype", "model", "weights", "git_commit", "date"}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("bench-results"))


def run_bench(out: str, *argv: str) -> dict:
    args = parser().parse_args([*argv, "--out", out])
    path = args.func(args)
    with open(path) as f:
        data = json.load(f)
    assert INFO_KEYS <= set(data["info"]) and data["info"]["weights"] == "pretrained"
    assert os.path.exists(os.path.join(out, f"{data['benchmark']}.png"))
    with open(os.path.join(out, "results.md")) as f:
        assert f"## {data['benchmark']}\n" in f.read()
    return data


def test_throughput_puts_batch_invariant_rows_beside_the_default_ones_with_their_cost(out, tiny_model_dir):
    data = run_bench(out, "throughput", "--model", tiny_model_dir, "--requests", "3", "--offline-min", "8",
                     "--offline-max", "16", "--policies", "dynamic", "--peers", "", "--batch-invariant")
    rows = {(r["system"], r["workload"]): r for r in data["results"]}
    for workload in ("burst", "offline"):
        default, invariant = rows[("ours-dynamic", workload)], rows[("ours-dynamic-invariant", workload)]
        assert "error" not in invariant and invariant["output_tokens"] == default["output_tokens"]
    assert [(c["workload"], c["of_default"] > 0) for c in data["batch_invariant_cost"]] == [("burst", True),
                                                                                          ("offline", True)]


def test_throughput_runs_our_policies_and_the_peers_on_one_workload(out, tiny_model_dir):
    data = run_bench(out, "throughput", "--model", tiny_model_dir, "--requests", "3", "--offline-min", "8",
                     "--offline-max", "16", "--nobatch-requests", "2")
    rows = {(r["system"], r["workload"]): r for r in data["results"]}
    for workload in ("burst", "offline"):
        for policy in ("nobatch", "static", "dynamic"):
            row = rows[(f"ours-{policy}", workload)]
            assert "error" not in row, row
            assert row["output_tokens"] == sum(r.num_tokens for r in row_requests(workload, row["requests"]))
            assert row["metrics"]["ttft_s"]["p50"] > 0
            longest = max(r.num_tokens for r in row_requests(workload, row["requests"]))
            assert row["steps"] >= longest  # at least one step per token of the longest request
            assert row["ms_per_step"] == pytest.approx(row["seconds"] * 1e3 / row["steps"])
        assert rows[("ours-nobatch", workload)]["requests"] == 2
        for peer in ("hf-continuous", "hf-static16"):  # a peer that failed is a failed benchmark, not a row
            row = rows[(peer, workload)]
            assert "error" not in row, row
            assert row["output_tokens"] == sum(r.num_tokens for r in row_requests(workload, row["requests"]))
            assert row["output_tokens_per_s"] > 0
    assert {(r["ours"], r["peer"]) for r in data["ratios"] if r["workload"] == "burst"} == {
        (f"ours-{p}", peer) for p in ("nobatch", "static", "dynamic") for peer in ("hf-continuous", "hf-static16")}


def row_requests(workload: str, n: int) -> list[Request]:
    return seed_burst(n) if workload == "burst" else offline(n, 8, 16)


def test_http_engine_columns_count_the_run_from_its_first_send_not_the_probe_before_it():
    """The client's probe for streaming runs a step before the clock starts; its step and the idle time after it
    are no part of the run (they showed as a single gap of tens of ms)."""
    origin_unix = time.time() - time.perf_counter()  # a snapshot whose times are this process's perf_counter
    sent = 100.0
    snapshot = dict(origin_unix=origin_unix,
                    requests=[dict(arrival=99.9), dict(arrival=sent + 0.0005), dict(arrival=sent + 0.002)],
                    steps=[dict(start=99.9, duration=0.002)] + [dict(start=sent + 0.001 + 0.003 * i, duration=0.002)
                                                              for i in range(3)])
    load = Load([RequestRecord(arrival=sent + d, first_token=sent + 0.01, finish=sent + 0.02, prompt_tokens=3,
                               output_tokens=2) for d in (0, 0.0001)], True)
    engine = engine_side(snapshot, load)
    assert engine["steps"] == 3 and engine["last_arrival_ms"] == pytest.approx(2, abs=0.01)
    assert engine["arrival_p50_ms"] == pytest.approx(1.25, abs=0.01)  # of this run's two requests
    assert engine["gap_ms_max"] == pytest.approx(1, abs=0.01)
    assert engine["ms_per_step"] == pytest.approx(8 / 3, abs=0.01)  # 3 steps of 2 ms, 2 gaps of 1 ms


def test_http_measures_each_policy_through_a_real_server(out, tiny_model_dir):
    data = run_bench(out, "http", "--model", tiny_model_dir, "--requests", "2", "--policies", "dynamic",
                     "--workloads", "burst", "--repeats", "2")
    assert len(data["results"]) == 2  # one row per repeat
    for row in data["results"]:
        assert (row["policy"], row["workload"], row["failed"]) == ("dynamic", "burst", 0)
        assert row["metrics"]["output_tokens"] == sum(r.num_tokens for r in seed_burst(2))
        if row["streaming"]:
            assert row["metrics"]["itl_s"]["p50"] > 0
        engine = row["engine"]  # the run as the server's /timeline saw it: this run's steps only
        longest = max(r.num_tokens for r in seed_burst(2))
        assert longest <= engine["steps"] <= 2 * longest
        assert 0 <= engine["arrival_p50_ms"] <= engine["last_arrival_ms"] <= row["metrics"]["duration_s"] * 1e3
        assert engine["step_ms"] > 0 and 0 <= engine["gap_ms_p50"] <= engine["gap_ms_p99"] <= engine["gap_ms_max"]
        assert engine["ms_per_step"] >= engine["step_ms"] - 0.01  # steps and the gaps between them
    assert data["server"]["policy"] == "dynamic"


def test_scale_runs_each_workload_on_one_and_on_two_engines(out, tiny_model_dir):
    data = run_bench(out, "scale", "--model", tiny_model_dir, "--requests", "3", "--longtail-requests", "4",
                     "--engine-counts", "1,2", "--workloads", "burst,longtail")
    rows = data["results"]
    assert [(r["workload"], r["engines"]) for r in rows] == [("burst", 1), ("longtail", 1), ("burst", 2),
                                                             ("longtail", 2)]
    assert all(r["failed"] == 0 and r["output_tokens_per_s"] > 0 and r["gpus"] == 0 for r in rows)
    assert [server["engines"] for server in data["servers"]] == [1, 2]
    assert [(s["workload"], s["engines"]) for s in data["speedups"]] == [("burst", 2), ("longtail", 2)]


def test_decode_times_our_step_and_hf_beside_the_roofline(out, tiny_model_dir):
    data = run_bench(out, "decode", "--model", tiny_model_dir, "--batches", "1,2", "--ctx", "32", "--iters", "3")
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert r["step_ms"] >= r["forward_ms"] > 0 and r["roofline_ms"] > 0 and r["steps"] >= 3
        assert r["hf_step_ms"] > 0 and r["ours_vs_hf"] == pytest.approx(r["hf_step_ms"] / r["step_ms"])
    assert data["copy_GBps"] > 0 and data["weight_GB"] > 0


def test_prefill_reports_each_prompt_lengths_share_of_the_matmul_peak(out, tiny_model_dir):
    data = run_bench(out, "prefill", "--model", tiny_model_dir, "--prompt-lengths", "8,40", "--requests", "3",
                     "--max-step-tokens", "32", "--max-batch", "4")
    assert [(r["prompt_tokens"], r["requests"]) for r in data["results"]] == [(8, 3), (40, 3)]
    tiny = GPTConfig(n_layer=TINY["n_layer"], n_embd=TINY["n_embd"], vocab_size=TINY["vocab_size"])
    for r in data["results"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] == pytest.approx(3 * r["prompt_tokens"] / r["seconds"])
        assert r["flops"] == 3 * forward_flops(tiny, 0, r["prompt_tokens"], True)
        assert r["matmul_peak_tflops"] == data["matmul_peak_tflops"] > 0
        assert r["of_matmul_peak"] == pytest.approx(r["tflops"] / r["matmul_peak_tflops"]) and r["of_matmul_peak"] > 0
        assert r["steps"] >= -(-3 * r["prompt_tokens"] // 32)  # at most MAX_STEP_TOKENS a step
        assert (r["max_batch"], r["max_step_tokens"]) == (4, 32)


@pytest.fixture
def torch_threads():
    """--threads sets torch's threads for the whole process: the tests after this one get them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_longtail_holds_the_run_in_process_and_over_http_to_its_schedules_bound(out, tiny_model_dir, torch_threads):
    """One torch thread: on a shared CPU two threads that wait on each other made the steps, and the limits the
    bound is measured from, vary tenfold from run to run."""
    data = run_bench(out, "longtail", "--model", tiny_model_dir, "--requests", "3", "--threads", "1")
    here, over_http = data["results"]
    assert (here["over_http"], over_http["over_http"]) == (False, True)
    requests = long_tailed(3, **LONGTAIL)
    for row in (here, over_http):
        assert "error" not in row, row
        assert row["requests"] == 3 and row["metrics"]["output_tokens"] == sum(r.num_tokens for r in requests)
        assert row["bound_tokens_per_s"] == pytest.approx(here["output_tokens"] / here["bound_s"])
        assert row["of_bound"] == pytest.approx(row["output_tokens_per_s"] / row["bound_tokens_per_s"])
        assert 0 < row["of_bound"] < 1.5
    assert here["steps"] >= max(r.num_tokens for r in requests) and 0 < here["bound_ms_per_step"] < here["ms_per_step"]
    assert over_http["failed"] == 0 and over_http["engine"]["steps"] >= max(r.num_tokens for r in requests)
    assert data["copy_GBps"] > 0 and data["matmul_peak_tflops"] > 0


def test_poisson_reports_latency_percentiles_and_goodput(out, tiny_model_dir):
    data = run_bench(out, "poisson", "--model", tiny_model_dir, "--requests", "4", "--qps", "50",
                     "--policies", "dynamic", "--prompt-median", "8", "--output-median", "4")
    [row] = data["results"]
    assert row["failed"] == 0 and row["metrics"]["requests"] == 4
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(row["metrics"][key]) == {"mean", "p50", "p90", "p99"}
    assert row["metrics"]["goodput_requests_per_s"] is not None


def test_poisson_max_rate_is_the_last_rate_before_the_first_that_misses_the_p99_slo():
    def row(qps, ttft_p99, tpot_p99, failed=0):
        r = dict(qps=qps, failed=failed, arrival_rate=qps * 1.01,
                 metrics=dict(ttft_s=dict(p99=ttft_p99), tpot_s=dict(p99=tpot_p99), requests_per_s=qps * 0.7))
        return r | dict(within_p99_slo=within_p99_slo(r, 0.1, 0.025))
    rows = [row(100, 0.02, 0.01), row(150, 0.09, None), row(200, 0.3, 0.01), row(250, 0.05, 0.01)]
    assert [r["within_p99_slo"] for r in rows] == [True, True, False, True]
    assert max_rate(rows) == dict(offered_qps=150, achieved_requests_per_s=105.0)
    assert not within_p99_slo(row(100, 0.02, 0.01, failed=1), 0.1, 0.025)  # a failed request misses it
    assert not within_p99_slo(row(100, 0.02, 0.03), 0.1, 0.025)
    assert max_rate([row(100, 0.2, 0.01)])["offered_qps"] is None


def test_http_runs_a_server_per_stream_interval_and_counts_tokens_per_event(out, tiny_model_dir):
    data = run_bench(out, "http", "--model", tiny_model_dir, "--requests", "3", "--policies", "dynamic",
                     "--workloads", "burst", "--stream-interval-ms", "0,60000")
    each_token, coalesced = data["results"]
    assert (each_token["stream_interval_ms"], coalesced["stream_interval_ms"]) == (0, 60000)
    assert each_token["failed"] == coalesced["failed"] == 0 and each_token["streaming"]
    # a token per event while the server keeps up (a tiny model on a CPU does); one interval longer than the run:
    # the first token, then the rest in one event at the end
    assert 1.0 <= each_token["tokens_per_event"] < coalesced["tokens_per_event"]
    assert coalesced["tokens_per_event"] == round(sum(r.num_tokens for r in seed_burst(3)) / (2 * 3), 3)


def test_interference_compares_chunked_and_whole_prefill(out, tiny_model_dir):
    data = run_bench(out, "interference", "--model", tiny_model_dir, "--decoders", "2", "--long-prompts", "2",
                     "--long-prompt-len", "64", "--every", "3", "--chunked", "16", "--unchunked", "256")
    chunked, whole = data["results"]
    assert (chunked["prefill"], whole["prefill"]) == ("chunked", "whole")
    for row in (chunked, whole):
        assert len(row["long_prompt_arrivals"]) == 2
        assert row["decode_itl_s"]["p99"] >= row["decode_itl_s"]["p50"] > 0
        assert len(row["decode_itl_timeline"]["itl"]) == 2 * (12 - 1)  # 2 decoders of (2 + 2) x 3 tokens each


def test_prefix_runs_every_workload_with_the_cache_on_and_off(out, tiny_model_dir):
    data = run_bench(out, "prefix", "--model", tiny_model_dir, "--shared-requests", "3", "--shared-prefix", "32",
                     "--shared-unique", "8", "--shared-output", "4", "--chat-conversations", "2", "--chat-turns", "3",
                     "--chat-opening", "8", "--chat-user", "4", "--chat-output", "24", "--burst-requests", "3",
                     "--offline-requests", "3", "--offline-min", "8", "--offline-max", "16")
    rows = {(r["system"], r["workload"], r["prefix_caching"]): r for r in data["results"]}
    requests = dict(shared=3, chat=2 * 3, burst=3, offline=3)
    prompt_tokens = dict(shared=3 * (32 + 8), chat=2 * (8 + 36 + 64),  # turns of 8, 8 + 24 + 4, 36 + 24 + 4
                         burst=3 * 3, offline=sum(len(r.prompt) for r in offline(3, 8, 16)))
    outputs = dict(shared=3 * 4, chat=6 * 24, burst=sum(r.num_tokens for r in seed_burst(3)),
                   offline=sum(r.num_tokens for r in offline(3, 8, 16)))
    for workload in ("shared", "chat", "burst", "offline"):
        for caching in (True, False):
            row = rows[("ours-dynamic", workload, caching)]
            assert "error" not in row, row
            assert row["requests"] == requests[workload] and row["prompt_tokens"] == prompt_tokens[workload]
            assert row["output_tokens"] == outputs[workload]
            tokens = row["prompt_tokens"] + row["output_tokens"]
            assert row["total_tokens_per_s"] == pytest.approx(tokens / row["seconds"])
            assert row["ttft_p99_s"] >= row["ttft_p50_s"] > 0
            assert row["hit_rate"] == pytest.approx(row["cached_tokens"] / row["prompt_tokens"])
        assert rows[("ours-dynamic", workload, False)]["cached_tokens"] == 0
    # each later turn finds the turn before's prompt and answer cached, in full blocks of 16 but its last token
    # (never computed): the answer's generated ids went into the next prompt (turn 1's 8 tokens fill no block)
    assert rows[("ours-dynamic", "chat", True)]["cached_tokens"] == 2 * ((8 + 24 - 1) // 16 * 16
                                                                         + (36 + 24 - 1) // 16 * 16)
    hf = rows[("hf-continuous", "shared", True)]  # a peer that failed is a failed benchmark, not a row
    assert "error" not in hf and hf["output_tokens"] == outputs["shared"], hf
    assert [r["workload"] for r in data["ratios"]] == ["shared", "chat", "burst", "offline"]
    assert all(r["total_tokens_per_s"] > 0 and r["ttft_p50"] > 0 for r in data["ratios"])
    # the floors: below the time taken; with the cache the shared prompt is neither computed again nor held (so
    # read) more than once a step; where nothing is shared the schedules, and their floors, are the same
    assert all(0 < r["of_bound"] < 1 for r in data["results"] if r["system"] == "ours-dynamic")
    bounds = {r["workload"]: r["bound"] for r in data["ratios"]}
    assert bounds["shared"] > 1 and bounds["burst"] == pytest.approx(1) and bounds["offline"] == pytest.approx(1)


# ---- bounds ----

def test_forward_flops_count_matmuls_causal_attention_and_the_logits_of_rows_that_sample():
    config = GPTConfig(n_layer=2, n_embd=4, vocab_size=10)  # 12·L·d² = 384 matmul weights, 4·L·d = 32, 2·V·d = 80
    assert forward_flops(config, 0, 3, True) == 2 * 384 * 3 + 32 * (1 + 2 + 3) + 80  # a 3-token prompt: 2576
    assert forward_flops(config, 3, 2, False) == 2 * 384 * 2 + 32 * (4 + 5)  # a chunk after 3 cached: 1824
    assert forward_flops(config, 5, 1, True) == 2 * 384 + 32 * 6 + 80  # a decode at context 6: 1040


def test_step_floor_is_the_slower_of_reading_and_computing():
    config = GPTConfig(n_layer=2, n_embd=4, vocab_size=10)
    step = [(0, 3, True), (3, 2, False)]  # 4400 FLOPs (above); K/V of 3 + 5 tokens
    reading = 1000 + 10 * 8  # bytes: weights, and 10 per token of K/V
    assert step_floor_s(config, step, 1000, 10, bandwidth=100, matmul=1000) == pytest.approx(reading / 100)
    assert step_floor_s(config, step, 1000, 10, bandwidth=100, matmul=100) == pytest.approx(4400 / 100)


def test_a_step_reads_a_block_that_several_sequences_hold_once():
    tables = np.array([[7, 8, 9], [7, 8, 3], [5, 0, 0]])  # blocks of 4: two sequences hold 7 and 8
    step = [(9, 1, True), (8, 1, True), (2, 1, True)]  # contexts of 10, 9 and 3 tokens
    assert distinct_kv_tokens(step, tables, 4) == 8 + 2 + 1 + 3  # 7, 8 once; 9: 2, 3: 1; 5: 3
    config = GPTConfig(n_layer=2, n_embd=4, vocab_size=10)
    assert step_floor_s(config, step, 1000, 10, 100, 1e9, kv_tokens=14) == pytest.approx((1000 + 140) / 100)


@pytest.mark.parametrize("overlap", [False, True])
def test_recorded_steps_are_each_step_as_launched_and_when_it_was_read(tiny_model_dir, overlap):
    """A 12-token prompt in chunks of 8 and 4 (the last samples), then decodes until its 3 tokens are sampled; with
    overlapped steps each step is recorded as launched too, before the step before it is read."""
    manager = make_manager(tiny_model_dir, max_step_tokens=8, overlap=overlap)
    tables, times = [], []
    with engine.recorded_steps(manager.runner, tables, times) as steps:
        manager.enqueue(request(list(range(1, 13)), 3))
        run_until_idle(manager)
    assert steps == [[(0, 8, False)], [(8, 4, True)], [(12, 1, True)], [(13, 1, True)]]
    launched, read = zip(*times[1:])  # the steps that sample: each read after its launch, in launch order
    assert all(a <= b for a, b in zip(launched, read)) and list(read) == sorted(read)
    kv_tokens = [distinct_kv_tokens(step, table, 4) for step, table in zip(steps, tables)]
    assert kv_tokens == [8, 12, 13, 14]  # each step's context, its new tokens included
    assert "launch" not in vars(manager.runner)  # the runner's own again


# ---- workloads ----

def test_workloads_replay_the_peer_tables_token_totals():
    assert sum(r.num_tokens for r in seed_burst(100)) == 8410
    assert sum(r.num_tokens for r in offline(256, 64, 512)) == 72412
    assert sum(r.num_tokens for r in seed_burst(30)) == 2470  # cpu burst
    assert sum(r.num_tokens for r in offline(32, 32, 128)) == 2441  # cpu offline


def test_prefix_workloads_share_what_they_should_and_fit_the_context():
    shared = shared_prefix(4, 20, 5, 3)
    assert all(r.prompt[:20] == shared[0].prompt[:20] and len(r.prompt) == 25 and r.num_tokens == 3 for r in shared)
    assert len({tuple(r.prompt[20:]) for r in shared}) == 4
    conversations = chat(64, 6, 200, 40, 64)
    assert conversations[0].longest == 200 + 5 * (64 + 40) + 64 <= 1024  # the full size's last turn
    assert len({tuple(c.opening) for c in conversations}) == 64 and all(c.turns == 6 for c in conversations)
    with pytest.raises(ValueError):
        chat(1, 6, 600, 40, 64)


def test_text_prompts_encode_to_exactly_their_token_count():
    for r in offline(5, 1, 900, seed=3):
        assert len(encode(r.text)) == len(r.prompt)


def test_long_tailed_lengths_fit_the_context():
    requests = long_tailed(500, 140, 120, 1.0, context=1024)
    assert all(len(r.prompt) >= 4 and r.num_tokens >= 4 for r in requests)
    assert all(len(r.prompt) + r.num_tokens <= 1024 for r in requests)
    assert max(r.num_tokens for r in requests) > 4 * 120  # a long tail


def test_poisson_arrivals_replay_one_pattern_at_every_rate():
    requests = seed_burst(50)
    slow, fast = poisson_arrivals(requests, 1.0), poisson_arrivals(requests, 4.0)
    assert slow[0].arrival == 0.0
    assert [r.arrival / 4 for r in slow] == pytest.approx([r.arrival for r in fast])
    assert 25 < slow[-1].arrival < 100  # 49 gaps of mean 1 s


# ---- the client without streaming ----

def plain_server(headers, body: dict) -> tuple[int, dict]:
    """An /inference without streaming: it rejects the unknown 'stream' field, as the original server did."""
    if "stream" in body:
        return 400, {"error": {"message": "unknown field 'stream'"}}
    return 200, {"ttft": 0.25, "prompt_tokens": 99, "completion_tokens": body["num_tokens"]}


def test_client_falls_back_to_plain_responses_without_streaming():
    with json_server(plain_server) as url:
        load = send_load(url, [Request([1, 2, 3], 5), Request([4], 7)])
    assert not load.streaming and not load.errors
    assert sorted(r.output_tokens for r in load.records) == [5, 7]
    assert {r.prompt_tokens for r in load.records} == {1, 3}  # the workload's own count
    assert all(r.ttft == pytest.approx(0.25) and r.token_times == [] for r in load.records)


class ChunkedStreamServer(BaseHTTPRequestHandler):
    """Streams each request's tokens as server-sent events in chunks that cut events apart, then drops the
    connection without saying so (as a server does with a connection it kept idle too long)."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        events = [{"text": "x", "finish_reason": None}] * (body["num_tokens"] - 1) + [
            {"text": "y", "finish_reason": "length"}]
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(stream), 7):  # 7 bytes a chunk: events and lines split across chunks
            chunk = stream[start:start + 7]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def log_message(self, *_):
        pass


def test_client_reads_chunked_event_streams_and_replaces_connections_the_server_dropped():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChunkedStreamServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # three requests, each on a connection the last one's response left for dead
        load = send_load(f"http://127.0.0.1:{server.server_port}",
                        [Request([1, 2, 3], 5), Request([4], 3), Request([5], 4, arrival=1.5)])
    finally:
        server.shutdown()
    assert load.streaming and not load.errors
    assert sorted(r.output_tokens for r in load.records) == [3, 4, 5]
    assert sorted(len(r.token_times) for r in load.records) == [3, 4, 5]  # one per event with text
    assert all(r.first_token == r.token_times[0] <= r.finish for r in load.records)
