"""The GPU path against the CPU fp32 reference (skipped without CUDA; run on the device machine): Triton attention,
decode CUDA graphs, bf16."""
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import torch

from conftest import assert_nothing_leaked, request, run_until_idle, running_server
from batching import BatchingManager, make_policy
from engine.loader import from_pretrained
from engine.runner import ModelRunner
from engine.params import SamplingParams
from engine.tokenizer import decode, encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpu_runner(model_dir: str, dtype: torch.dtype = torch.float32, graphs: bool = True, **kw) -> ModelRunner:
    kw = dict(block_size=16, num_blocks=512, attention="triton", cuda_graphs=graphs, max_batch=32) | kw
    return ModelRunner(from_pretrained(model_dir), torch.device("cuda"), dtype, **kw)


def cpu_runner(model_dir: str) -> ModelRunner:
    return ModelRunner(from_pretrained(model_dir), torch.device("cpu"), torch.float32, block_size=16, num_blocks=512)


def greedy(runner: ModelRunner, work, policy: str = "dynamic", **kw) -> list[list[int]]:
    manager = BatchingManager(runner, make_policy(policy, 32), **kw)
    reqs = [manager.enqueue(request(p, n)) for p, n in work]
    run_until_idle(manager)
    assert_nothing_leaked(manager)
    return [r.output_ids for r in reqs]


