"""Runs in an HTTP worker: the `Engine` the HTTP side drives when the engines run in processes of their own, one
per GPU (serving/master.py), all reached from every worker.

Each request goes to the engine with the least outstanding work: the prompt tokens it has still to prefill and
the tokens it has still to generate, as the engine last said (at least every HEARTBEAT_S while it runs), plus what
this worker sent it since (`pick`) -- unless another engine likely holds the prompt's first blocks in its prefix
cache and is not much busier: the request goes there and its cached prefix is not computed again. Which engine
holds what is this worker's guess (`PrefixIndex`: where it sent each block last), as SGLang's router guesses
from its own radix tree: other workers send too and engines evict, so a guess can miss, which costs only the
prefill the cache would have saved. An engine that dies takes down only its own requests: one that has sent
nothing to its client yet (no streamed text) is resubmitted to another engine, the rest end with an error; the
master starts a new engine on the same address, and a thread of this worker's connects to it again.
"""
import logging
import math
import threading
import time
from collections import OrderedDict

from batching import Inference, Limits
from engine.prefix import cacheable_block_hashes, salt_key
from serving.client import EngineClient, fail
from telemetry.stats import ServerStats

log = logging.getLogger("effective-batching")

RECONNECT_S = 0.5


class PrefixIndex:
    """Which engine this worker last sent each prompt block to (by the block's name, engine/prefix.py): a guess
    at what each engine's prefix cache holds, bounded like the engines' KV pools."""

    def __init__(self, block_size: int, capacity: int):
        self.block_size, self.capacity = block_size, capacity
        self._engine_of: OrderedDict[int, int] = OrderedDict()  # block name -> engine index, least recent first

    def names(self, inf: Inference) -> list[int]:
        """The names of the prompt's blocks that a cache could supply."""
        return [h for h, _ in cacheable_block_hashes(inf.prompt_ids, self.block_size, salt_key(inf.cache_salt))]

    def longest(self, names: list[int]) -> tuple[int | None, int]:
        """The engine that was sent the longest run of these blocks from the first, and how many."""
        engine = self._engine_of.get(names[0]) if names else None
        if engine is None:
            return None, 0
        run = 1
        while run < len(names) and self._engine_of.get(names[run]) == engine:
            run += 1
        return engine, run

    def sent(self, names: list[int], engine: int) -> None:
        for name in names:
            self._engine_of[name] = engine
            self._engine_of.move_to_end(name)
        while len(self._engine_of) > self.capacity:
            self._engine_of.popitem(last=False)


class NoEngine(RuntimeError):
    """Every engine is down (HTTP 503)."""


