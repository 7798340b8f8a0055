"""The schedule's record (telemetry/timeline.py): what the engine writes for each step and each request, its
bounds and increments; GET /timeline, the demo burst and the live page's address on a real server; and the
benchmark of what recording costs."""
import json
import os

import pytest
import requests

from bench.__main__ import parser
from conftest import make_manager, request, run_until_idle, running_server, wait_until
from telemetry.timeline import Timeline

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def recorded(tiny_model_dir, policy: str = "dynamic", timeline: Timeline | None = None, **kw):
    """A manager that records into a fresh (or the given) timeline."""
    manager = make_manager(tiny_model_dir, policy, **kw)
    manager.attach_timeline(timeline or Timeline())
    return manager


def by_id(snapshot: dict) -> dict[int, dict]:
    return {r["id"]: r for r in snapshot["requests"]}


# ---- what is recorded ----

def test_a_request_goes_through_waiting_prefill_decoding_and_finished_in_order(tiny_model_dir):
    manager = recorded(tiny_model_dir, max_step_tokens=8)
    inf = manager.enqueue(request(list(range(1, 21)), 5))
    run_until_idle(manager)
    timeline = manager.timeline
    [r] = timeline.snapshot()["requests"]
    assert [p for _, p in r["phases"]] == ["waiting", "prefill", "decoding", "finished"]
    times = [t for t, _ in r["phases"]]
    assert times == sorted(times) and times == [r["arrival"], r["admitted"], r["first_token"], r["finish"]]
    assert r["first_token"] == round(inf.first_token_time - timeline.origin, 6)
    assert r["finish"] == round(inf.finish_time - timeline.origin, 6)
    assert [tokens for _, tokens in r["prefill_chunks"]] == [8, 8, 4]  # the 20-token prompt in 8-token chunks
    assert [step for step, _ in r["prefill_chunks"]] == [1, 2, 3]
    assert (r["prompt_tokens"], r["max_tokens"], r["output_tokens"]) == (20, 5, 5)
    assert (r["finish_reason"], r["preemptions"], r["request_id"]) == ("length", 0, inf.request_id)


def test_each_step_records_its_tokens_its_batch_and_the_kv_cache_in_use(tiny_model_dir):
    manager = recorded(tiny_model_dir)
    infs = [manager.enqueue(request([1, 2, 3], n)) for n in (2, 5, 9)]
    run_until_idle(manager)
    steps = manager.timeline.snapshot()["steps"]
    assert [s["step"] for s in steps] == list(range(1, manager.steps + 1))
    assert sum(s["prefill_tokens"] for s in steps) == 3 * len(infs)
    assert sum(s["decode_tokens"] for s in steps) == sum(len(inf.output_ids) - 1 for inf in infs)
    assert sum(s["sampled"] for s in steps) == sum(len(inf.output_ids) for inf in infs)
    assert [s["running"] for s in steps] == [3, 3, 2, 2, 2, 1, 1, 1, 1]  # requests finish after 2, 5, 9 tokens
    assert all(s["waiting"] == 0 and 0 < s["kv_usage"] <= 1 and s["duration"] > 0 for s in steps)
    starts = [s["start"] for s in steps]
    assert starts == sorted(starts)


def test_with_no_batching_the_next_request_is_admitted_when_the_previous_finishes(tiny_model_dir):
    manager = recorded(tiny_model_dir, "nobatch")
    infs = [manager.enqueue(request([1, 2], 3)) for _ in range(3)]
    run_until_idle(manager)
    snapshot = manager.timeline.snapshot()
    records = [by_id(snapshot)[inf.id] for inf in infs]
    for earlier, later in zip(records, records[1:]):
        assert later["admitted"] >= earlier["finish"]
    assert [s["waiting"] for s in snapshot["steps"]] == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert all(s["running"] == 1 for s in snapshot["steps"])


def test_with_dynamic_batching_an_arrival_is_admitted_while_others_decode(tiny_model_dir):
    manager = recorded(tiny_model_dir, "dynamic")
    first = manager.enqueue(request([1, 2], 10))
    for _ in range(3):
        manager.step()
    second = manager.enqueue(request([3, 4], 2))
    run_until_idle(manager)
    records = by_id(manager.timeline.snapshot())
    assert records[second.id]["finish"] < records[first.id]["finish"]
    assert [step for step, _ in records[second.id]["prefill_chunks"]] == [4]