def work(n=12, seed=3):
    rng = random.Random(seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(1, 60))], rng.randint(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_fp32_on_gpu_with_graphs_gives_the_cpu_tokens(tiny_model_dir, policy):
    w = work()
    assert greedy(gpu_runner(tiny_model_dir), w, policy) == greedy(cpu_runner(tiny_model_dir), w, policy)


def test_fp32_on_gpu_gives_the_cpu_tokens_with_chunked_prefill_and_preemption(tiny_model_dir):
    w = work(16, seed=5)
    # 40 blocks of 4 tokens for 16 requests of up to 100 tokens: the pool runs dry and sequences are preempted
    small = dict(block_size=4, num_blocks=40)
    ours = greedy(gpu_runner(tiny_model_dir, **small), w, max_step_tokens=48)
    want = greedy(ModelRunner(from_pretrained(tiny_model_dir), torch.device("cpu"), torch.float32, **small), w,
                  max_step_tokens=48)
    assert ours == want


@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_fp32_on_gpu_gives_the_cpu_tokens_from_cached_prefixes(tiny_model_dir, policy):
    """Requests that share a prompt's first blocks, in three waves (a wave finds blocks the one before holds, or
    left): on graphs, with prefill chunks after a cached prefix and preemption, overlapped, the CPU's tokens."""
    from test_prefix_cache import run_in_waves, shared_workload
    system = list(range(1000, 1040))
    w = [(system + p, n) for p, n in shared_workload(seed=4)]  # 53+ tokens in common: 3 blocks of 16
    small = dict(block_size=16, num_blocks=24)

    def tokens(runner: ModelRunner) -> tuple[list, int]:
        manager = BatchingManager(runner, make_policy(policy, 32), max_step_tokens=40, overlap=True)
        reqs = run_in_waves(manager, w, waves=3)
        return [r.output_ids for r in reqs], sum(r.cached_tokens for r in reqs)

    ours, cached = tokens(gpu_runner(tiny_model_dir, **small))
    assert (ours, cached) == tokens(ModelRunner(from_pretrained(tiny_model_dir), torch.device("cpu"),
                                                torch.float32, **small))
    assert cached > 0


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_decodes_sharing_a_cached_prefix_attend_to_it_once_and_give_the_cpu_tokens(tiny_model_dir, graphs,
                                                                                   monkeypatch):
    """Cascade attention (engine/attention/triton_shared.py): 40 requests after one 160-token system prompt decode
    together, the prompt's blocks attended to once for all of them, on the shared-prefix graphs or eagerly."""
    from engine.attention import metadata
    rng = random.Random(7)
    system = [rng.randrange(50257) for _ in range(160)]
    w = [(system + [rng.randrange(50257) for _ in range(rng.randint(1, 30))], rng.randint(8, 24)) for _ in range(40)]
    runner = gpu_runner(tiny_model_dir, graphs=graphs, max_batch=64)
    found, find = [], metadata.find_shared_prefix
    monkeypatch.setattr(metadata, "find_shared_prefix", lambda *a: found.append(find(*a)) or found[-1])
    ours = greedy(runner, w, max_step_tokens=4096)
    monkeypatch.undo()
    assert ours == greedy(cpu_runner(tiny_model_dir), w, max_step_tokens=4096)
    assert sum(f is not None and len(f.table) == 10 for f in found) >= 7  # 10 blocks; at least every step all 40 decode
    assert (runner.cascade_graphs is not None) == graphs


def test_sampled_tokens_and_logprobs_on_graphs_are_the_same_overlapped_or_not(tiny_model_dir):
    """Overlapped decodes take the token the sampler drew (not the graph's argmax) from the device."""
    w = work(8, seed=9)
    kinds = [dict(temperature=0.9, seed=i, logprobs=2) if i % 2 else dict(temperature=0.7, top_k=40, top_p=0.9)
             for i in range(len(w))]

    def generate(overlap: bool) -> list:
        runner = gpu_runner(tiny_model_dir, seed=0)
        manager = BatchingManager(runner, make_policy("dynamic", 32), overlap=overlap)
        reqs = [manager.enqueue(request(p, n, **kw)) for (p, n), kw in zip(w, kinds)]
        run_until_idle(manager)
        assert_nothing_leaked(manager)
        return [(r.output_ids, [t.logprob for t in r.logprobs]) for r in reqs]

    overlapped, one_at_a_time = generate(True), generate(False)
    assert [ids for ids, _ in overlapped] == [ids for ids, _ in one_at_a_time]
    for (_, a), (_, b) in zip(overlapped, one_at_a_time):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_reference_attention_on_gpu_gives_the_cpu_tokens(tiny_model_dir):
    w = work(6)
    ref = gpu_runner(tiny_model_dir, graphs=False, attention="reference")
    assert greedy(ref, w) == greedy(cpu_runner(tiny_model_dir), w)


@dataclass
class DecodingSequence:
    """What the model runner reads of a sequence (runner.Sequence)."""
    id: int
    token_ids: list[int]
    num_computed: int
    params: SamplingParams
    seed: int | None = None
    num_pending: int = 0


def decode_plan(runner: ModelRunner, n: int, ctx: int, seed: int = 0):
    rng = random.Random(seed)
    seqs = [DecodingSequence(i, [rng.randrange(50257) for _ in range(ctx + i)], ctx + i - 1,
                             SamplingParams(temperature=0)) for i in range(n)]
    for s in seqs:
        runner.block_manager.allocate(s.id, s.token_ids)
    return seqs


@torch.inference_mode()
def replayed_and_eager_logits(runner: ModelRunner, n: int = 5, ctx: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one decode step of `n` sequences, replayed on the decode graph and run eagerly."""
    seqs = decode_plan(runner, n, ctx)
    for s in seqs:  # fill the cache with real K/V through an eager prefill
        s.num_computed = 0
    runner.run([(s, len(s.token_ids) - 1) for s in seqs])
    for s in seqs:
        s.num_computed = len(s.token_ids) - 1
    from engine.attention.metadata import pack_step
    bm = runner.block_manager
    ctx_lens = np.array([len(s.token_ids) for s in seqs])
    ids = np.array([s.token_ids[-1] for s in seqs])
    step = pack_step(np.ones(n, dtype=np.int64), ctx_lens, bm.table_array([s.id for s in seqs], runner.table_width),
                     bm.block_size)
    replayed = runner.graphs.run(ids, np.full(n, -1), step)[0].clone()
    return replayed, runner._forward(ids, step, np.arange(n))


def test_graph_replay_gives_the_eager_logits_of_the_same_step(tiny_model_dir):
    replayed, eager = replayed_and_eager_logits(gpu_runner(tiny_model_dir))
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_kernels_launched_with_pdl_give_bitwise_the_logits_of_plain_launches(tiny_model_dir, monkeypatch):
    """engine/pdl.py changes when a kernel's programs start, never what they compute: in bf16 (the products'
    few-rows tiling, with the weights prefetched) on the decode graph and eagerly."""
    from engine import pdl
    with_pdl = replayed_and_eager_logits(gpu_runner(tiny_model_dir, torch.bfloat16))
    monkeypatch.setenv("PDL", "false")
    assert not pdl.enabled(torch.device("cuda"))
    without = replayed_and_eager_logits(gpu_runner(tiny_model_dir, torch.bfloat16))
    for got, want in zip(with_pdl, without):
        assert torch.equal(got, want)


@torch.inference_mode()
def test_a_mixed_step_on_a_graph_gives_the_eager_logits(tiny_model_dir):
    from engine.attention.metadata import pack_step
    runner = gpu_runner(tiny_model_dir)
    seqs = decode_plan(runner, 6, 40)  # 3 decodes, then chunks of 5, 17 and 33 tokens after some context
    chunks = [1, 1, 1, 5, 17, 33]
    for s, n in zip(seqs, chunks):
        s.num_computed = len(s.token_ids) - n
    bm = runner.block_manager
    q = np.array(chunks)
    ctx = np.array([len(s.token_ids) for s in seqs])
    ids = np.concatenate([s.token_ids[-n:] for s, n in zip(seqs, chunks)])
    step = pack_step(q, ctx, bm.table_array([s.id for s in seqs], runner.table_width), bm.block_size)
    rows = np.cumsum(q) - 1
    host = np.full(len(ids), -1)
    replayed = runner.mixed_graphs.run(ids, host, step, rows)[0].clone()
    eager = runner._forward(ids, step, rows)
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["decode graph", "mixed graph", "eager"])
@torch.inference_mode()
def test_decodes_fed_on_the_device_with_the_last_steps_tokens_give_the_logits_of_host_fed_ones(tiny_model_dir, path):
    runner = gpu_runner(tiny_model_dir)
    seqs = decode_plan(runner, 5, 40)
    prompt = seqs[4]  # the mixed graph's and the eager step's prefill beside the decodes
    for s in seqs[:4]:
        runner.block_manager.grow(s.id, len(s.token_ids) + 1)
    first = runner.launch([(s, 1) for s in seqs[:4]])  # samples each decode's next token, on the device
    for s in seqs[:4]:
        s.num_computed, s.num_pending = len(s.token_ids), 1
    plan = [(s, 1) for s in seqs[:4]] + ([(prompt, len(prompt.token_ids))] if path != "decode graph" else [])
    prompt.num_computed = 0
    if path == "eager":
        runner.graphs = runner.mixed_graphs = None
    on_device = runner.launch(plan).drawn.logits.clone()
    for s, token in zip(seqs[:4], first.wait().values()):  # the same step, its tokens from the host
        s.token_ids.append(token.token)
        s.num_pending = 0
    want = runner.launch(plan).drawn.logits
    torch.testing.assert_close(on_device, want, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_padded_graph_step_writes_only_its_own_sequences_slots(tiny_model_dir):
    runner = gpu_runner(tiny_model_dir)
    seqs = decode_plan(runner, 8, 30)
    runner.run([(s, 1) for s in seqs])  # bucket 8: every buffer row holds a live sequence's slot
    for s in seqs:
        s.num_computed += 1
        s.token_ids.append(1)
        runner.block_manager.grow(s.id, len(s.token_ids))
    before = runner.kv_cache.clone()
    runner.run([(s, 1) for s in seqs[:5]])  # bucket 8 again, rows 5..7 are padding now
    changed = (runner.kv_cache != before).flatten(4).any(-1)  # (2, layer, block, slot)
    bm, want = runner.block_manager, torch.zeros_like(changed)
    for s in seqs[:5]:
        p = s.num_computed
        want[:, :, bm.tables[s.id][p // bm.block_size], p % bm.block_size] = True
    want[:, :, bm.num_blocks] = changed[:, :, bm.num_blocks]  # the spare block takes the padding rows' writes
    assert torch.equal(changed, want)


def test_bf16_logits_are_close_to_fp32_and_greedy_tokens_mostly_agree(tiny_model_dir):
    from test_loader import IDS, prefill_logits
    ref = prefill_logits(from_pretrained(tiny_model_dir), IDS)
    out = prefill_logits(from_pretrained(tiny_model_dir), IDS, "cuda", torch.bfloat16, attention="triton")
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    w = work(8)
    ours = greedy(gpu_runner(tiny_model_dir, torch.bfloat16), w)
    want = greedy(cpu_runner(tiny_model_dir), w)
    first_tokens_equal = sum(a[0] == b[0] for a, b in zip(ours, want))
    assert first_tokens_equal >= 6  # bf16 may flip a near-tie; most first tokens must agree


def test_two_engines_on_the_gpus_serve_one_server_and_give_the_cpu_tokens(tiny_model_dir):
    """ENGINES=2: on a machine of several GPUs each engine has its own, on one GPU they share it (each its part of
    the memory). Greedy requests spread over both give the tokens of the CPU's fp32 engine."""
    prompts = [" ".join(["hello"] * (i + 1)) for i in range(8)]
    with running_server("dynamic", tiny_model_dir, DEVICE="cuda", DTYPE="float32", ENGINES="2") as url:
        health = requests.get(url + "/health", timeout=30).json()
        assert health["engines"] == health["engines-serving"] == 2 and len(set(health["engine-pids"])) == 2
        with ThreadPoolExecutor(len(prompts)) as pool:  # at once: the router spreads them over both engines
            answers = list(pool.map(lambda p: requests.post(url + "/inference", timeout=120, json={
                "prompt": p, "num_tokens": 12, "temperature": 0}).json(), prompts))
        per_engine = requests.get(url + "/stats", timeout=30).json()["per-engine"]
    want = greedy(cpu_runner(tiny_model_dir), [(encode(p), 12) for p in prompts])
    assert [a["text"] for a in answers] == [decode(ids) for ids in want]
    assert [e["steps"] > 0 for e in per_engine] == [True, True]  # both engines ran
