"""Shared-prompt segments change nothing but the work: the layout is what shared_prompts.py says, every tested
architecture gives the unshared rows' log-probs, per-token values and gradients (sliding windows and layer kinds
included, LoRA too), and DPO and KTO train to the same losses and weights with and without sharing.

Tolerances. In float32 the shared and unshared passes sum in other orders: relative 1e-7, asserted 1e-5. Float64
is tighter where the model computes in float64 throughout: GPT-NeoX with sdpa agrees to 1e-15 (asserted 1e-12).
The other architectures compute their RMSNorm (and eager attention its softmax) in float32 whatever the model's
dtype, and sharing sums a prompt token's gradient from its two responses before that float32 step where the
unshared rows sum it after: a float32 rounding, relative 3e-7 at most here, asserted 1e-6 — still five orders of
magnitude below what a wrong mask, position or label does (tested: a missing sliding window moves log-probs by more
than 1e-3).
"""
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import distributed_worker as worker
import logps
import shared_prompts
from errors import ConfigError
from utils import IGNORE_INDEX, REPO_ROOT

PAIRS = [(20, 7, 12), (5, 30, 3), (40, 9, 9), (1, 4, 6)]  # (prompt, chosen, rejected) lengths; a 1-token prompt has
# no stem to share, and its rows stay alone
VOCAB = 4096


def pair_rows(pairs: Sequence[Tuple[int, int, int]], seed: int = 0):
    """(2B, T) right-padded rows: the chosen rows of `pairs`, then their rejected rows, labelled after the prompt."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for prompt_length, *response_lengths in pairs:
        prompt = torch.randint(2, VOCAB, (prompt_length,), generator=generator)
        sequences.append([(prompt, torch.randint(2, VOCAB, (n,), generator=generator)) for n in response_lengths])
    rows = [side[k] for k in (0, 1) for side in sequences]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.ones(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, response) in enumerate(rows):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.cat([prompt, response])
        attention_mask[row, :end] = 1
        labels[row, len(prompt):end] = response
    return input_ids, attention_mask, labels


# --- the layout ------------------------------------------------------------------------------------------------


def test_a_pair_becomes_one_segment_whose_rejected_branch_continues_from_the_prompt():
    # Prompt [5, 6, 7, 8] (stem [5, 6, 7]: the 8 starts each branch), chosen [9, 10, 11], rejected [12, 13].
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 12, 13, 1]])
    attention_mask = torch.tensor([[1] * 7, [1] * 6 + [0]])
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [9, 10, 11], [IGNORE_INDEX] * 4 + [12, 13, IGNORE_INDEX]])
    shared = shared_prompts.share_rows(input_ids, attention_mask, labels, pad_token_id=1)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 8, 12, 13]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 3, 4, 5]]
    assert shared.branch_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]]
    assert shared.segment_ids.tolist() == [[1] * 10]
    assert shared.labels.tolist() == [[IGNORE_INDEX] * 4 + [9, 10, 11, IGNORE_INDEX, 12, 13]]
    assert shared.rows[0, 3:].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert shared.columns[0, 3:].tolist() == [3, 4, 5, 6, 3, 4, 5]

    mask = shared_prompts.mask_function(shared, window=None)
    q, k = torch.arange(10).view(-1, 1), torch.arange(10).view(1, -1)
    allowed = mask(torch.zeros(1, 1, dtype=torch.long), 0, q, k).int()
    assert allowed[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1, 0], "rejected sees the stem and itself, not chosen"
    assert allowed[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    windowed = shared_prompts.mask_function(shared, window=3)(torch.zeros(1, 1, dtype=torch.long), 0, q, k).int()
    assert windowed[9].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1], "positions 3..5: the window counts positions"


def test_segments_pack_several_to_a_row_and_padding_sees_only_padding():
    rows = pair_rows(PAIRS)
    shared = shared_prompts.share_rows(*rows, pad_token_id=1)
    n_rows = 2 * len(PAIRS)
    assert shared.input_ids.size(0) == 3, "4 segments (the 1-token prompt's rows apart) fit in 3 rows"
    kept = shared.rows < n_rows
    assert sorted(set(shared.rows[kept].tolist())) == list(range(n_rows))
    padding = shared.segment_ids == 0
    assert (shared.rows[padding] == n_rows).all() and (shared.labels[padding] == IGNORE_INDEX).all()
    labelled = shared.labels != IGNORE_INDEX
    assert labelled.sum() == (rows[2] != IGNORE_INDEX).sum() == sum(c + r for _, c, r in PAIRS), "every label, once"
    assert torch.equal(shared.labels[labelled], rows[0][shared.rows[labelled], shared.columns[labelled]])


def test_rows_share_only_identical_stems_and_unshareable_batches_are_left_alone():
    input_ids, attention_mask, labels = pair_rows([(12, 5, 6)])
    assert [len(s.members) for s in shared_prompts.find_segments(input_ids, [11, 11])] == [2]
    other = input_ids.clone()
    other[1, 3] += 1  # another prompt token: the prompts differ
    assert [len(s.members) for s in shared_prompts.find_segments(other, [11, 11])] == [1, 1]
    assert [len(s.members) for s in shared_prompts.find_segments(input_ids, [11, 10])] == [1, 1], \
        "a prompt cut shorter is another stem"
    assert shared_prompts.share_rows(other, attention_mask, labels, pad_token_id=1) is None


# --- exactness on every tested architecture --------------------------------------------------------------------

LAYERS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)
# Windows of 8 positions, far shorter than the rows, so that they change the result (see the window test).
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**LAYERS, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**LAYERS, num_key_value_heads=2, sliding_window=8),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**LAYERS),
    "qwen2": lambda: transformers.Qwen2Config(**LAYERS, num_key_value_heads=2, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**LAYERS, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**LAYERS, num_key_value_heads=2, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**LAYERS, num_key_value_heads=2, head_dim=16, sliding_window=8),
}
ATTENTION = {name: ("eager",) if name == "gemma2" else ("sdpa", "eager") for name in ARCHITECTURES}  # Gemma 2: no sdpa


def random_model(config, attention: str, dtype: torch.dtype) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)


def logps_and_gradients(model, rows, share: bool) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Sums (N,), per-token values (N, T) and the parameter gradients of sums + per-token values."""
    model.zero_grad()
    sums, per_token = logps.model_logps(model, *rows, pad_token_id=1, pack=True, token_level=True,
                                        share_prompts=share)
    (sums.sum() + (per_token * 0.5).sum()).backward()
    return sums.detach(), per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}


