"""memory_plan.py's arithmetic against numbers worked out by hand from the published Llama-7B shape (hidden 4096,
32 blocks, MLP 11008, vocab 32000, untied head) and the llama7b preset (bf16 weights and compute, RMSprop, batch 32,
max_length 2048, activation checkpointing) on 8 GPUs."""
import subprocess
import sys

import pytest

import memory_plan
from utils import REPO_ROOT

# Parameters: embeddings and head 2 x 32000 x 4096 = 262,144,000, final norm 4,096; each block: attention
# 4 x 4096^2 = 67,108,864, MLP 3 x 4096 x 11008 = 135,266,304, two norms 8,192: 202,383,360.
LLAMA7B_BLOCK = 67_108_864 + 135_266_304 + 8_192
LLAMA7B_PARAMETERS = 262_144_000 + 4_096 + 32 * LLAMA7B_BLOCK  # 6,738,415,616, the published count
LORA_QKVO_R16 = 32 * 4 * 16 * (4096 + 4096)  # r x (in + out) for q, k, v, o in 32 blocks


@pytest.fixture(scope="module")
def llama7b():
    config = memory_plan.compose_config(["model=llama7b", "loss=dpo"])
    shape = memory_plan.model_shape(str(memory_plan.ARCHITECTURES_DIR / "llama7b"), config.model.block_name, 16,
                                    ["q_proj", "k_proj", "v_proj", "o_proj"])
    return config, shape


def test_the_shape_is_counted_from_the_config(llama7b):
    _, shape = llama7b
    assert LLAMA7B_PARAMETERS == 6_738_415_616
    assert (shape.parameters, shape.block_parameters, shape.layers) == (LLAMA7B_PARAMETERS, LLAMA7B_BLOCK, 32)
    assert (shape.hidden, shape.kv_hidden, shape.intermediate, shape.vocab) == (4096, 4096, 11008, 32000)
    assert shape.gated_mlp and shape.lora_parameters == LORA_QKVO_R16 == 16_777_216


def test_full_fsdp_on_8_gpus(llama7b):
    config, shape = llama7b
    full = memory_plan.plan(config, shape, gpus=8, lora=False)
    sharded_bf16 = LLAMA7B_PARAMETERS * 2 // 8  # 1,684,603,904 bytes
    tokens = 32 // 8 * 2 * 2048  # 4 pairs per GPU, chosen + rejected rows of 2048 tokens
    assert full["policy weights"] == full["gradients"] == full["optimizer state"] == sharded_bf16
    assert full["reference weights"] == sharded_bf16
    root = LLAMA7B_PARAMETERS - 32 * LLAMA7B_BLOCK  # embeddings, final norm and head: 262,148,096
    assert full["FSDP unsharded units"] == (root + 2 * LLAMA7B_BLOCK) * 2 * 2  # weights and gradients, bf16
    # Checkpointed: every block's bf16 input (32 x 4096 per token), plus one block recomputed:
    # 6 x 4096 + 2 x 4096 + 3 x 11008 = 65,792 per token.
    assert full["activations"] == tokens * (32 * 4096 + 65_792) * 2 == 6_450_839_552
    assert full["logits"] == tokens * 32_000 * 2 * 2  # the policy's and the reference's, bf16
    assert full["total"] == 17_954_066_432  # 16.72 GiB
    assert full["total"] == sum(value for name, value in full.items() if name != "total")


def test_lora_trains_only_the_adapter_and_shares_the_reference(llama7b):
    config, shape = llama7b
    full, lora = (memory_plan.plan(config, shape, gpus=8, lora=flag) for flag in (False, True))
    adapter = LORA_QKVO_R16 * 2 // 8
    assert lora["policy weights"] == full["policy weights"] + adapter
    assert lora["gradients"] == lora["optimizer state"] == adapter  # RMSprop: one state tensor
    assert lora["reference weights"] == 0
    assert lora["FSDP unsharded units"] == full["FSDP unsharded units"] // 2
    assert lora["activations"] == full["activations"] + 8 * 2048 * 4 * 16 * 2  # each adapter's r values per token


def test_the_plan_follows_the_optimizer_checkpointing_and_reference_cache():
    shape = memory_plan.model_shape(str(memory_plan.ARCHITECTURES_DIR / "llama7b"), "LlamaDecoderLayer", 16,
                                    ["q_proj"])
    config = memory_plan.compose_config(["model=llama7b", "loss=dpo", "optimizer=AdamW",
                                         "model.activation_checkpointing=false", "cache_reference_logprobs=true"])
    full = memory_plan.plan(config, shape, gpus=8, lora=False)
    assert full["optimizer state"] == 2 * full["gradients"]
    assert full["activations"] == 16_384 * 32 * 65_792 * 2, "every block's activations kept"
    assert full["reference weights"] == 0 and full["logits"] == 16_384 * 32_000 * 2


def test_the_command_prints_both_plans_and_names_a_missing_config(capsys):
    result = subprocess.run([sys.executable, "memory_plan.py", "model=llama30b", "loss=kto"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "llama30b (32.53 B parameters), loss kto, 8 GPUs of 80 GiB" in result.stdout
    assert "| total |" in result.stdout and "| fits in 80 GiB |" in result.stdout
    with pytest.raises(SystemExit) as stopped:
        memory_plan.main(["model=llama65b", "loss=dpo"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: no config.json for huggyllama/llama-65b here (bundled: llama-1b, llama13b, llama30b, llama7b, "
        "pythia-1b); pass --model-config with a directory holding the model's config.json"]
