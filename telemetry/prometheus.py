"""Prometheus metrics for GET /metrics, named as vLLM names them (`vllm:` prefix, `model_name` label), so vLLM's
Grafana dashboards and alerts work unchanged; our extra `policy` label says which batching policy served.

Requests are accounted when they finish (an `on_finish` callback: the thread that hands a worker its results):
tokens, preemptions, prefix-cache queries and hits (in prompt tokens, as vLLM counts them, once a request has
been admitted; only while prefix caching is on), success by finish reason (stop, length, abort, error), and the
latency and length
histograms of completed (stop or length) requests. Gauges (running, waiting, KV-cache usage) are sampled from
the engine's load once a second, and again when this worker serves a scrape.

Several gunicorn workers: prometheus-client's multiprocess mode (gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR
before the workers start). Counters and histograms add up over workers (each accounts its own requests); the
gauges are each engine's (an `engine` label), which every live worker publishes, so they are shown once (livemax).
"""
import bisect
import collections
import logging
import os
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, \
    generate_latest, multiprocess

log = logging.getLogger("effective-batching")

LABELS = ("model_name", "policy")
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]  # vLLM's, as the rest
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]

ENGINE_LABELS = LABELS + ("engine",)  # the gauges are each engine's (serving/: one engine process per GPU)
RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch", ENGINE_LABELS,
                multiprocess_mode="livemax")
WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting to run (new or preempted)", ENGINE_LABELS,
                multiprocess_mode="livemax")
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1 (1 = every block in use)", ENGINE_LABELS,
                 multiprocess_mode="livemax")
PREEMPTIONS = Counter("vllm:num_preemptions", "Sequences preempted (blocks freed, recomputed later)", LABELS)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens prefilled", LABELS)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated", LABELS)
PREFIX_QUERIES = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", LABELS)
PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", LABELS)
SUCCESS = Counter("vllm:request_success", "Finished requests by finish reason", LABELS + ("finished_reason",))
TTFT = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token", LABELS, buckets=TTFT_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens", LABELS,
                buckets=ITL_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish", LABELS, buckets=LATENCY_BUCKETS)
QUEUE = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled", LABELS, buckets=LATENCY_BUCKETS)
PROMPT_LEN = Histogram("vllm:request_prompt_tokens", "Prompt length of completed requests", LABELS,
                       buckets=TOKEN_BUCKETS)
GENERATION_LEN = Histogram("vllm:request_generation_tokens", "Generated tokens of completed requests", LABELS,
                           buckets=TOKEN_BUCKETS)
FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineMetrics:
    """This worker's engine, as Prometheus sees it."""

    def __init__(self, model_name: str, policy: str, prefix_caching: bool = True):
        labels = dict(model_name=model_name, policy=policy)
        self.labels = labels
        self.prefix_caching = prefix_caching
        self.prefix_queries, self.prefix_hits = PREFIX_QUERIES.labels(**labels), PREFIX_HITS.labels(**labels)
        self.preemptions = PREEMPTIONS.labels(**labels)
        self.prompt_tokens, self.generation_tokens = PROMPT_TOKENS.labels(**labels), GENERATION_TOKENS.labels(**labels)
        self.success = {r: SUCCESS.labels(**labels, finished_reason=r) for r in FINISH_REASONS}  # all 4 from the start
        self.ttft, self.itl, self.e2e, self.queue = (h.labels(**labels) for h in (TTFT, ITL, E2E, QUEUE))
        self.prompt_len, self.generation_len = PROMPT_LEN.labels(**labels), GENERATION_LEN.labels(**labels)
        self._lock = threading.Lock()

    def record(self, inf) -> None:
        """Account one finished Inference (an on_finish callback)."""
        self.success[inf.finish_reason].inc()
        self.preemptions.inc(inf.num_preemptions)  # counted when the request ends, by the worker that served it
        if inf.first_token_time is not None:
            self.prompt_tokens.inc(len(inf.prompt_ids))
        if self.prefix_caching and inf.scheduled_time is not None:
            self.prefix_queries.inc(len(inf.prompt_ids))
            self.prefix_hits.inc(inf.cached_tokens)
        self.generation_tokens.inc(len(inf.token_times))
        if inf.finish_reason not in ("stop", "length"):
            return
        self.ttft.observe(inf.first_token_time - inf.arrival_time)
        observe_many(self.itl, [after - before for before, after in zip(inf.token_times, inf.token_times[1:])])
        self.e2e.observe(inf.finish_time - inf.arrival_time)
        self.queue.observe(inf.scheduled_time - inf.arrival_time)
        self.prompt_len.observe(len(inf.prompt_ids))
        self.generation_len.observe(len(inf.token_times))

    def publish_load(self, load: dict) -> None:
        """Set the gauges from an Engine's load(): each engine's where several serve ("per-engine"), else the one's
        as engine "0"."""
        with self._lock:
            for engine_load in load.get("per-engine", [{**load, "engine": 0}]):
                engine = str(engine_load["engine"])
                RUNNING.labels(**self.labels, engine=engine).set(engine_load["running"])
                WAITING.labels(**self.labels, engine=engine).set(engine_load["waiting"])
                KV_USAGE.labels(**self.labels, engine=engine).set(engine_load["kv-cache-usage"])

    def start_publisher(self, manager, period_s: float = 1.0) -> None:
        """Publish the engine's load every period_s seconds for as long as its thread runs."""
        def publish_while_alive() -> None:
            while manager.alive:
                try:
                    self.publish_load(manager.load())
                except Exception:
                    log.exception("publishing metrics failed")
                time.sleep(period_s)

        threading.Thread(target=publish_while_alive, name="metrics", daemon=True).start()


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for each value, in one increment per bucket that gets any. A request's inter-token
    gaps are hundreds of values, observed on the thread that hands results to the HTTP threads; in multiprocess
    mode an observation costs several microseconds, a burst's tokens tens of milliseconds of that thread. Uses
    the fields observe() itself uses (prometheus-client is pinned; tests/test_prometheus.py checks the two
    agree)."""
    if not values:
        return
    histogram._raise_if_not_observable()
    histogram._sum.inc(sum(values))
    for bucket, n in collections.Counter(bisect.bisect_left(histogram._upper_bounds, v) for v in values).items():
        histogram._buckets[bucket].inc(n)  # the first bound >= v, as observe() picks it


def render() -> tuple[bytes, str]:
    """The exposition text: all workers' metrics in multiprocess mode, else this process's."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
