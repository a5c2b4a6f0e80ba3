"""The speed-ups change nothing but speed and memory: chunked log-probs equal the plain log-softmax (values and
gradients) in a fraction of its memory, packed rows give the padded rows' log-probs, and training with the reference
log-prob cache gives the live reference's losses step for step, across restarts, KTO's KL rows included."""
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

import trainers
import utils
from bench.logps_memory import METHODS, measure
from bench.memory import TensorMemoryTracker
from configuration import ConfigError, validate_train_config
from reference_cache import CachedReference, LogpStore, ReferenceCacheError, cache_fingerprint, sequence_keys
from train import train
from utils import IGNORE_INDEX, first_fit_decreasing, get_token_logps, pack_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPO_ROOT / "assets" / "tiny-llama"
TINY_RUN = ("model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "n_epochs=null", "n_examples=16",
            "n_eval_examples=8", "do_first_eval=false", "minimum_log_interval_secs=0", "lr=1e-4", "debug=true")


def full_log_softmax_token_logps(logits: torch.Tensor, labels: torch.Tensor):
    """The plain computation the chunked one replaces: one (B, T-1, V) float32 log-softmax."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(log_probs, 2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2) * mask, mask


def random_logits_and_labels(batch: int, length: int, vocab: int, dtype=torch.float32, seed: int = 0):
    """(B, T, V) logits that require grad and (B, T) labels with prompt and padding positions masked."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, length, vocab, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, : length // 4] = IGNORE_INDEX
    labels[0, length // 2:] = IGNORE_INDEX
    return logits, labels


# --- chunked log-probs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1000, 4096 * 7, utils.LOGPS_CHUNK_ELEMENTS])
def test_chunked_token_logps_and_gradients_equal_the_full_log_softmax(chunk_elements, monkeypatch):
    """Chunks of 1 row, of 7 rows (a ragged last chunk) and the default size all give the plain values and grads."""
    monkeypatch.setattr(utils, "LOGPS_CHUNK_ELEMENTS", chunk_elements)
    logits, labels = random_logits_and_labels(3, 20, 4096)
    weights = torch.randn(3, 19)
    expected, expected_mask = full_log_softmax_token_logps(logits, labels)
    (expected * weights).sum().backward()
    expected_grad, logits.grad = logits.grad, None

    token_logps, mask = get_token_logps(logits, labels)
    (token_logps * weights).sum().backward()
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(token_logps, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=0, atol=1e-5)


def test_bf16_logits_give_float32_logps_of_the_upcast_logits():
    logits, labels = random_logits_and_labels(2, 16, 1000, dtype=torch.bfloat16)
    token_logps, _ = get_token_logps(logits, labels)
    assert token_logps.dtype == torch.float32
    expected, _ = full_log_softmax_token_logps(logits.float(), labels)
    torch.testing.assert_close(token_logps, expected, rtol=0, atol=1e-5)


def test_a_gradient_written_over_logits_another_node_saved_fails_loudly():
    hidden, weight = torch.randn(4, 10, requires_grad=True), torch.ones(1, requires_grad=True)
    logits = hidden * 2
    also_read = (logits * weight).sum()  # saves the logits for weight's gradient
    token_logps = utils.label_logps(logits, torch.tensor([1, 2, 3, 4]), overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (token_logps.sum() + also_read).backward()


def test_memory_tracker_counts_new_storages_once_and_sees_frees():
    base = torch.ones(100)
    with TensorMemoryTracker() as tracker:
        first = torch.empty(1000)  # 4000 bytes
        view = first.view(10, 100)  # no new storage
        second = torch.empty(500)  # 2000 bytes
        base.add_(1)  # in place on a tensor from before: nothing allocated
        del second
    assert (tracker.peak_bytes, tracker.live_bytes) == (6000, 4000)
    assert view.shape == (10, 100)


def test_chunked_logps_peak_memory_is_under_0_3_of_the_full_log_softmax_at_vocab_32k():
    """Forward: the full version holds a (B, T-1, V) float32 log-softmax, the chunked one a chunk. Forward+backward:
    get_token_logps also allocates the (B, T, V) gradient it returns; sequence_logps's path writes it in place."""
    full, chunked, in_place = (measure(METHODS[name], 4, 256, 32_000, torch.float32)
                               for name in ("full", "chunked", "chunked, gradient in place"))
    gradient_bytes = 4 * 256 * 32_000 * 4
    assert chunked[0] <= 0.3 * full[0] and in_place[0] <= 0.3 * full[0]
    assert chunked[1] - gradient_bytes <= 0.3 * (full[1] - gradient_bytes)
    assert in_place[1] <= 0.3 * full[1]


# --- packing -------------------------------------------------------------------------------------------------


def test_first_fit_decreasing_fills_bins_up_to_capacity():
    assert first_fit_decreasing([5, 9, 3, 7, 1], capacity=10) == [[1, 4], [3, 2], [0]]


def right_padded_batch(lengths, vocab: int = 4096, seed: int = 0):
    """(N, T) input ids, attention mask and labels (the first third of each row is an unlabelled prompt)."""
    generator = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    input_ids = torch.ones(n, width, dtype=torch.long)
    attention_mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(2, vocab, (length,), generator=generator)
        attention_mask[row, :length] = 1
        labels[row, length // 3:length] = input_ids[row, length // 3:length]
    return input_ids, attention_mask, labels


def bare_trainer(pack: bool, token_level: bool = False, share_prompts: bool = False) -> trainers.BasicTrainer:
    """A BasicTrainer with just what sequence_logps reads: pack_sequences, share_prompts, the pad id,
    token_level_logps."""
    trainer = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
    trainer.config = OmegaConf.create({"pack_sequences": pack, "share_prompts": share_prompts})
    trainer.tokenizer = SimpleNamespace(pad_token_id=1)
    trainer.token_level_logps = token_level
    return trainer


def trainer_sequence_logps(model, pack: bool, *rows) -> torch.Tensor:
    """BasicTrainer.sequence_logps, the path every trainer's forward takes, with pack_sequences on or off."""
    return bare_trainer(pack).sequence_logps(model, *rows).logps


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_packed_rows_and_kept_logits_give_the_full_padded_logps_and_gradients(attention, dtype, tolerance):
    """Against full (B, T, V) logits of the padded rows: logits kept only at labelled positions, padded or packed,
    give the same sums and gradients: to 1e-13 in float64, to 3e-7 relative in float32 (asserted: 1e-9 and 1e-5)."""
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    batch = right_padded_batch([37, 120, 5, 64, 90, 12, 128, 30])
    packed = pack_rows(*batch, pad_token_id=1)
    assert packed.input_ids.shape == (4, 128), "8 rows of up to 128 tokens fit in 4"

    input_ids, attention_mask, labels = batch
    full_logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    expected = utils.get_batch_logps(full_logits, labels)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    for pack in (False, True):
        model.zero_grad()
        logps = trainer_sequence_logps(model, pack, *batch)
        logps.sum().backward()
        torch.testing.assert_close(logps, expected, rtol=tolerance, atol=tolerance)
        for expected_grad, parameter in zip(expected_grads, model.parameters()):
            torch.testing.assert_close(parameter.grad, expected_grad, rtol=tolerance,
                                       atol=tolerance * expected_grad.abs().max().item())


def test_packing_returns_none_when_no_row_is_saved_and_rejects_left_padding():
    assert pack_rows(*right_padded_batch([100, 90, 80]), pad_token_id=1) is None
    input_ids, attention_mask, labels = right_padded_batch([10, 3, 2])
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(input_ids, attention_mask.flip(1), labels, pad_token_id=1)


# --- reference log-prob cache --------------------------------------------------------------------------------


def test_sequence_keys_depend_on_content_and_label_boundary_not_on_padding_or_position():
    input_ids, attention_mask, labels = right_padded_batch([7, 4, 9])
    keys = sequence_keys(input_ids, attention_mask, labels)
    wider = [torch.cat([t, t.new_full((3, 5), pad)], 1) for t, pad in ((input_ids, 1), (attention_mask, 0),
                                                                         (labels, IGNORE_INDEX))]
    reordered = [t[[2, 0, 1]] for t in wider]
    assert sequence_keys(*reordered) == [keys[2], keys[0], keys[1]]
    labels[0, 4] = IGNORE_INDEX  # one more prompt token: another sequence
    assert sequence_keys(input_ids, attention_mask, labels)[0] != keys[0]
    assert len(set(keys)) == 3


def test_a_freed_cache_refuses_sequences_it_never_saw(tmp_path):
    store = LogpStore(tmp_path / "cache.pt", {"test": 1})
    cached = CachedReference(torch.nn.Linear(1, 1), store)
    cached.fill([], forward=lambda batch: None)
    with pytest.raises(ReferenceCacheError, match="not in the reference log-prob cache"):
        cached.sequence_logps(*right_padded_batch([3, 2]), live=lambda *args: None)


def test_the_cache_file_is_keyed_by_the_reference_weights(compose_config):
    config = compose_config("loss=dpo", "exp_name=x", *TINY_RUN)
    fingerprints = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR), attn_implementation="sdpa")
        fingerprints.append(cache_fingerprint(config, model))
    assert fingerprints[0] == fingerprints[1] and fingerprints[0]["weights"] != fingerprints[2]["weights"]


def test_speed_switches_must_be_booleans(compose_config):
    config = compose_config("loss=dpo", "exp_name=x", "pack_sequences=maybe", "cache_reference_logprobs=1", *TINY_RUN)
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, "dpo")
    assert "pack_sequences: expected true or false, got 'maybe'" in str(info.value)
    assert "cache_reference_logprobs: expected true or false, got 1" in str(info.value)


