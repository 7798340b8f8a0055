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