def test_a_preempted_request_is_recorded_waiting_again_then_recomputed(tiny_model_dir):
    manager = recorded(tiny_model_dir, num_blocks=10, block_size=4)
    infs = [manager.enqueue(request([1, 2, 3, 4, 5], 30)) for _ in range(4)]
    run_until_idle(manager)
    records = by_id(manager.timeline.snapshot())
    preempted = [inf for inf in infs if inf.num_preemptions]
    assert preempted
    for inf in preempted:
        r = records[inf.id]
        phases = [p for _, p in r["phases"]]
        assert r["preemptions"] == inf.num_preemptions == phases.count("preempted")
        assert phases[-1] == "finished" and r["output_tokens"] == 30
        for i, phase in enumerate(phases):
            if phase == "preempted":  # its blocks are gone: it waits, then recomputes its tokens, then decodes
                assert phases[i + 1:i + 3] == ["prefill", "decoding"]
        assert len(r["prefill_chunks"]) > 1


# ---- bounds and increments ----

def test_the_record_keeps_only_the_last_steps_and_requests_it_is_sized_for(tiny_model_dir):
    manager = recorded(tiny_model_dir, "nobatch", timeline=Timeline(steps_kept=5, requests_kept=3))
    infs = [manager.enqueue(request([1, 2], 4)) for _ in range(6)]
    run_until_idle(manager)
    snapshot = manager.timeline.snapshot()
    assert [s["step"] for s in snapshot["steps"]] == list(range(manager.steps - 4, manager.steps + 1))
    assert snapshot["first_step"] == manager.steps - 4
    assert len(snapshot["requests"]) == 3
    assert {r["id"] for r in snapshot["requests"]} <= {inf.id for inf in infs}


def test_since_returns_the_steps_after_it_and_the_requests_that_changed_since_it_was_recorded(tiny_model_dir):
    manager = recorded(tiny_model_dir)
    early = manager.enqueue(request([1, 2], 2))
    manager.enqueue(request([1, 2], 5))
    run_until_idle(manager)
    seen = manager.timeline.snapshot()
    new = manager.enqueue(request([3, 4], 3))
    run_until_idle(manager)
    increment = manager.timeline.snapshot(since=seen["step"])
    assert [s["step"] for s in increment["steps"]] == list(range(seen["step"] + 1, manager.steps + 1))
    assert [r["id"] for r in increment["requests"]] == [new.id]  # `last` finished within step `since`: seen
    assert early.id in by_id(manager.timeline.snapshot(since=manager.steps + 100))  # another server's step: all


def test_a_change_after_the_last_step_comes_with_the_next_increment(tiny_model_dir):
    manager = recorded(tiny_model_dir)
    manager.enqueue(request([1, 2], 2))
    run_until_idle(manager)
    seen = manager.timeline.snapshot()
    waiting = manager.enqueue(request([1, 2], 2))
    manager.abort(waiting)
    assert not manager.step()  # the abort is taken in; no step runs
    r = by_id(manager.timeline.snapshot(since=seen["step"]))[waiting.id]
    assert r["finish_reason"] == "abort" and [p for _, p in r["phases"]] == ["waiting", "finished"]


def test_since_the_last_step_with_nothing_new_returns_no_steps_and_no_requests(tiny_model_dir):
    manager = recorded(tiny_model_dir)
    manager.enqueue(request([1, 2], 3))
    run_until_idle(manager)
    seen = manager.timeline.snapshot()
    assert seen["steps"] and seen["requests"]
    nothing = manager.timeline.snapshot(since=seen["step"])
    assert nothing["step"] == seen["step"] and nothing["steps"] == [] and nothing["requests"] == []


# ---- over HTTP, on a real server ----

@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, key=KEY) as url:
        yield url


