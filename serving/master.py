"""Runs in gunicorn's master (or in a lone worker that no master gave engines): starts the server's engine processes,
one per GPU (`ENGINES`), restarts one that dies, and stops them last.

Each engine listens on a Unix socket of its own, in a directory only this user can enter, and proves a random key
that the master hands to the workers it forks (and to the engine on its stdin). A restarted engine takes the same
address and key, so the workers reconnect to it by themselves (serving/client.py) while the other engines go on
serving. Each engine sees only its own GPU (CUDA_VISIBLE_DEVICES). Nothing here imports torch.
"""
import contextlib
import dataclasses
import logging
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

from engine.config import Settings
from serving.protocol import EngineSpec, StartFailed, Stop
from serving.sockets import Listener

log = logging.getLogger("effective-batching")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_TIMEOUT_S = 30.0
WATCH_S = 0.5  # how often the master looks for a dead engine


class EngineStartFailed(RuntimeError):
    """An engine process could not build its engine (weights, device, memory); the message is its error."""


def visible_gpus() -> list[str]:
    """The GPUs this server may use, as CUDA_VISIBLE_DEVICES names them (without importing torch): those it
    lists, else every one nvidia-smi sees, else none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and not d.strip().startswith("-")]
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def engine_devices(settings: Settings) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each engine (None: inherit): ENGINES engines, one per visible GPU by default,
    one on a CPU or on the one GPU that DEVICE=cuda:N names."""
    gpus = visible_gpus() if settings.device in ("auto", "cuda") else []
    count = settings.engines or max(1, len(gpus))
    if gpus and count > len(gpus) and settings.engines:
        log.warning("ENGINES=%d on %d GPUs: engines share GPUs", count, len(gpus))
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


def share_of_gpu(settings: Settings, engines_on_it: int) -> Settings:
    """An engine's settings where `engines_on_it` engines share its GPU: each fills its part of the memory."""
    return dataclasses.replace(settings, gpu_memory_utilization=settings.gpu_memory_utilization / engines_on_it)


class EngineProcess:
    """One engine process as the master sees it: start it, wait until its model is built, tell whether it still
    runs, start it again, stop it."""

    def __init__(self, settings: Settings, index: int, directory: str, gpu: str | None):
        self.settings, self.index, self.gpu = settings, index, gpu
        self.address = os.path.join(directory, f"engine-{index}.sock")  # the workers'
        self.control_address = os.path.join(directory, f"engine-{index}.control.sock")  # the master's
        self.authkey, self.control_key = secrets.token_bytes(32), secrets.token_bytes(32)
        self.owner = os.getpid()  # a process forked from this one inherits the handle, not the engine
        self.info: dict = {}
        self.process: subprocess.Popen | None = None
        self._listener: Listener | None = None
        self._control: Connection | None = None

    def launch(self) -> None:
        """Start the process; `wait_ready` waits for its model."""
        env = dict(os.environ)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        for path in (self.address, self.control_address):  # an engine that died leaves its sockets behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._listener = Listener(self.control_address, self.control_key)
        self.process = subprocess.Popen([sys.executable, "-m", "serving.engine_main", self.address], cwd=ROOT,
                                        stdin=subprocess.PIPE, env=env)
        spec = EngineSpec(self.settings, self.index, self.control_address, self.control_key, self.authkey)
        self.process.stdin.write(pickle.dumps(spec))
        self.process.stdin.close()

    def wait_ready(self) -> None:
        try:
            self._control = self._listener.accept_one(gone=lambda: self.process.poll() is not None)
            answer = self._control.recv()  # the model loads meanwhile
        except (EOFError, OSError):
            self.stop()
            raise RuntimeError(f"engine {self.index} exited with {describe_exit(self.process.returncode)} before it "
                               "was ready (the log above says why)") from None
        finally:
            self._listener.close()
        if isinstance(answer, StartFailed):
            self.stop()
            raise EngineStartFailed(answer.error)
        self.info = answer.info

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the engine: it aborts what is in flight, sends each worker its results, and exits."""
        if self._control is not None:
            try:
                self._control.send(Stop())
            except OSError:  # already gone
                pass
        if self.process is not None:
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("engine %d did not stop within %.0f s; killing it", self.index, STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait()
        if self._control is not None:
            self._control.close()
            self._control = None

    def forget(self) -> None:
        """In a process forked from the master: let go of the master's connection (the engine stops when the
        master's end closes, which this copy would hold open)."""
        if self._control is not None:
            self._control.close()
            self._control = None


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Engines:
    """The server's engine processes: started together (`Engines(settings)` launches them, `wait_ready` waits for
    their models), each restarted when it dies (`watch`), stopped together."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.directory = tempfile.mkdtemp(prefix="effective-batching-engines-")  # mode 0700
        devices = engine_devices(settings)
        self.processes = [EngineProcess(share_of_gpu(settings, devices.count(gpu)), i, self.directory, gpu)
                          for i, gpu in enumerate(devices)]
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            for process in self.processes:  # the models load side by side, while the master goes on
                process.launch()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Wait until every engine has built its model; if one cannot, stop them all and raise its error."""
        try:
            for process in self.processes:
                process.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def info(self) -> dict:
        return self.processes[0].info

    def watch(self) -> None:
        """Restart any engine that dies, from a thread of the master's, for as long as the server runs."""
        self._watcher = threading.Thread(target=self._watch, name="engine-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            for process in self.processes:
                if not process.alive and not self._stopping.is_set():
                    self._restart(process)

    def _restart(self, process: EngineProcess) -> None:
        log.error("engine %d exited with %s; starting a new one", process.index,
                  describe_exit(process.process.returncode))
        process.stop()
        try:
            process.launch()
            process.wait_ready()
            self.restarts += 1
            log.info("engine %d serves again", process.index)
        except Exception as e:  # tried again at the next look
            log.error("engine %d could not start again: %s", process.index, e)

    def forget(self) -> None:
        for process in self.processes:
            process.forget()

    @property
    def owner(self) -> int:
        return self.processes[0].owner

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=STOP_TIMEOUT_S)
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