def test_ppo_cannot_cache_its_reference_log_probs(compose_config):
    config = compose_config("loss=ppo", "exp_name=x", "cache_reference_logprobs=true", *TINY_RUN)
    with pytest.raises(ConfigError, match="cache_reference_logprobs: PPOTrainer reads reference log-probs the cache does not hold"):
        validate_train_config(config, "ppo")


class RunRecorder:
    """While patched onto a trainer class: every train-step loss, the eval metrics, the trainer, and whether the
    reference model was garbage once the cache was filled."""

    def __init__(self, monkeypatch, trainer_cls):
        self.losses, self.eval_metrics, self.trainer, self.reference_released = [], [], None, None
        get_batch_metrics, fill = trainer_cls.get_batch_metrics, CachedReference.fill

        def recording_get_batch_metrics(trainer, batch, mode):
            self.trainer = trainer
            loss, metrics = get_batch_metrics(trainer, batch, mode)
            if mode == "train":
                self.losses.append(loss.item())
            else:
                self.eval_metrics.append({k: v.tolist() for k, v in metrics.items()})
            return loss, metrics

        def watching_fill(cached, batches, forward):
            model = weakref.ref(cached.model)
            fill(cached, batches, forward)
            self.reference_released = model() is None

        monkeypatch.setattr(trainer_cls, "get_batch_metrics", recording_get_batch_metrics)
        monkeypatch.setattr(CachedReference, "fill", watching_fill)