def get_timeline(url: str, since: int | None = None) -> dict:
    r = requests.get(url + "/timeline", params={} if since is None else {"since": since}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_timeline_needs_the_key_like_stats(server):
    assert requests.get(server + "/timeline", timeout=10).status_code == 401
    assert requests.get(server + "/timeline", headers={"X-API-Key": KEY}, timeout=10).status_code == 200


def serve(url: str, request_id: str, num_tokens: int) -> None:
    r = requests.post(url + "/inference", json={"prompt": "Request 1", "num_tokens": num_tokens},
                      headers={**AUTH, "X-Request-Id": request_id}, timeout=60)
    assert r.status_code == 200


def test_timeline_shows_served_requests_and_then_increments(server):
    serve(server, "timeline-first", 4)
    data = get_timeline(server)
    assert (data["policy"], data["device"]) == ("dynamic", "cpu")
    [first] = [q for q in data["requests"] if q["request_id"] == "timeline-first"]
    assert (first["output_tokens"], first["finish_reason"]) == (4, "length")
    assert data["steps"] and data["steps"][-1]["step"] == data["step"]
    serve(server, "timeline-second", 2)
    later = get_timeline(server, since=data["step"])
    assert [s["step"] for s in later["steps"]] == list(range(data["step"] + 1, later["step"] + 1))
    assert "timeline-second" in {q["request_id"] for q in later["requests"]}


def test_a_poll_of_an_idle_server_at_its_last_step_returns_nothing(server):
    """The live page polls with since=<the last step>: an idle server must answer with nothing, not its whole
    record (up to STEPS_KEPT steps and REQUESTS_KEPT requests to every poll)."""
    requests.post(server + "/inference", json={"prompt": "a", "num_tokens": 4}, headers=AUTH, timeout=60)
    wait_until(lambda: server_stats_with_key(server)["running"] == 0 and server_stats_with_key(server)["waiting"] == 0)
    seen = get_timeline(server)
    assert seen["steps"]
    nothing = get_timeline(server, since=seen["step"])
    assert nothing["step"] == seen["step"] and nothing["steps"] == [] and nothing["requests"] == []


def server_stats_with_key(url: str) -> dict:
    return requests.get(url + "/stats", headers=AUTH, timeout=30).json()


def test_since_must_be_a_step_number(server):
    for since in ("-1", "x", "1.5"):
        r = requests.get(server + "/timeline", params={"since": since}, headers=AUTH, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"


def test_a_demo_burst_is_served_and_shows_on_the_timeline(server):
    r = requests.post(server + "/demo-burst", json={"requests": 4, "wait": 0}, headers=AUTH, timeout=10)
    assert r.status_code == 202 and r.json() == {"requests": 4, "wait": 0.0}

    def demo_finished() -> int:
        return sum(q["request_id"].startswith("demo-") and q["finish"] is not None
                   for q in get_timeline(server)["requests"])

    wait_until(lambda: demo_finished() == 4)
    bad = requests.post(server + "/demo-burst", json={"requests": 0}, headers=AUTH, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests"


def test_root_serves_the_live_page_to_a_browser_and_the_hint_to_everyone_else(server):
    page = requests.get(server + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10)
    assert page.status_code == 200 and '<canvas id="timeline">' in page.text and "Accept" in page.headers["Vary"]
    for accept in ("application/json", "*/*", None):
        hint = requests.get(server + "/", headers={"Accept": accept} if accept else {}, timeout=10)
        assert hint.status_code == 200 and hint.text.startswith("effective-batching: POST /inference")
    assert requests.get(server + "/static/live.js", timeout=10).status_code == 200  # the page's files need no key


# ---- what recording costs ----

def test_the_overhead_benchmark_reports_the_recordings_share_of_step_time(tiny_model_dir, tmp_path):
    args = parser().parse_args(["timeline-overhead", "--model", tiny_model_dir, "--requests", "2",
                                "--out", str(tmp_path)])
    with open(args.func(args)) as f:
        data = json.load(f)
    assert [r["case"] for r in data["results"]] == ["burst", "arrivals"]
    for row in data["results"]:
        assert row["steps"] > 0 and row["recorder_calls"] > row["steps"]
        assert 0 < row["recorder_share"] < 1 and row["recorder_us_per_step"] > 0
    assert os.path.exists(tmp_path / "timeline-overhead.png")
    assert "## timeline-overhead\n" in (tmp_path / "results.md").read_text()
