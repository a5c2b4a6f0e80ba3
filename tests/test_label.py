"""label.py: samples scored by a tiny reward model or by loopback LLM judges (faults injected) become pairwise, binary
or scored rows that train.py reads; a killed run loses nothing and a rerun gives exactly one label per sample."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import label as label_py
from judge_server import WINNER_MARKER, JudgeServer
from label import LabelError, LabelSettings, label, read_score_log
from reward_scoring import RewardScorer
from scored_data import write_tiny_reward_model

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "\n<|user|>\nName a pet number {}.\n<|assistant|>\n"


def write_samples(path: Path, n_prompts: int, per_prompt: int) -> Path:
    """An eval.py sample file: every prompt's first sample carries the judge server's winner marker."""
    samples = [{"prompt": PROMPT.format(p), "prompt_id": p, "sample_index": k,
                "prompt_messages": [{"role": "user", "content": f"Name a pet number {p}."}],
                "chosen": "A dog.", "policy": f"{WINNER_MARKER} A cat {k}." if k == 0 else f"A fish {p} {k}."}
               for p in range(n_prompts) for k in range(per_prompt)]
    path.write_text(json.dumps({"config": {}, "samples": samples}))
    return path


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    return write_tiny_reward_model(tmp_path_factory.mktemp("reward_model"))


def read_rows(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("output_format", ["pairwise", "binary", "scored"])
def test_reward_model_labels_follow_its_scores(tiny_reward_model, tmp_path, output_format):
    samples = write_samples(tmp_path / "samples.json", n_prompts=8, per_prompt=3)
    summary = label(LabelSettings(samples=samples, output=tmp_path / "out", format=output_format,
                                  reward_model=str(tiny_reward_model), test_every=4))
    scorer = RewardScorer.load(str(tiny_reward_model))
    rows = read_rows(tmp_path / "out" / "train.jsonl") + read_rows(tmp_path / "out" / "test.jsonl")
    group = json.loads(samples.read_text())["samples"][:3]
    expected = dict(zip((s["policy"] for s in group), scorer.score([(s["prompt"], s["policy"]) for s in group])))
    assert all(abs(summary["scores"][f"0/{k}"] - expected[s["policy"]]) <= 1e-5 for k, s in enumerate(group))
    first = [row for row in rows if row["prompt"] == group[0]["prompt_messages"]]
    if output_format == "pairwise":
        assert len(rows) == 8 and len(read_rows(tmp_path / "out" / "test.jsonl")) == 2
        assert first == [{"prompt": group[0]["prompt_messages"], "chosen": max(expected, key=expected.get),
                          "rejected": min(expected, key=expected.get)}]
    elif output_format == "binary":
        assert summary["threshold"] == statistics.median(summary["scores"].values())
        assert len(rows) == 24 and all(row["label"] == (summary["scores"][f"0/{k}"] > summary["threshold"])
                                       for k, row in enumerate(first))
    else:
        assert [row["score"] for row in first] == [summary["scores"][f"0/{k}"] for k in range(3)]


def test_a_cut_score_log_is_continued_to_the_same_labels(tiny_reward_model, tmp_path):
    samples = write_samples(tmp_path / "samples.json", n_prompts=6, per_prompt=2)
    settings = LabelSettings(samples=samples, output=tmp_path / "out", format="scored",
                             reward_model=str(tiny_reward_model), batch_size=4, test_every=3)
    label(settings)
    expected = (tmp_path / "out" / "train.jsonl").read_text()
    log = tmp_path / "out" / label_py.SCORES_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:7])  # a crash in the middle of line 6
    (tmp_path / "out" / "train.jsonl").unlink()
    label(settings)
    assert (tmp_path / "out" / "train.jsonl").read_text() == expected
    assert len(log.read_text().splitlines()) == 12 and len(read_score_log(log)) == 12


def test_judge_labels_survive_faults_with_one_label_per_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    samples = write_samples(tmp_path / "samples.json", n_prompts=4, per_prompt=2)
    with JudgeServer() as server:
        server.add_faults("A fish 1 1.", ["429", "500", "unparsable"])
        server.add_faults("A fish 2 1.", ["truncated"])
        summary = label(LabelSettings(samples=samples, output=tmp_path / "out", format="binary", threshold="0",
                                      judge=[f"judge@{server.base_url}"], backoff=0.01, test_every=2))
    # The marked sample beats the dataset's response, the other ties with it (the judge sees no marker).
    assert summary["scores"] == {f"{p}/{k}": 1.0 if k == 0 else 0.0 for p in range(4) for k in range(2)}
    rows = read_rows(tmp_path / "out" / "train.jsonl") + read_rows(tmp_path / "out" / "test.jsonl")
    assert sorted((row["completion"], row["label"]) for row in rows) == sorted(
        (f"{WINNER_MARKER} A cat 0." if k == 0 else f"A fish {p} {k}.", k == 0) for p in range(4) for k in range(2))
    assert "sk-test-secret" not in (tmp_path / "out" / label_py.JUDGMENTS_FILE).read_text()


def test_a_judge_that_keeps_failing_writes_no_data_and_says_to_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    samples = write_samples(tmp_path / "samples.json", n_prompts=2, per_prompt=2)
    with JudgeServer() as server:
        server.add_faults("A fish 1 1.", ["500"] * 2)  # both attempts of the first run
        settings = LabelSettings(samples=samples, output=tmp_path / "out", judge=[f"judge@{server.base_url}"],
                                 backoff=0.01, max_retries=1)
        with pytest.raises(LabelError, match="1 judge requests failed.*rerun"):
            label(settings)
        assert not (tmp_path / "out" / "train.jsonl").exists()
        sent = len(server.requests)
        label(settings)  # the faults are spent: only the failed request is sent again, and answered
        assert len(server.requests) == sent + 1


def test_sigkill_mid_judging_then_rerun_gives_exactly_one_label_per_sample(tmp_path):
    samples = write_samples(tmp_path / "samples.json", n_prompts=12, per_prompt=2)
    judgments = tmp_path / "out" / label_py.JUDGMENTS_FILE
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    with JudgeServer(latency=0.2) as server:
        command = [sys.executable, "label.py", "-f", str(samples), "-o", str(tmp_path / "out"), "--format", "scored",
                   "--judge", f"judge@{server.base_url}", "--concurrency", "2", "--test_every", "4"]
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (not judgments.exists() or len(judgments.read_text().splitlines()) < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert len(judgments.read_text().splitlines()) < 24 and not (tmp_path / "out" / "train.jsonl").exists()
        finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = read_rows(tmp_path / "out" / "train.jsonl") + read_rows(tmp_path / "out" / "test.jsonl")
    assert sorted(row["completion"] for row in rows) == sorted(
        s["policy"] for s in json.loads(samples.read_text())["samples"])
    assert len(server.requests) < 24 + 4  # at most the requests in flight at the kill were sent twice


@pytest.mark.parametrize("samples, settings, message", [
    ({"samples": [{"prompt_id": 0, "sample_index": 0, "prompt": "p", "chosen": "c", "policy": "x"}]}, {},
     "two or more samples per prompt"),
    ({"rows": []}, {}, "expected JSON with a 'samples' list"),
    (None, {"format": "ranked"}, "--format: expected one of pairwise, binary, scored"),
    (None, {"threshold": "high"}, "--threshold: expected median, mean or a number"),
])
def test_bad_input_is_a_one_line_error(tmp_path, tiny_reward_model, samples, settings, message):
    path = tmp_path / "samples.json"
    if samples is None:
        write_samples(path, 2, 2)
    else:
        path.write_text(json.dumps(samples))
    result = subprocess.run([sys.executable, "label.py", "-f", str(path), "-o", str(tmp_path / "out"),
                             "--reward_model", str(tiny_reward_model),
                             *[f"--{key}={value}" for key, value in settings.items()]],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_remade_sample_file_is_scored_again_where_its_texts_changed(tiny_reward_model, tmp_path):
    samples = write_samples(tmp_path / "samples.json", n_prompts=2, per_prompt=2)
    settings = LabelSettings(samples=samples, output=tmp_path / "out", format="scored",
                             reward_model=str(tiny_reward_model), test_every=2)
    first = label(settings)["scores"]
    content = json.loads(samples.read_text())
    content["samples"][3]["policy"] = "A bird."
    samples.write_text(json.dumps(content))
    second = label(settings)["scores"]
    expected = RewardScorer.load(str(tiny_reward_model)).score([(content["samples"][3]["prompt"], "A bird.")])[0]
    assert {k: v for k, v in second.items() if k != "1/1"} == {k: v for k, v in first.items() if k != "1/1"}
    assert abs(second["1/1"] - expected) <= 1e-5 and second["1/1"] != first["1/1"]
    assert len((tmp_path / "out" / label_py.SCORES_FILE).read_text().splitlines()) == 5
