"""FSDP across processes, proven on CPU with gloo: 2-process runs match 1-process runs step for step, weights and
optimizer state written by 2 processes load into one, gathers handle ragged ranks, and gradient accumulation changes
nothing, for every loss (kto-simple excepted: its reference points are means over each process's micro-batch, as in
the original; docs/distributed.md).

Two processes start once per module (tests/distributed_worker.two_process_session) and once more under torchrun;
every number they produce is asserted here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import distributed
import distributed_worker as worker
import lora
from builders import build_dataloader
from checkpoints import checkpoint_info
from errors import HalosError
from models import load_tokenizer
from utils import REPO_ROOT
from weights import read_policy_state

PAIRED_LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "simpo", "orpo", "slic", "hinge", "nca", "apo-zero", "apo-down",
                 "sppo-hard", "dpo-norm", "bco-pair")
UNPAIRED_LOSSES = ("kto", "kto-zero", "bco")
TWO_PROCESS_LOSSES = PAIRED_LOSSES + UNPAIRED_LOSSES
MIXED_PRECISION_RUN = ("sft", "sft-bf16", ("model.fsdp_policy_mp=bfloat16", "model.policy_dtype=float32"))
# LoRA under FSDP: frozen base and trainable adapters share each sharded block; the reference is the sharded policy
# with its adapters disabled. The 2-process runs add activation checkpointing (DPO) and the reference cache (KTO),
# which change nothing but memory. lr=1e-3: LoRA's B starts at 0 and must move well beyond the tolerances.
LORA = ("model.use_peft=true", "model.peft.r=4", "lr=1e-3")
LORA_RUNS = {"dpo": ("model.activation_checkpointing=true",), "kto": ("cache_reference_logprobs=true",)}
# Bradley-Terry reward models, whole and with LoRA (adapters on the classifier, its score head trained whole).
REWARD_MODEL_RUNS = {"bradley-terry": (), "bradley-terry-lora": LORA}
# The recorded runs compute in float64 (worker.recorded_run_overrides), so summing in another order (1 vs 2 processes,
# other micro-batches, other packing) changes values by ~1e-13 relative; the slack is many orders above that, and
# stays so on any CPU. (In float32 a loss such as sppo-hard, whose derivative in the summed log-ratio is ~10, turns
# the ~1e-5 rounding of a 300-nat sequence sum into 1e-4 of loss: a float32 tolerance would be a guess.)
LOSS_TOLERANCE = dict(rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory):
    """Runs the 2-process session: observations plus a recorded run per loss in TWO_PROCESS_LOSSES and bf16 SFT."""
    cache_dir = tmp_path_factory.mktemp("two_processes")
    runs = [(loss, f"{loss}-2", ()) for loss in TWO_PROCESS_LOSSES] + [MIXED_PRECISION_RUN]
    runs += [(loss, f"{loss}-lora-2", LORA + extra) for loss, extra in LORA_RUNS.items()]
    runs += [("bradley-terry", f"{name}-2", extra) for name, extra in REWARD_MODEL_RUNS.items()]
    distributed.spawn(worker.two_process_session, (cache_dir, runs), n_processes=2)
    return cache_dir


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory):
    """The same recorded runs in this process alone (no process group), SFT included."""
    cache_dir = tmp_path_factory.mktemp("one_process")
    for loss in ("sft",) + TWO_PROCESS_LOSSES:
        worker.run_recorded(loss, f"{loss}-1", cache_dir)
    for loss in LORA_RUNS:
        worker.run_recorded(loss, f"{loss}-lora-1", cache_dir, LORA)
    for name, extra in REWARD_MODEL_RUNS.items():
        worker.run_recorded("bradley-terry", f"{name}-1", cache_dir, extra)
    return cache_dir


def observations(two_process_dir, rank):
    with open(two_process_dir / f"observations-{rank}.json") as f:
        return json.load(f)


def weights(run_dir):
    return read_policy_state(run_dir / "LATEST")


def assert_same_run(one_dir, two_dir):
    """Per-step train loss and grad norm, final eval metrics and final weights agree between two runs."""
    one_steps, two_steps = worker.read_steps(one_dir), worker.read_steps(two_dir)
    assert len(one_steps) == len(two_steps) == 4, "expected one logged record per optimizer step"
    for key in ("loss/train", "grad_norm"):
        torch.testing.assert_close(torch.tensor([s[key] for s in two_steps], dtype=torch.float64),
                                   torch.tensor([s[key] for s in one_steps], dtype=torch.float64),
                                   **LOSS_TOLERANCE, msg=lambda m: f"{key}: {m}")
    one_eval, two_eval = (checkpoint_info(d / "LATEST")["metrics"] for d in (one_dir, two_dir))
    assert one_eval.keys() == two_eval.keys()
    for key in one_eval:
        assert two_eval[key] == pytest.approx(one_eval[key], rel=1e-6, abs=1e-5), key
    one_weights, two_weights = weights(one_dir), weights(two_dir)
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def assert_trained(run_dir):
    """The weights moved far beyond the 1e-5 tolerance, so agreeing weights mean something."""
    initial = worker.tiny_model().state_dict()
    final = weights(run_dir)
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > 1e-3


def test_ragged_all_gather_and_mean_over_two_processes(two_process_dir):
    for rank in (0, 1):
        seen = observations(two_process_dir, rank)["collectives"]
        assert seen["rows"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # rank 1 held no rows
        assert seen["ragged"] == [0.0, 0.0, 1.0]  # 1 row from rank 0, 2 from rank 1
        assert seen["scalars"] == [0.5, 1.5]
        assert seen["mean"] == [1.5, 5.0]


def test_full_state_dict_is_whole_on_rank_0_and_empty_elsewhere(two_process_dir):
    rank0, rank1 = (observations(two_process_dir, rank)["state_dict"] for rank in (0, 1))
    assert rank0["same_keys"] and rank0["max_diff"] == 0.0
    assert rank1["n_keys"] == 0


def test_activation_checkpointing_recomputes_sharded_blocks_with_the_same_gradients(two_process_dir):
    for rank in (0, 1):
        seen = observations(two_process_dir, rank)["checkpointing"]
        assert (seen["attention_calls_plain"], seen["attention_calls_checkpointed"]) == (1, 2)
        assert seen["grad_max_diff"] == 0.0


@pytest.mark.parametrize("loss", TWO_PROCESS_LOSSES)
def test_two_processes_match_one(loss, one_process_dir, two_process_dir):
    assert_same_run(one_process_dir / f"{loss}-1", two_process_dir / f"{loss}-2")
    assert_trained(two_process_dir / f"{loss}-2")


@pytest.mark.parametrize("loss", LORA_RUNS)
def test_lora_on_two_processes_matches_one(loss, one_process_dir, two_process_dir):
    """Compared through the final merged exports; the adapters themselves are compared too, and moved."""
    one_dir, two_dir = one_process_dir / f"{loss}-lora-1", two_process_dir / f"{loss}-lora-2"
    assert_same_run(one_dir, two_dir)
    one_adapters, two_adapters = (read_policy_state(d / "LATEST" / lora.ADAPTER_DIR) for d in (one_dir, two_dir))
    assert one_adapters.keys() == two_adapters.keys() and len(one_adapters) == 28
    for name in one_adapters:
        torch.testing.assert_close(two_adapters[name], one_adapters[name], rtol=0, atol=1e-5)
    assert min(t.abs().max().item() for name, t in two_adapters.items() if "lora_B" in name) > 1e-3


@pytest.mark.parametrize("name", REWARD_MODEL_RUNS)
def test_a_reward_model_on_two_processes_matches_one(name, one_process_dir, two_process_dir):
    """Compared through the final sequence-classifier exports (a LoRA run's: merged); its probe scores, and a LoRA
    run's adapters and score head, too."""
    one_dir, two_dir = one_process_dir / f"{name}-1", two_process_dir / f"{name}-2"
    assert_same_run(one_dir, two_dir)
    one_scores, two_scores = (torch.load(d / "LATEST" / worker.PROBE_FILE) for d in (one_dir, two_dir))
    assert one_scores.shape == (3,)
    torch.testing.assert_close(two_scores, one_scores, **LOSS_TOLERANCE)
    if not name.endswith("lora"):
        final, initial = weights(two_dir), worker.tiny_model().state_dict()  # the backbone's names are the LM's
        assert max((final[k] - initial[k]).abs().max().item() for k in final.keys() & initial.keys()) > 1e-3
        return
    one_adapters, two_adapters = (read_policy_state(d / "LATEST" / lora.ADAPTER_DIR) for d in (one_dir, two_dir))
    assert one_adapters.keys() == two_adapters.keys() and any(k.endswith("score.weight") for k in one_adapters)
    for key in one_adapters:
        torch.testing.assert_close(two_adapters[key], one_adapters[key], rtol=0, atol=1e-5)
    assert min(t.abs().max().item() for key, t in two_adapters.items() if "lora_B" in key) > 1e-3


def test_a_sharded_lora_model_resumes_exactly_from_its_adapters_alone(two_process_dir):
    """Frozen base and trainable adapters in the same FSDP units: the gathered checkpoint state holds the adapters
    only (and their optimizer state), and loading it into a fresh sharded model with other new adapters on each rank
    gives the same next step, bit for bit, on both ranks."""
    main, other = (observations(two_process_dir, rank)["lora_resume"] for rank in (0, 1))
    assert main["saved_keys"] and all("lora_" in key for key in main["saved_keys"])
    assert len(main["saved_keys"]) == 2 * 7 * 2  # A and B of the 7 linear layers of each of the 2 blocks
    assert main["optimizer_keys"] == main["saved_keys"]
    assert main["resumed_max_diff"] == 0.0 and other["resumed_max_diff"] == 0.0


def test_torchrun_sft_with_activation_checkpointing_matches_one_process(one_process_dir, tmp_path):
    """The real entry point under torchrun; SFT's gradient norm (~50) is above max_grad_norm=10, so clipping acts."""
    overrides = worker.recorded_run_overrides("sft", "sft-torchrun", tmp_path) + ["model.activation_checkpointing=true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert max(step["grad_norm"] for step in worker.read_steps(tmp_path / "sft-torchrun")) > 10
    assert_same_run(one_process_dir / "sft-1", tmp_path / "sft-torchrun")


def test_checkpoint_from_two_processes_gives_identical_logits_in_one(two_process_dir):
    checkpoint_dir = two_process_dir / "dpo-2" / "LATEST"
    model = worker.tiny_model(torch.float64)
    model.load_state_dict(read_policy_state(checkpoint_dir))
    with torch.no_grad():
        logits = model(worker.PROBE_IDS, use_cache=False).logits
    assert torch.equal(logits, torch.load(checkpoint_dir / worker.PROBE_FILE))


def test_weights_and_optimizer_state_saved_by_two_processes_resume_in_two_and_in_one(two_process_dir):
    """Resharding must change nothing, so what it touches is compared bit for bit: 2 processes resume their own
    state exactly; loading it into 1 process round-trips weights and optimizer state unchanged; and the next step
    from there equals the step plain torch takes from the same state. Only the first step itself (2 processes vs 1)
    differs, by float32 summation order, and is compared through the gradient it implies (below)."""
    assert all(observations(two_process_dir, rank)["resume"]["resumed_max_diff"] == 0.0 for rank in (0, 1))
    saved = torch.load(two_process_dir / worker.ONE_STEP_FILE)
    loaded = torch.load(two_process_dir / worker.ONE_STEP_FILE)
    resumed = worker.tiny_model()
    resumed_optimizer = torch.optim.RMSprop(resumed.parameters(), lr=1e-3)
    distributed.load_full_state_dict(resumed, loaded["weights"])
    distributed.load_full_optimizer_state_dict(resumed, resumed_optimizer, loaded["optimizer"])
    assert_equal_trees(distributed.full_state_dict(resumed), saved["weights"])
    assert_equal_trees(distributed.full_optimizer_state_dict(resumed, resumed_optimizer), saved["optimizer"])

    copy = torch.load(two_process_dir / worker.ONE_STEP_FILE)  # optimizers step the tensors they load: no sharing
    plain = worker.tiny_model()
    plain.load_state_dict(copy["weights"])
    plain_optimizer = torch.optim.RMSprop(plain.parameters(), lr=1e-3)
    names = [name for name, _ in plain.named_parameters()]
    plain_optimizer.load_state_dict({"param_groups": [{**group, "params": list(range(len(names)))}
                                                      for group in copy["optimizer"]["param_groups"]],
                                     "state": {i: copy["optimizer"]["state"][name] for i, name in enumerate(names)}})
    for model, optimizer in ((resumed, resumed_optimizer), (plain, plain_optimizer)):
        worker.optimizer_step(model, optimizer)
    assert_equal_trees(resumed.state_dict(), plain.state_dict())

    # The first step in 1 process vs 2: RMSprop's square_avg is (1 - alpha)·g² after one step, so it gives back |g|.
    # Two processes sum each gradient in a different order in float32, an error bounded by a few float32 epsilons
    # (1.2e-7) of the largest term, hence at most 1e-5 of the tensor's largest gradient; the weights themselves are
    # not compared because RMSprop's g/sqrt(g²) turns that difference into O(lr) for gradients near zero.
    model = worker.tiny_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    worker.optimizer_step(model, optimizer)
    expected = distributed.full_optimizer_state_dict(model, optimizer)
    assert saved["optimizer"]["param_groups"] == expected["param_groups"]
    assert saved["optimizer"]["state"].keys() == expected["state"].keys()
    one_minus_alpha = 1 - expected["param_groups"][0]["alpha"]
    for name, state in expected["state"].items():
        assert torch.equal(saved["optimizer"]["state"][name]["step"], state["step"])
        gradient, saved_gradient = ((s["square_avg"] / one_minus_alpha).sqrt()
                                    for s in (state, saved["optimizer"]["state"][name]))
        torch.testing.assert_close(saved_gradient, gradient, rtol=0, atol=1e-5 * gradient.abs().max().item())


def assert_equal_trees(actual, expected) -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_equal_trees(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_equal_trees(a, e)
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    else:
        assert actual == expected


def test_bf16_mixed_precision_keeps_fp32_weights_and_tracks_fp32(one_process_dir, two_process_dir):
    bf16_steps, fp32_steps = (worker.read_steps(d) for d in (two_process_dir / "sft-bf16", one_process_dir / "sft-1"))
    bf16_losses = torch.tensor([s["loss/train"] for s in bf16_steps])
    fp32_losses = torch.tensor([s["loss/train"] for s in fp32_steps])
    assert not torch.equal(bf16_losses, fp32_losses), "bf16 compute should round differently from fp32"
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=1e-2, atol=0)
    assert all(w.dtype == torch.float32 for w in weights(two_process_dir / "sft-bf16").values())


def accumulation_runs(loss, tmp_path, shapes):
    """(per-step records, final weights) of 8-example runs for each (batch_size, gradient_accumulation_steps)."""
    results = []
    for batch_size, accumulation in shapes:
        run_dir = worker.run_recorded(loss, f"{loss}-{batch_size}x{accumulation}", tmp_path, [
            "n_examples=8", f"model.batch_size={batch_size}", f"model.gradient_accumulation_steps={accumulation}",
            "do_first_eval=false"]).parent
        results.append((worker.read_steps(run_dir), weights(run_dir)))
    return results


def assert_accumulation_invariant(results):
    (base_steps, base_weights), *others = results
    assert len(base_steps) == 2
    for steps, final in others:
        for key in ("loss/train", "grad_norm"):
            torch.testing.assert_close(torch.tensor([s[key] for s in steps], dtype=torch.float64),
                                       torch.tensor([s[key] for s in base_steps], dtype=torch.float64),
                                       **LOSS_TOLERANCE, msg=lambda m: f"{key}: {m}")
        for name in base_weights:
            torch.testing.assert_close(final[name], base_weights[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ("sft",) + TWO_PROCESS_LOSSES)
def test_gradient_accumulation_changes_nothing(loss, tmp_path):
    """4 x 1 == 1 x 4 (KTO: 2 x 2, its loader pairs KL rows within each batch of at least 2). Each micro-batch's loss
    is a mean over all of its rows (for unpaired losses chosen and rejected together, never a mean per class), so
    the mean of equal-sized micro-batch means is the mean of the whole step however the classes fall; KTO's reference
    point and BCO's reward shift are statistics of whole optimizer steps (prepare_step, loss_state)."""
    shapes = [(4, 1), (2, 2)] if loss == "kto" else [(4, 1), (1, 4)]
    assert_accumulation_invariant(accumulation_runs(loss, tmp_path, shapes))


def test_unpaired_micro_batches_hold_unequal_class_counts(compose_config, tmp_path):
    """What makes the unpaired accumulation tests meaningful: their micro-batches do not split classes evenly."""
    config = compose_config(*worker.recorded_run_overrides("kto-zero", "counts", tmp_path))
    OmegaConf.resolve(config)
    loader = build_dataloader(config, load_tokenizer(config.model), "train", 2, None, 8)
    assert len({batch["status"].count("chosen") for batch in loader}) > 1


def test_several_processes_without_fsdp_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HalosError, match="use_fsdp=false cannot train on 2 processes .DDP is not implemented"):
        distributed.launch(pytest.fail, use_fsdp=False, port=None)


@pytest.mark.parametrize("block_name", ["GPTNeoXLayer", None])
def test_unknown_block_name_lists_the_model_blocks(block_name):
    shown = block_name or "null"
    with pytest.raises(HalosError, match=f"model.block_name={shown} names no module of LlamaForCausalLM.*"
                                         "its repeated blocks are: LlamaDecoderLayer$"):
        distributed.shard_model(worker.tiny_model(), block_name, None)


def test_clip_grad_norm_returns_the_global_norm_and_scales_to_max_norm():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert distributed.clip_grad_norm(params, max_norm=1.0) == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.0, 0.8]))
    assert distributed.clip_grad_norm(params, max_norm=10.0) == pytest.approx(1.0, abs=1e-6)  # below: untouched
    torch.testing.assert_close(torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.0, 0.8]))


def test_a_failing_process_ends_the_launch_with_an_error_naming_it():
    with pytest.raises(HalosError, match=r"training process [01] of 2 exited with status 3"):
        distributed.spawn(sys.exit, (3,), n_processes=2)