def run_recorded(compose_config, monkeypatch, loss: str, trainer_cls, cache_dir: Path, cached: bool) -> RunRecorder:
    recorder = RunRecorder(monkeypatch, trainer_cls)
    train(compose_config(f"loss={loss}", f"exp_name={loss}", f"cache_dir={cache_dir}",
                         f"cache_reference_logprobs={str(cached).lower()}", *TINY_RUN), loss)
    monkeypatch.undo()
    return recorder


@pytest.mark.parametrize("loss, trainer_cls", [("dpo", trainers.DPOTrainer), ("kto", trainers.KTOTrainer)])
def test_cached_reference_gives_the_live_losses_and_is_reused_after_a_restart(loss, trainer_cls, compose_config,
                                                                             monkeypatch, tmp_path):
    live = run_recorded(compose_config, monkeypatch, loss, trainer_cls, tmp_path / "live", cached=False)
    cached = run_recorded(compose_config, monkeypatch, loss, trainer_cls, tmp_path / "cached", cached=True)
    assert len(live.losses) == 2 and live.eval_metrics
    assert max(abs(a - b) for a, b in zip(live.losses, cached.losses)) <= 1e-6
    assert cached.eval_metrics == live.eval_metrics, "eval rewards (and KTO's KL estimate) match exactly"
    reference = cached.trainer.reference_model
    assert cached.reference_released and reference.model is None, "the reference model was freed"
    rows_per_batch = 2 * 8  # chosen + rejected, or target + KL rows
    assert reference.computed_rows == rows_per_batch * (2 + 1)  # 2 train batches and 1 eval batch

    restarted = run_recorded(compose_config, monkeypatch, loss, trainer_cls, tmp_path / "cached", cached=True)
    assert restarted.losses == cached.losses
    assert restarted.trainer.reference_model.computed_rows == 0, "a restart reads every reference log-prob"


# --- the benchmark scripts -------------------------------------------------------------------------------------


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(output: str) -> dict:
    """First cell -> the other cells of each markdown table row printed."""
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_the_throughput_benchmark_runs_every_contender_on_a_small_model():
    output = run_bench("train_throughput.py", "--losses", "kto", "--repeats", "1", "--vocab", "4096", "--layers", "1",
                       "--hidden", "64", "--max-length", "64", "--skip-trl")
    rows = table_rows(output)
    for name in ("floor (padded): + reference fwd", "floor (lean): + reference fwd", "halos", "halos, no packing",
                 "halos, cached reference"):
        assert float(rows[name][0].replace(",", "")) > 0, name


def test_the_loss_step_benchmark_times_cached_and_uncached_steps():
    rows = table_rows(run_bench("loss_step_time.py", "--losses", "kto-zero", "slic", "--batches", "1"))
    assert float(rows["kto-zero"][0]) > 0 and float(rows["kto-zero"][1]) > 0
    assert rows["slic"][1] == "-", "slic has no reference model to cache"
