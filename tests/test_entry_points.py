"""What a user meets at the command line of train.py: --help, one-line errors for typos and bad choices, output that
shares the terminal with the progress bar, a wandb that cannot hang, a sane CPU thread count, an attention fallback,
and no litter outside cache_dir."""
import io
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import builders
import distributed
from cli import prepare_train_argv
from configuration import validate_train_config
from errors import ConfigError
from models import attention_unavailable
from train import train

REPO_ROOT = Path(__file__).resolve().parent.parent
VALID = ("loss=sft", "model=tiny", "datasets=[hh]", "exp_name=run", "mode=train")
SHORT = ("wandb.enabled=false", "n_epochs=null", "n_examples=16", "n_eval_examples=8", "eval_every=8",
         "minimum_log_interval_secs=0", "lr=1e-3")


def train_cli(cwd: Path, *args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_the_choices_without_a_traceback(tmp_path):
    result = train_cli(tmp_path, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("Train a policy with a human-aware loss.")
    assert re.search(r"^loss=\s.*\bdpo\b.*\bsft\b", result.stdout, re.M)
    models = re.search(r"^model=\s(.*)$", result.stdout, re.M)[1].split()
    assert {"llama7b", "tiny", "zephyr-sft-beta"} <= set(models) and "base_model" not in models


def test_a_typo_without_plus_plus_is_a_one_line_error(tmp_path):
    result = train_cli(tmp_path, *VALID, "n_exampels=32", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert result.stderr.strip() == "error: invalid config: n_exampels: unknown key (did you mean n_examples?)"
    assert not (tmp_path / "cache").exists()


def test_plain_overrides_reach_the_config_check_and_group_choices_stay():
    argv = prepare_train_argv(["train.py", *VALID, "model.batch_sizee=4", "++lr=1", "~seed", "hydra.run.dir=x",
                               "hydra/job_logging=none", "local_datasets.mine=a.jsonl", "-m", "lr=1e-3,1e-4"])
    assert argv == ["train.py", "loss=sft", "model=tiny", "++datasets=[hh]", "++exp_name=run", "++mode=train",
                    "++model.batch_sizee=4", "++lr=1", "~seed", "hydra.run.dir=x", "hydra/job_logging=none",
                    "++local_datasets.mine=a.jsonl", "-m", "++lr=1e-3,1e-4"]


def test_missing_and_unknown_group_choices_are_listed_together():
    with pytest.raises(ConfigError) as info:
        prepare_train_argv(["train.py", "datasets=[hh]", "loss="])
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config (2 problems):"
    assert lines[1].startswith("  - model: required (pass model=NAME, one of: ")
    assert lines[2].startswith("  - loss: no config/loss/.yaml (available: apo-down, apo-zero, ")
    with pytest.raises(ConfigError, match=r"^invalid config: loss: no config/loss/dpoo.yaml \(did you mean dpo\? "
                                          r"available: apo-down, apo-zero, "):
        prepare_train_argv(["train.py", *VALID[1:], "loss=dpoo"])


def test_a_run_name_that_would_escape_cache_dir_writes_nothing(tmp_path):
    result = train_cli(tmp_path, *[a for a in VALID if not a.startswith("exp_name")], "exp_name=../escaped",
                       f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: invalid config: exp_name: '../escaped' is not a run name")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written, inside or outside cache_dir"


def test_messages_go_above_the_progress_bar_and_metrics_print_as_numbers(compose_config, tmp_path, monkeypatch):
    """On a terminal stdout and stderr (the bar) share one screen: every message must start on a line of its own,
    never glued to the end of the bar. Train lines are `key=value` numbers, at most every print_interval_secs
    (the last one is printed at the end), and the run ends with the eval.py command to run next."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    train(compose_config(*VALID, *SHORT, f"cache_dir={tmp_path}", "print_interval_secs=1000"), "sft")
    text = screen.getvalue()
    for match in re.finditer(r"(eval after|train after|saved \w+ checkpoint|next: )", text):
        assert match.start() == 0 or text[match.start() - 1] in "\n\r", \
            f"glued to the progress bar: {text[max(0, match.start() - 60):match.end()]!r}"
    train_lines = [line for line in re.split(r"[\r\n]", text) if line.startswith("train after")]
    assert [line.split(":")[0] for line in train_lines] == ["train after 8 examples", "train after 16 examples"]
    assert "'" not in train_lines[-1] and re.search(r" loss/train=\d+\.?\d* ", train_lines[-1])
    for line in train_lines:  # each line is the metrics logged at the example count it names
        assert f" counters/examples={line.split()[2]} " in line
    assert f"next: python eval.py --config-path={tmp_path / 'run'} ++mode=sample" in text


def closed_port() -> int:
    """A localhost port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def wandb_online_with_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    yield
    import wandb

    wandb.finish()


def wandb_config(compose_config, tmp_path):
    config = compose_config(*VALID, "wandb.enabled=true", f"cache_dir={tmp_path}")
    validate_train_config(config, "sft")
    return config


def test_wandb_with_a_key_but_no_server_logs_offline_after_one_line(compose_config, tmp_path, monkeypatch, capsys,
                                                                     wandb_online_with_a_key):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    assert builders.init_wandb(wandb_config(compose_config, tmp_path))
    import wandb

    assert wandb.run.settings.mode == "offline"
    assert "127.0.0.1" in capsys.readouterr().out.strip().splitlines()[-1]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_whose_server_never_answers_gives_up_within_the_bound(compose_config, tmp_path, monkeypatch, capsys,
                                                                    wandb_online_with_a_key):
    """The server accepts connections and never replies: wandb.init's bounded wait ends in offline logging (the
    bound is shortened here through WANDB_INIT_TIMEOUT, which users may set too)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept_and_stay_silent():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    try:
        assert builders.init_wandb(wandb_config(compose_config, tmp_path))
        import wandb

        assert wandb.run.settings.mode == "offline"
        assert "wandb: wandb.init failed" in capsys.readouterr().out
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


@pytest.mark.parametrize("cores, load, processes, expected", [
    (2, 2.9, 1, 1), (2, 0.6, 1, 1), (2, 0.0, 1, 2), (16, 0.3, 1, 15), (16, 0.0, 2, 8), (4, 10.0, 1, 1), (4, 0, 8, 1)])
def test_cpu_threads_are_the_idle_cores_shared_out(cores, load, processes, expected):
    assert distributed.cpu_thread_count(cores, load, processes) == expected


@pytest.mark.parametrize("omp_num_threads", [None, "1"])
def test_the_thread_choice_respects_omp_num_threads(omp_num_threads):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_num_threads:
        env["OMP_NUM_THREADS"] = omp_num_threads
    code = "import distributed, torch; print(distributed.choose_cpu_threads()); print(torch.get_num_threads())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    message, threads = result.stdout.strip().splitlines()
    if omp_num_threads:
        assert threads == "1" and message == "CPU: 1 intra-op thread (OMP_NUM_THREADS=1)"
    else:
        assert message.startswith(f"CPU: {threads} intra-op thread") and "set OMP_NUM_THREADS to choose" in message
        assert 1 <= int(threads) <= os.cpu_count()


@pytest.fixture
def flash_preset(tmp_path):
    """A model preset that asks for flash-attention, like llama7b, over the tiny model."""
    (tmp_path / "presets" / "model").mkdir(parents=True)
    (tmp_path / "presets" / "model" / "tiny_flash.yaml").write_text(
        "defaults:\n  - tiny\n\nuse_flash_attention: true    # as the llama/mistral/zephyr presets\n")
    return f"hydra.searchpath=[file://{tmp_path / 'presets'}]"


@pytest.mark.skipif(attention_unavailable("flash_attention_2") is None, reason="flash-attention is available here")
def test_a_preset_asking_for_flash_attention_falls_back_to_sdpa_with_one_warning(tmp_path, flash_preset):
    result = train_cli(tmp_path, *[a for a in VALID if not a.startswith("model=")], "model=tiny_flash", *SHORT,
                       flash_preset, f"++local_datasets.hh={REPO_ROOT / 'data' / 'hh-rlhf'}",
                       f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: model.use_flash_attention: flash_attention_2 needs the flash-attn package and a CUDA GPU, which " \
           "this machine lacks; using sdpa attention instead" in result.stdout
    saved = OmegaConf.load(tmp_path / "cache" / "run" / "config.yaml")
    assert (saved.model.use_flash_attention, saved.model.attn_implementation) == (False, "sdpa")


@pytest.mark.skipif(attention_unavailable("flash_attention_2") is None, reason="flash-attention is available here")
def test_flash_attention_asked_for_on_the_command_line_is_a_one_line_error(tmp_path):
    result = train_cli(tmp_path, *VALID, *SHORT, "model.use_flash_attention=true", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: invalid config: model.use_flash_attention: flash_attention_2 needs the " \
        "flash-attn package and a CUDA GPU, which this machine lacks; drop the override to use sdpa"


def test_an_unknown_attention_implementation_is_an_error_wherever_it_comes_from(compose_config):
    config = compose_config(*VALID, "++model.attn_implementation=flash")
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'flash' is not an attention implementation "
                                          r"\(expected one of sdpa, eager"):
        validate_train_config(config, "sft")


def test_multirun_leaves_nothing_in_the_working_directory(tmp_path):
    (tmp_path / "work").mkdir()
    result = train_cli(tmp_path / "work", "-m", *VALID, *SHORT, "n_examples=8", "do_first_eval=false",
                       f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "work").iterdir()) == []
    assert list((tmp_path / "cache" / "multirun").glob("*/multirun.yaml"))


def test_a_multirun_sweep_over_losses_checks_each_choice():
    """`-m loss=dpo,kto` names two loss configs; each is checked, and only the missing one is reported."""
    assert prepare_train_argv(["train.py", "-m", "loss=dpo,kto", "model=tiny"])[1:3] == ["-m", "loss=dpo,kto"]
    with pytest.raises(ConfigError, match=r"^invalid config: loss: no config/loss/ktoo.yaml \(did you mean kto\?"):
        prepare_train_argv(["train.py", "-m", "loss=dpo,ktoo", "model=tiny"])
    with pytest.raises(ConfigError, match="no config/loss/dpo,kto.yaml"):
        prepare_train_argv(["train.py", "loss=dpo,kto", "model=tiny"])  # without -m it is one (missing) name
