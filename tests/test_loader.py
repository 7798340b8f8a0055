"""Weights load through our code from every supported source and give HF's logits."""
import pytest
import torch

import numpy as np

from engine import loader
from engine.loader import from_pretrained, load_model, random_model
from engine.attention.metadata import pack_step
from model import GPT


def prefill_logits(gpt: GPT, ids: list[int], device: str = "cpu", dtype: torch.dtype = torch.float32,
                   attention: str = "reference") -> torch.Tensor:
    """Our model's logits for every position of one sequence, through the packed paged path."""
    from engine.runner import ModelRunner
    runner = ModelRunner(gpt, torch.device(device), dtype, block_size=4, num_blocks=64, attention=attention)
    bm = runner.block_manager
    n = len(ids)
    bm.allocate(0, ids)
    step = pack_step(np.array([n]), np.array([n]), bm.table_array([0], bm.blocks_needed(n)), bm.block_size)
    rows = np.arange(n)
    with torch.inference_mode():
        return runner._forward(np.array(ids), step, rows).cpu()


IDS = [15496, 995, 11, 314, 716, 257, 1332, 13]


@torch.no_grad()
def test_save_pretrained_directory_gives_hf_logits(tiny_hf_model, tiny_model_dir):
    ours = prefill_logits(from_pretrained(tiny_model_dir), IDS)
    theirs = tiny_hf_model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_pytorch_model_bin_in_the_original_gpt2_layout_loads_too(tiny_hf_model, tmp_path):
    # OpenAI's GPT-2 checkpoints on the hub: pytorch_model.bin, keys without "transformer.", no lm_head
    tiny_hf_model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in tiny_hf_model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = prefill_logits(from_pretrained(str(tmp_path)), IDS)
    torch.testing.assert_close(ours, tiny_hf_model(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=1e-4)


def test_nanogpt_checkpoint_loads(tiny_model_dir, tmp_path):
    src = from_pretrained(tiny_model_dir)
    c = src.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      vocab_size=c.vocab_size, bias=True, dropout=0.0)
    state = {"_orig_mod." + k: v for k, v in src.state_dict().items()}  # as a torch.compile'd nanoGPT saves it
    torch.save({"model_args": model_args, "model": state}, tmp_path / "ckpt.pt")
    loaded = from_pretrained(str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(prefill_logits(loaded, IDS), prefill_logits(src, IDS))


def test_random_weights_of_a_named_shape():
    gpt, kind = load_model("gpt2", "random")
    assert kind == "random" and gpt.config.n_layer == 12 and gpt.config.n_embd == 768
    with pytest.raises(ValueError, match="unknown model shape"):
        random_model("gpt5")


def test_auto_falls_back_to_random_weights_loudly_when_pretrained_is_unobtainable(monkeypatch, caplog):
    def offline(source):
        raise OSError("hub unreachable")

    monkeypatch.setattr(loader, "from_pretrained", offline)
    gpt, kind = load_model("gpt2-medium", "auto")
    assert kind == "random" and gpt.config.n_layer == 24
    assert "RANDOM weights" in caplog.text
    with pytest.raises(OSError):
        load_model("gpt2-medium", "pretrained")


def test_a_missing_local_directory_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        from_pretrained(str(tmp_path))
    monkeypatch.setattr(loader, "_download_hf", lambda name: pytest.fail(f"asked the hub for {name}"))
    for path in (str(tmp_path / "nowhere"), "./nowhere", "models/gpt2/nowhere"):  # paths, not hub names
        with pytest.raises(FileNotFoundError, match=f"no such file or directory: {path}"):
            from_pretrained(path)
