"""bench/gpu_check.py's dry run: the GPU check's own code path (Hydra configs, the dataloaders, FSDP2 with bf16 mixed
precision in a one-process group, the trainers' steps, FLOP counts, the fp32 comparison, the table) on the tiny
model with gloo, so that the script a GPU session runs cannot rot."""
import subprocess
import sys

import torch

from bench.gpu_check import Contender, contenders, model_flops, parse_args
from bench.step_work import step_work
from dataloader import CHOSEN_KEYS, REJECTED_KEYS
from memory_plan import model_shape
from utils import REPO_ROOT


def test_the_dry_run_trains_every_loss_and_layout_and_passes_the_fp32_check(tmp_path):
    output = tmp_path / "gpu_check.md"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--output", str(output)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    assert table.startswith("GPU check on CPU (dry run: tiny model, gloo)")
    assert "gloo process group of 1, FSDP2 with bf16 mixed precision" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| tiny |")]
    assert [tuple(cell.strip() for cell in row[1:4]) for row in rows] == [
        ("sft", "padded", "sdpa"), ("sft", "packed", "sdpa"), ("dpo", "padded", "sdpa"), ("dpo", "packed", "sdpa"),
        ("dpo", "shared", "sdpa"), ("kto", "padded", "sdpa"), ("kto", "packed", "sdpa"), ("kto", "shared", "sdpa")]
    assert all(float(row[4].replace(",", "")) > 0 and not row[-1].strip() for row in rows), "tokens/s, no note"
    assert "fp32 check: passed" in table


def test_the_gpu_run_covers_both_attentions_and_the_gpt_neox_model():
    chosen = contenders(parse_args([]))
    assert Contender("llama-1b", "kto", "shared", "flex_attention") in chosen
    assert Contender("llama-1b", "sft", "padded", "sdpa") in chosen
    assert [c for c in chosen if c.model == "pythia-1b"] == [Contender("pythia-1b", "dpo", "packed", "sdpa"),
                                                             Contender("pythia-1b", "dpo", "shared", "sdpa")]
    assert Contender("llama-1b", "dpo", "packed", "flex_attention") not in chosen, "flex attention runs it padded"
    assert len(chosen) == 3 + 5 + 5 + 2


def pairs_batch(prompts: torch.Tensor) -> dict:
    """DPO's rows for (B, 6) prompts, each with 3-token chosen and rejected responses."""
    batch = {}
    for offset, keys in enumerate((CHOSEN_KEYS, REJECTED_KEYS)):
        ids = torch.cat([prompts, torch.arange(3).repeat(len(prompts), 1) + 20 + 3 * offset], 1)
        batch[keys.combined_input_ids], batch[keys.combined_attention_mask] = ids, torch.ones_like(ids)
        batch[keys.labels] = torch.cat([torch.full_like(prompts, -100), ids[:, 6:]], 1)
    return batch


def test_model_flops_count_the_shared_prompt_once():
    """Two pairs of a 6-token prompt and 3-token responses: DPO's policy pass (x3) and reference pass (x1)."""
    shape = model_shape(str(REPO_ROOT / "assets" / "tiny-llama"), "LlamaDecoderLayer")
    batch = pairs_batch(torch.stack([torch.arange(10, 16), torch.arange(30, 36)]))
    unshared, shared = (step_work("dpo", batch, 1, flag)[0] for flag in (False, True))
    assert (unshared.tokens, unshared.context, unshared.scored) == (4 * 9, 4 * 45, 4 * 3)
    # Shared: per pair a 5-token stem (context 1..5) and two branches of positions 5..8 (context 6..9).
    assert (shared.tokens, shared.context, shared.scored) == (2 * (5 + 8), 2 * (15 + 2 * 30), 4 * 3)
    one_prompt = pairs_batch(torch.arange(10, 16).repeat(2, 1))
    assert step_work("dpo", one_prompt, 1, True)[0].tokens == 5 + 4 * 4, "all four rows share one stem"
    body = shape.parameters - 2 * shape.vocab * shape.hidden
    per_pass = 2 * body * 36 + 4 * shape.layers * shape.hidden * 180 + 2 * shape.hidden * shape.vocab * 12
    assert model_flops(shape, "dpo", batch, 1, shared=False) == 4 * per_pass