def assert_same_logps(model, rows, tolerance: float) -> None:
    unshared, shared = (logps_and_gradients(model, rows, share) for share in (False, True))
    torch.testing.assert_close(shared[0], unshared[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(shared[1], unshared[1], rtol=tolerance, atol=tolerance)
    assert shared[2].keys() == unshared[2].keys() and shared[2]
    for name, gradient in unshared[2].items():
        torch.testing.assert_close(shared[2][name], gradient, rtol=tolerance,
                                   atol=tolerance * gradient.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("architecture, attention",
                         [(name, attention) for name in ARCHITECTURES for attention in ATTENTION[name]])
def test_shared_logps_and_gradients_equal_the_unshared_rows_in_float64(architecture, attention):
    model = random_model(ARCHITECTURES[architecture](), attention, torch.float64)
    assert model.config.model_type in shared_prompts.TESTED_MODEL_TYPES
    assert shared_prompts.unsupported_reason(model) is None
    tolerance = 1e-12 if (architecture, attention) == ("gpt_neox", "sdpa") else 1e-6
    assert_same_logps(model, pair_rows(PAIRS), tolerance)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_logps_and_gradients_equal_the_unshared_rows_in_float32(attention):
    model = random_model(AutoConfig.from_pretrained(REPO_ROOT / "assets" / "tiny-llama"), attention, torch.float32)
    assert_same_logps(model, pair_rows(PAIRS), 1e-5)


def test_the_sliding_window_changes_the_result_so_the_windowed_tests_test_it():
    rows = pair_rows(PAIRS)

    def shared_logps(window):
        model = random_model(transformers.MistralConfig(**LAYERS, num_key_value_heads=2, sliding_window=window),
                             "sdpa", torch.float64)
        with torch.no_grad():
            return logps.model_logps(model, *rows, pad_token_id=1, pack=True, token_level=False, share_prompts=True)[0]
    assert (shared_logps(8) - shared_logps(None)).abs().max() > 1e-3


def test_a_lora_policy_gets_the_same_logps_and_adapter_gradients():
    peft = pytest.importorskip("peft")
    base = random_model(AutoConfig.from_pretrained(REPO_ROOT / "assets" / "tiny-llama"), "sdpa", torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert shared_prompts.unsupported_reason(model) is None
    assert_same_logps(model, pair_rows(PAIRS), 1e-6)


@pytest.mark.slow
def test_flex_attention_gives_the_sdpa_logps():
    """FlexAttention has no CPU backward, so on the CPU only its forward is compared (gpu_check.py trains with it)."""
    config = AutoConfig.from_pretrained(REPO_ROOT / "assets" / "tiny-llama")
    rows = pair_rows(PAIRS)
    with torch.no_grad():
        sdpa, flex = (logps.model_logps(random_model(config, attention, torch.float32), *rows, pad_token_id=1,
                                        pack=True, token_level=False, share_prompts=True)[0]
                      for attention in ("sdpa", "flex_attention"))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


# --- what cannot share -----------------------------------------------------------------------------------------


def test_models_that_cannot_share_are_refused_in_one_line():
    gpt2 = random_model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2), "sdpa",
                        torch.float32)
    with pytest.raises(ConfigError, match=r"^share_prompts: model type gpt2 is not among those tested with "
                                          r"shared-prompt masks \(llama, .*\); set share_prompts=false$"):
        logps.model_logps(gpt2, *pair_rows(PAIRS), pad_token_id=1, pack=True, token_level=False, share_prompts=True)
    llama = random_model(AutoConfig.from_pretrained(REPO_ROOT / "assets" / "tiny-llama"), "sdpa", torch.float32)
    llama.config._attn_implementation = "flash_attention_2"
    assert shared_prompts.unsupported_reason(llama).startswith("attention flash_attention_2 takes no custom mask")


# --- training: the same losses and weights ---------------------------------------------------------------------


class SharingSpy:
    """Counts the forward passes that shared a prompt, while patched into logps."""

    def __init__(self, monkeypatch):
        self.shared_passes: List[int] = []  # rows of each shared pass
        share_rows = shared_prompts.share_rows

        def counting(input_ids, *args, **kwargs):
            shared = share_rows(input_ids, *args, **kwargs)
            if shared is not None:
                self.shared_passes.append(input_ids.size(0))
            return shared
        monkeypatch.setattr(shared_prompts, "share_rows", counting)


@pytest.mark.parametrize("loss, extra", [("dpo", ()), ("kto", ()), ("dpo", ("++cache_reference_logprobs=true",)),
                                         ("kto", ("++cache_reference_logprobs=true",)),
                                         ("dpo", ("++model.use_peft=true",))])
def test_training_with_shared_prompts_gives_the_unshared_losses_and_weights(loss, extra, tmp_path, monkeypatch):
    """Recorded float64 runs (tests/distributed_worker.py): 4 optimizer steps, an evaluation, the final weights.
    DPO shares each pair's prompt in the policy's and the reference's passes; KTO in the reference's pass over its
    target and KL rows, whose prompts are the same. With the reference cache, its replay runs the reference's
    passes shared (the cache file is keyed by sharing, so the two runs fill their own). With LoRA the reference is
    the policy with its adapters disabled, whose passes share prompts too."""
    unshared = worker.run_recorded(loss, f"{loss}-unshared", tmp_path, ["share_prompts=false", *extra]).parent
    spy = SharingSpy(monkeypatch)
    shared = worker.run_recorded(loss, f"{loss}-shared", tmp_path, ["share_prompts=true", *extra]).parent
    batch_rows = 2 * 4  # chosen + rejected, or target + KL rows, of a batch of 4
    assert spy.shared_passes.count(batch_rows) >= 4, "every train batch's pair or target/KL rows shared prompts"
    differences = worker.compare_runs(unshared, shared)
    assert differences.pop("steps") == 4
    print(f"{loss}: {differences}")
    assert max(differences.values()) <= 1e-5, differences
    assert worker.compare_runs(unshared, unshared)["max |diff| weights"] == 0.0


def test_the_sharing_benchmark_measures_hh_and_the_sweep_in_one_run():
    from test_performance import run_bench, table_rows

    rows = table_rows(run_bench("prompt_sharing.py", "--repeats", "1", "--vocab", "4096", "--layers", "1",
                                "--hidden", "64", "--max-length", "64", "--sweep", "32/8", "96/8"))
    for name in ("dpo", "kto", "32/8", "96/8"):
        tokens, run, unshared_rate, shared_rate = rows[name][:4]
        computed_unshared, computed_shared = (int(n.replace(",", "")) for n in run.split(" / "))
        assert computed_shared < computed_unshared, name
        assert float(unshared_rate.replace(",", "")) > 0 and float(shared_rate.replace(",", "")) > 0
    assert rows["96/8"][1] == f"{2 * 2 * 8 * 104:,} / {2 * 8 * (95 + 2 * 9):,}", "8 pairs, policy + reference"
