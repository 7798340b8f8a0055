"""The engine in its own process, driven through the worker's handle as the HTTP threads drive it."""
from conftest import request, wait_until
from engine.config import Settings
from engine_process import EngineProcess


def test_stopping_the_engine_process_aborts_what_is_in_flight_without_calling_it_a_death(tiny_model_dir):
    engine = EngineProcess(Settings(model=tiny_model_dir, weights="pretrained", device="cpu", kv_blocks=64,
                                    block_size=4))
    deaths, finished = [], []
    engine.on_fatal.append(deaths.append)
    engine.on_finish.append(finished.append)
    engine.start()
    done = engine.enqueue(request([1, 2, 3], 3))
    assert done.event.wait(60) and done.finish_reason == "length" and len(done.output_ids) == 3
    running = engine.enqueue(request([1, 2, 3], 200))
    wait_until(lambda: engine.load()["running"] == 1)
    engine.stop()
    assert running.event.is_set() and running.finish_reason == "abort"
    assert finished == [done, running] and deaths == [] and engine.fatal_error is None


class Recorded:
    """A stream sink as the worker's HTTP thread sees it: each delta's text and how many tokens it covers."""

    def __init__(self, inf):
        self.inf, self.deltas = inf, []

    def put(self, text):
        if text is not None:
            self.deltas.append((text, self.inf.streamed_tokens, len(self.inf.logprobs)))


def streamed(tiny_model_dir, stream_interval_ms: float, tokens: int = 24):
    engine = EngineProcess(Settings(model=tiny_model_dir, weights="pretrained", device="cpu", kv_blocks=64,
                                    block_size=4, stream_interval_ms=stream_interval_ms))
    engine.start()
    try:
        inf = request([1, 2, 3], tokens, logprobs=1)
        inf.stream = Recorded(inf)
        engine.enqueue(inf)
        assert inf.event.wait(60) and inf.finish_reason == "length"
    finally:
        engine.stop()
    return inf, inf.stream.deltas


def test_a_stream_gets_its_first_text_at_once_and_the_rest_at_most_every_interval(tiny_model_dir):
    inf, deltas = streamed(tiny_model_dir, stream_interval_ms=60_000)
    assert len(deltas) == 2  # the first text, then everything else with the finish
    first_text, first_tokens, _ = deltas[0]
    assert first_text and first_tokens <= 2  # a character may need two tokens
    assert "".join(text for text, _, _ in deltas) == inf.text
    assert deltas[-1][1:] == (24, 24)  # every token, and its logprob, covered once


def test_with_no_interval_a_stream_gets_text_every_step(tiny_model_dir):
    inf, deltas = streamed(tiny_model_dir, stream_interval_ms=0)
    assert "".join(text for text, _, _ in deltas) == inf.text
    assert len(deltas) >= 12  # a delta per token, but for tokens that end no character
    assert [tokens for _, tokens, _ in deltas] == sorted({tokens for _, tokens, _ in deltas})