class Router:

    def __init__(self, addresses: list[tuple[str, bytes]], max_waiting: int, data_dir: str,
                 connect_timeout_s: float = math.inf, slack_tokens: int = 2048):
        """Connects to every engine, waiting for those that do not serve yet (a server's engines load their model
        meanwhile; a worker forked while one restarts waits for it): a worker serves once it reaches them all.
        After connect_timeout_s it goes on with those it reached, and connects to the others once they serve.
        slack_tokens: how much more outstanding work than the least busy engine the engine that likely caches a
        request's prompt may have and still be sent it (ROUTING_SLACK_TOKENS)."""
        self.addresses = addresses
        self.slack_tokens = slack_tokens
        self.on_finish: list = [self._forget]  # then this process's own callbacks (metrics)
        self.clients: list[EngineClient | None] = [None] * len(addresses)
        deadline = time.monotonic() + connect_timeout_s
        while not all(self._connect_all()):
            if time.monotonic() > deadline:
                if any(self.clients):
                    break
                raise NoEngine(f"no engine answered within {connect_timeout_s:.0f} s")
            time.sleep(RECONNECT_S)
        first = next(c for c in self.clients if c is not None)
        self.info = {**first.info, "engines": len(addresses)}
        for key in ("engine", "engine-pid", "engine-started"):
            self.info.pop(key, None)
        self.limits = Limits(self.info["max-context"], self.info["block-size"], self.info["kv-blocks-total"],
                             max_waiting)
        self.prefixes = PrefixIndex(self.info["block-size"], self.info["kv-blocks-total"] * len(addresses)) \
            if self.info.get("prefix-caching") and len(addresses) > 1 else None
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._where: dict[int, EngineClient] = {}  # Inference.id -> the engine it runs on
        self._stopping = False

    # ---- Engine ----

    def enqueue(self, inf: Inference) -> Inference:
        client = self.pick(inf)
        with self._lock:
            self._where[inf.id] = client
        return client.enqueue(inf)

    def pick(self, inf: Inference) -> EngineClient:
        """The engine for a request: the one likely to hold the longest cached prefix of its prompt, unless that
        one has more than slack_tokens more outstanding work than the least busy engine, which takes it then."""
        live = self._live()
        outstanding = {c.index: c.load()["outstanding-tokens"] for c in live}
        chosen = min(live, key=lambda c: outstanding[c.index])
        if self.prefixes is None:
            return chosen
        with self._lock:
            names = self.prefixes.names(inf)
            engine, blocks = self.prefixes.longest(names)
            if blocks and engine in outstanding and \
                    outstanding[engine] - outstanding[chosen.index] <= self.slack_tokens:
                chosen = next(c for c in live if c.index == engine)
            self.prefixes.sent(names, chosen.index)
        return chosen

    def _forget(self, inf: Inference) -> None:
        with self._lock:
            self._where.pop(inf.id, None)

    def abort(self, inf: Inference) -> None:
        with self._lock:
            client = self._where.get(inf.id)
        if client is not None:
            client.abort(inf)

    def load(self) -> dict:
        """The engines' loads added up, and each engine's own ("per-engine": its index, pid and start, the moment
        from which its lifetime figures in /stats count, with it)."""
        loads = [{"engine": c.index, "engine-pid": c.info["engine-pid"], "engine-started": c.info["engine-started"],
                  **c.load()} for c in self._serving()]
        total = {key: sum(load[key] for load in loads) for key in
                 ("running", "waiting", "outstanding-tokens", "kv-blocks-free", "kv-blocks-total", "preemptions",
                  "steps")}
        total["kv-cache-usage"] = 1 - total["kv-blocks-free"] / total["kv-blocks-total"] if loads else 0.0
        return {**total, "engines-serving": len(loads), "per-engine": loads}

    def stats(self) -> ServerStats:
        """Every serving engine's statistics, merged: one question to each."""
        return ServerStats.merged([c.ask("stats") for c in self._live()], self.data_dir)

    def timeline_since(self, since: int = 0, engine: int = 0) -> dict:
        client = self.clients[engine] if 0 <= engine < len(self.clients) else None
        if client is None or not client.alive:
            raise NoEngine(f"engine {engine} is not serving" if client is not None or 0 <= engine < len(self.clients)
                           else f"there is no engine {engine}; this server has {len(self.clients)}")
        return client.ask("timeline", since)

    def _serving(self) -> list[EngineClient]:
        return [c for c in self.clients if c is not None and c.alive]

    def _live(self) -> list[EngineClient]:
        """The serving engines; NoEngine if none is."""
        live = self._serving()
        if not live:
            raise NoEngine(self.fatal_error or "no engine is serving")
        return live

    @property
    def alive(self) -> bool:
        return bool(self._serving())

    @property
    def fatal_error(self) -> str | None:
        """Set while no engine serves: why."""
        if self.alive:
            return None
        errors = [c.fatal_error for c in self.clients if c is not None and c.fatal_error]
        return "; ".join(errors) or "no engine is serving"

    @property
    def last_step_time(self) -> float:
        return max((c.last_step_time for c in self._serving()), default=0.0)

    def start(self) -> None:
        for index, client in enumerate(self.clients):
            if client is None:
                self._reconnect_soon(index)
            else:
                client.start()

    def stop(self) -> None:
        self._stopping = True
        for client in self.clients:
            if client is not None:
                client.stop()

    # ---- engines that die and come back ----

    def _connect_all(self) -> list[bool]:
        """Connect to each engine not connected yet that serves now; which are connected."""
        for index, client in enumerate(self.clients):
            if client is None:
                try:
                    self.clients[index] = self._connect(index)
                except (OSError, EOFError):  # not serving (yet, or again: the master restarts it)
                    pass
        return [client is not None for client in self.clients]

    def _connect(self, index: int) -> EngineClient:
        address, authkey = self.addresses[index]
        client = EngineClient(address, authkey, on_lost=self._lost)
        client.on_finish = self.on_finish  # one list: callbacks added later reach every engine's requests
        return client

    def _lost(self, client: EngineClient, in_flight: list[Inference]) -> None:
        """An engine died: resubmit elsewhere what has sent nothing to its client, fail the rest, and reconnect."""
        with self._lock:
            for inf in in_flight:
                self._where.pop(inf.id, None)
        for inf in in_flight:
            if inf.streamed_tokens == 0 and self.alive:  # nothing has reached its client yet
                try:
                    self.enqueue(inf)
                    log.info("%s: resubmitted to another engine", inf.request_id)
                    continue
                except NoEngine:
                    pass
            fail(inf, "error", client.fatal_error, self.on_finish)
        self._reconnect_soon(client.index)

    def _reconnect_soon(self, index: int) -> None:
        threading.Thread(target=self._reconnect, args=(index,), name=f"engine-{index}-reconnect", daemon=True).start()

    def _reconnect(self, index: int) -> None:
        while not self._stopping:
            try:
                client = self._connect(index)
            except (OSError, EOFError):  # not back yet (the master starts it again)
                time.sleep(RECONNECT_S)
                continue
            client.start()
            self.clients[index] = client
            log.info("reconnected to engine %d", index)
            return
