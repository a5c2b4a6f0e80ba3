"""compare.py beyond the original, end to end against the loopback judge server: both orders, several judges
and their ensemble, graded verdicts, the sample-file formats, cost accounting and the chart. Every statistic is
checked against values worked out by hand in the test."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import compare
from judge_server import (STRONG_MARKER, TIE_REPLY, WINNER_MARKER, JudgeServer, contrarian_judge, first_shown_judge,
                          graded_marker_judge, marker_judge, word_count)
from judging.judgments import Verdict
from judging.outputs import win_rate_figure
from judging.stats import clopper_pearson_interval
from judging.summary import StatsSettings, combine_margins, position_summary, usage_summary, win_rates
from test_compare import (SAMPLE_COUNT, api_environment, fast_flags, judgments_path, make_sample,  # noqa: F401
                          read_jsonl, run_compare, sample_of, server, write_sample_file)


def judge_report(result: dict, judge: str = "gpt-4-0613") -> dict:
    return result["judges"][judge]


def position_biased_on_ties(messages: list[dict]) -> str:
    """`marker_judge`, except that where it sees no winner it picks the response shown first."""
    reply = marker_judge(messages)
    return first_shown_judge(messages) if reply == TIE_REPLY else reply


# ---- combining verdicts (hand-computed) -------------------------------------------------------------------------


@pytest.mark.parametrize("margins, combined", [
    ([1], 1), ([-2], -2), ([0], 0),
    ([1, 1], 1), ([2, 1], 1), ([2, 2], 2), ([-1, -2], -1),  # agreeing orders: the weaker verdict
    ([1, -1], 0), ([1, 0], 0), ([0, 0], 0), ([2, -1], 0),  # disagreeing ones: a tie
    ([1, None], None),  # a failed request leaves the prompt unjudged
    ([1, 1, -1], 1), ([2, 2, -1], 2), ([1, 0, -1], 0), ([1, 2, 0], 1), ([1, 0, 0], 0),  # three judges: majority
])
def test_combine_margins(margins, combined):
    assert combine_margins(margins) == combined


def test_weighted_win_rate_of_graded_outcomes():
    """Outcomes +2, +1, 0, -1, -2 and a failure. With strong verdicts worth 3 games: wins 3 + 1 of
    3 + 1 + 1 + 1 + 3 = 9 games, 4/9, and no binomial interval. With weight 1: 2 of 5, and Clopper-Pearson."""
    outcomes = [2, 1, 0, -1, -2, None]
    x = np.array([0.1, -0.2, 0.3, 0.0, -0.4, 0.5])
    raw, _ = win_rates(outcomes, x, StatsSettings(strong_weight=3, bootstrap_resamples=0))
    assert raw["value"] == pytest.approx(4 / 9) and raw["n"] == 5
    assert (raw["ci_low"], raw["ci_high"], raw["bootstrap_low"]) == (None, None, None)
    raw, _ = win_rates(outcomes, x, StatsSettings(strong_weight=1, bootstrap_resamples=0))
    assert raw["value"] == pytest.approx(2 / 5)
    assert (raw["ci_low"], raw["ci_high"]) == clopper_pearson_interval(2, 5, 0.9)


def test_position_summary_by_hand():
    """Prompt 0: the first shown wins in both orders (inconsistent). Prompt 1: the candidate wins in both orders
    (consistent). Prompt 2: ties in both (consistent). Prompt 3: one order failed (not counted).
    Decided verdicts: 0a first, 0b first, 1a first (candidate first), 1b second, 3a first: 4 of 5 first."""
    verdicts = [[Verdict(True, 1), Verdict(False, 1)], [Verdict(True, 1), Verdict(False, -1)],
                [Verdict(True, 0), Verdict(False, 0)], [Verdict(True, 1), Verdict(False, None)]]
    summary = position_summary(verdicts)
    assert summary == {"first_position_rate": 4 / 5, "decided": 5, "consistency": 2 / 3, "pairs_in_both_orders": 3}
    assert position_summary([[Verdict(True, 1)]])["consistency"] is None  # one order: nothing to compare


def test_usage_and_cost_by_hand():
    records = [{"prompt_tokens": 100, "completion_tokens": 3}, {"prompt_tokens": 250, "completion_tokens": 5}]
    prices = {"judge": {"input": 2.5, "output": 10.0}}  # USD per million tokens
    assert usage_summary(records, prices, "judge") == {"requests": 2, "prompt_tokens": 350, "completion_tokens": 8,
                                                       "cost": pytest.approx((350 * 2.5 + 8 * 10.0) / 1e6)}
    assert usage_summary(records, prices, "other")["cost"] is None


# ---- both orders ------------------------------------------------------------------------------------------------


def test_both_orders_debias_a_judge_that_favours_the_first_position(tmp_path):
    """On samples 4 and 5 the judge sees no winner and picks whatever it is shown first. Shown in both orders,
    those verdicts disagree and become ties; samples 0-3 agree. Consistency 4/6. Of the 12 verdicts, all decided,
    the first-shown response wins 4 of 8 on samples 0-3 and 4 of 4 on samples 4-5: 8/12."""
    write_sample_file(tmp_path)
    with JudgeServer(judges={"gpt-4-0613": position_biased_on_ties}) as server:
        assert run_compare(tmp_path, server, "--both_orders") == 0
    assert len(server.requests) == 2 * SAMPLE_COUNT
    for index in range(SAMPLE_COUNT):
        first, second = server.requests_containing(f"[id{index}]")
        assert first.text.index("Policy") < first.text.index("Chosen") or \
            second.text.index("Policy") < second.text.index("Chosen")
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (3, 1, 2)
    assert result["win_rate"]["value"] == 0.5
    position = judge_report(result)["position"]
    assert position == {"first_position_rate": pytest.approx(8 / 12), "decided": 12,
                        "consistency": pytest.approx(4 / 6), "pairs_in_both_orders": 6}
    assert result["settings"]["both_orders"] is True
    assert len(read_jsonl(judgments_path(tmp_path))) == 12


def test_a_single_order_run_is_reused_by_a_both_orders_run(tmp_path, server):
    write_sample_file(tmp_path)
    assert run_compare(tmp_path, server) == 0
    assert run_compare(tmp_path, server, "--both_orders") == 0
    assert len(server.requests) == 2 * SAMPLE_COUNT  # only the other order of each sample was new


def test_a_judge_with_total_position_bias_gives_only_ties_in_both_orders(tmp_path):
    write_sample_file(tmp_path)
    with JudgeServer(judges={"gpt-4-0613": first_shown_judge}) as server:
        assert run_compare(tmp_path, server, "--both_orders") == 0
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (0, 0, 6)
    assert judge_report(result)["position"]["first_position_rate"] == 1.0
    assert judge_report(result)["position"]["consistency"] == 0.0


# ---- several judges ---------------------------------------------------------------------------------------------


def test_several_judges_per_judge_rates_agreement_and_ensemble(tmp_path):
    """The marker judge sees outcomes (+, -, +, +, tie, tie); the contrarian (-, +, -, -, tie, tie). They agree
    on 2 of 6 prompts. Marginals (3, 1, 2)/6 and (1, 3, 2)/6 over (+, -, tie) give p_e = (3 + 3 + 4)/36 = 10/36,
    so kappa = (12/36 - 10/36) / (26/36) = 1/13. The ensemble of two that always disagree is all ties."""
    write_sample_file(tmp_path)
    with JudgeServer(judges={"contrarian": contrarian_judge}) as server:
        assert run_compare(tmp_path, server, "-j", "gpt-4-0613", "contrarian") == 0
    assert {request.body["model"] for request in server.requests} == {"gpt-4-0613", "contrarian"}
    assert len(server.requests) == 2 * SAMPLE_COUNT
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert result["judge"] == "gpt-4-0613+contrarian"
    marker, contrarian = judge_report(result), judge_report(result, "contrarian")
    assert (marker["wins"], marker["losses"], marker["win_rate"]["value"]) == (3, 1, 0.5)
    assert (contrarian["wins"], contrarian["losses"], contrarian["win_rate"]["value"]) == (1, 3, pytest.approx(1 / 6))
    [row] = result["agreement"]
    assert row == {"judges": ["gpt-4-0613", "contrarian"], "n": 6, "percent": pytest.approx(1 / 3),
                   "kappa": pytest.approx(1 / 13)}
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (0, 0, 6)
    records = read_jsonl(judgments_path(tmp_path))
    assert sorted(record["judge"] for record in records) == ["contrarian"] * 6 + ["gpt-4-0613"] * 6


def test_judges_on_two_endpoints_with_both_orders_and_a_majority_of_three(tmp_path):
    """Two marker judges (one per endpoint) outvote a contrarian: the ensemble is the marker judges' verdict."""
    write_sample_file(tmp_path)
    with JudgeServer(judges={"contrarian": contrarian_judge}) as first, JudgeServer() as second:
        specs = ["gpt-4-0613", "contrarian", f"local-judge@{second.base_url}"]
        assert run_compare(tmp_path, first, "--both_orders", "-j", *specs) == 0
    assert {request.body["model"] for request in second.requests} == {"local-judge"}
    assert len(first.requests) == 2 * 2 * SAMPLE_COUNT and len(second.requests) == 2 * SAMPLE_COUNT
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (3, 1, 2)
    agreement = {tuple(row["judges"]): row for row in result["agreement"]}
    assert agreement[("gpt-4-0613", "local-judge")]["kappa"] == 1.0
    assert agreement[("gpt-4-0613", "contrarian")]["kappa"] == pytest.approx(1 / 13)


def test_a_failing_judge_leaves_its_prompts_unjudged_in_the_ensemble(tmp_path):
    write_sample_file(tmp_path)
    with JudgeServer() as server:
        server.add_faults("[id0]", ["500", "500"], model="second")  # both attempts of the first run
        assert run_compare(tmp_path, server, "-j", "gpt-4-0613", "second", "--max_retries", "1") == 1
        [partial] = read_jsonl(tmp_path / "results.jsonl")
        assert (partial["errors"], judge_report(partial)["errors"], judge_report(partial, "second")["errors"]) \
            == (1, 0, 1)
        assert run_compare(tmp_path, server, "-j", "gpt-4-0613", "second") == 0
    assert len(server.requests_containing("[id0]", model="second")) == 2 + 1
    assert read_jsonl(tmp_path / "results.jsonl")[-1]["errors"] == 0


def test_faults_with_both_orders_and_two_judges_are_retried(tmp_path):
    """429, 5xx, a hanging judge and a reply without text, spread over both orders and two judges: all retried."""
    write_sample_file(tmp_path)
    with JudgeServer() as server:
        server.add_faults("[id0]", ["hang"], model="second")  # bounded by the 0.5 s client timeout
        server.add_faults("[id1]", ["429", "500"])
        server.add_faults("[id2]", ["empty_choices"], model="gpt-4-0613")
        assert run_compare(tmp_path, server, "--both_orders", "-j", "gpt-4-0613", "second") == 0
    assert len(server.requests) == 4 * SAMPLE_COUNT + 1 + 2 + 1
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["errors"]) == (3, 1, 0)


# ---- graded verdicts --------------------------------------------------------------------------------------------


def graded_samples() -> list[dict]:
    """Scores (candidate, baseline): (2, 0), (0, 1), (1, 0), (0, 2), (0, 0), (1, 1), so the graded judge says
    A>>B, B>A, A>B, B>>A, tie, tie for the candidate."""
    marks = [(STRONG_MARKER, ""), ("", WINNER_MARKER), (WINNER_MARKER, ""), ("", STRONG_MARKER), ("", ""),
             (WINNER_MARKER, WINNER_MARKER)]
    samples = []
    for index, (candidate_mark, baseline_mark) in enumerate(marks):
        sample = make_sample(index, set(), set(), set())
        sample["policy"] = f"Policy answer {index} {candidate_mark}."
        sample["chosen"] = f"Chosen answer {index} {baseline_mark}."
        samples.append(sample)
    return samples


@pytest.mark.parametrize("strong_weight, expected", [("3", 4 / 10), ("1", 2 / 6)])
def test_graded_verdicts_weigh_strong_ones(tmp_path, strong_weight, expected):
    """With weight 3: wins 3 + 1 of 3 + 1 + 1 + 3 + 1 + 1 = 10 games; with weight 1: 2 of 6."""
    write_sample_file(tmp_path, graded_samples())
    with JudgeServer(judges={"gpt-4-0613": graded_marker_judge}) as server:
        assert run_compare(tmp_path, server, "--protocol", "graded", "--strong_weight", strong_weight) == 0
    assert {request.body["max_tokens"] for request in server.requests} == {20}
    assert "[[1>>2]] if Response 1 is much better" in server.requests[0].text
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (2, 2, 2)
    assert result["win_rate"]["value"] == pytest.approx(expected)
    assert (result["win_rate"]["ci_low"] is None) == (strong_weight == "3")


def test_binary_and_graded_judgments_do_not_mix(tmp_path):
    write_sample_file(tmp_path, graded_samples())
    with JudgeServer(judges={"gpt-4-0613": graded_marker_judge}) as server:
        run_compare(tmp_path, server, "--protocol", "graded")
        run_compare(tmp_path, server)
    assert len(server.requests) == 2 * SAMPLE_COUNT  # another template: other keys


# ---- cost -------------------------------------------------------------------------------------------------------


def test_cost_from_a_price_table_and_a_rerun_costs_nothing(tmp_path, capsys):
    """The server reports word counts as usage; the expected cost is worked out from what it received."""
    write_sample_file(tmp_path)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4-0613": {"input": 30, "output": 60}}))
    with JudgeServer() as server:
        assert run_compare(tmp_path, server, "--prices", str(prices)) == 0
        prompt_words = sum(word_count(message["content"]) for request in server.requests
                           for message in request.body["messages"])
        reply_words = sum(word_count(marker_judge(request.body["messages"])) for request in server.requests)
        assert "this run: judge gpt-4-0613 used" in capsys.readouterr().out
        assert run_compare(tmp_path, server, "--prices", str(prices)) == 0
        assert len(server.requests) == SAMPLE_COUNT
    out = capsys.readouterr().out
    assert "this run" not in out and "resuming: 6 of 6 judgments" in out
    [result] = read_jsonl(tmp_path / "results.jsonl")
    usage = judge_report(result)["usage"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (6, prompt_words, reply_words)
    assert result["cost"] == usage["cost"] == pytest.approx((prompt_words * 30 + reply_words * 60) / 1e6)


# ---- formats ----------------------------------------------------------------------------------------------------


def alpaca_rows(generator: str, marked: set, reference_marked: set = frozenset()) -> list[dict]:
    return [{"instruction": f"Question [id{index}]?",
             "output": f"{generator} answer {index}{' [good]' if index in marked else ''}.",
             "reference": f"Reference {index}{' [good]' if index in reference_marked else ''}.",
             "generator": generator} for index in range(4)]


def test_alpaca_eval_outputs_with_their_references(tmp_path, server):
    (tmp_path / "outputs.json").write_text(json.dumps(alpaca_rows("my-model", {0, 1}, {2})))
    argv = ["-f", str(tmp_path / "outputs.json"), *fast_flags(server.base_url, tmp_path), "--length_unit",
            "characters"]
    assert compare.main(argv) == 0
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["name"], result["baseline"]["name"], result["exp_name"]) == (
        "output", "reference", "my-model")
    assert (result["candidate"]["wins"], result["baseline"]["wins"]) == (2, 1)
    assert result["candidate"]["lengths"] == [len(row["output"]) for row in alpaca_rows("my-model", {0, 1})]
    # the bare instruction is shown as a user turn, as eval.py would have formatted it
    assert server.requests_containing("[id0]")[0].body["messages"][0]["content"].endswith(
        "<|user|> and <|assistant|>.\n\n<|user|>\nQuestion [id0]?")


def test_alpaca_eval_outputs_need_a_tokenizer_or_character_lengths(tmp_path, server, capsys):
    (tmp_path / "outputs.json").write_text(json.dumps(alpaca_rows("my-model", {0})))
    assert compare.main(["-f", str(tmp_path / "outputs.json"), *fast_flags(server.base_url, tmp_path)]) == 2
    assert "--length_unit characters" in capsys.readouterr().err


def test_two_models_sample_files_compared_directly(tmp_path, server):
    """Model vs model: each eval.py sample file's policy; the baseline's file lists the prompts in another order."""
    ours = [make_sample(index) for index in range(SAMPLE_COUNT)]
    theirs = [{**make_sample(index), "policy": f"Their answer {index}{' [good]' if index == 4 else ''}."}
              for index in reversed(range(SAMPLE_COUNT))]
    write_sample_file(tmp_path, ours, name="ours.json")
    write_sample_file(tmp_path, theirs, config={"exp_name": "their_run"}, name="theirs.json")
    argv = ["-f", str(tmp_path / "ours.json"), "-bf", str(tmp_path / "theirs.json"),
            *fast_flags(server.base_url, tmp_path)]
    assert compare.main(argv) == 0
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["name"], result["baseline"]["name"]) == ("tiny_run", "their_run")
    # ours win where marked (0, 2, 3, 5); theirs only on 4, where ours has no marker
    assert (result["candidate"]["wins"], result["baseline"]["wins"], result["ties_or_invalid"]) == (4, 1, 1)
    for request in server.requests:
        assert f"Their answer {sample_of(request)}" in request.text
    assert (tmp_path / "judgments" / "results.tiny_run.tiny_run_vs_their_run.jsonl").exists()


def arena_hard_files(tmp_path: Path) -> None:
    questions = [{"question_id": f"q{index}", "category": "arena-hard-v0.1",
                  "turns": [{"content": f"Question [id{index}]?"}]} for index in range(3)]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(row) + "\n" for row in questions))
    for model, marked in [("model-a", {0, 1}), ("model-b", {2})]:
        answers = [{"question_id": f"q{index}", "answer_id": f"{model}-{index}", "model_id": model,
                    "choices": [{"index": 0, "turns": [{"content": f"{model} says{' [good]' * (index in marked)}."}]}],
                    "tstamp": 0.0} for index in range(3)]
        (tmp_path / f"{model}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))


def test_arena_hard_answers_against_each_other(tmp_path, server):
    arena_hard_files(tmp_path)
    argv = ["-f", str(tmp_path / "model-a.jsonl"), "-bf", str(tmp_path / "model-b.jsonl"), "--questions",
            str(tmp_path / "question.jsonl"), "--length_unit", "characters", *fast_flags(server.base_url, tmp_path)]
    assert compare.main(argv) == 0
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert (result["candidate"]["name"], result["baseline"]["name"]) == ("model-a", "model-b")
    assert (result["candidate"]["wins"], result["baseline"]["wins"]) == (2, 1)


def test_an_arena_hard_file_with_a_single_answer(tmp_path, server):
    arena_hard_files(tmp_path)
    for model in ("model-a", "model-b"):
        first_line = (tmp_path / f"{model}.jsonl").read_text().splitlines()[0]
        (tmp_path / f"{model}.jsonl").write_text(first_line + "\n")  # one line: it parses as one JSON object
    argv = ["-f", str(tmp_path / "model-a.jsonl"), "-bf", str(tmp_path / "model-b.jsonl"), "--questions",
            str(tmp_path / "question.jsonl"), "--length_unit", "characters", *fast_flags(server.base_url, tmp_path)]
    assert compare.main(argv) == 0
    assert read_jsonl(tmp_path / "results.jsonl")[0]["candidate"]["wins"] == 1


@pytest.mark.parametrize("change, message", [
    ("no_questions", "pass the questions file with --questions"),
    ("no_baseline", "hold one model's answers; pass the baseline's file"),
    ("missing_prompt", "the prompt of sample 2 .* is not in"),
])
def test_format_errors_are_one_line(tmp_path, server, capsys, change, message):
    arena_hard_files(tmp_path)
    argv = ["-f", str(tmp_path / "model-a.jsonl"), "--length_unit", "characters",
            *fast_flags(server.base_url, tmp_path)]
    if change != "no_questions":
        argv += ["--questions", str(tmp_path / "question.jsonl")]
    if change == "missing_prompt":
        rows = read_jsonl(tmp_path / "model-b.jsonl")[:2]
        (tmp_path / "model-b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if change != "no_baseline":
        argv += ["-bf", str(tmp_path / "model-b.jsonl")]
    assert compare.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert re.search(message, error) and "\n" not in error
    assert server.requests == []


def test_alpaca_eval_files_are_written(tmp_path, server):
    write_sample_file(tmp_path)
    assert run_compare(tmp_path, server, "--alpaca_eval_dir", str(tmp_path / "alpaca")) == 0
    outputs = json.loads((tmp_path / "alpaca" / "model_outputs.json").read_text())
    references = json.loads((tmp_path / "alpaca" / "reference_outputs.json").read_text())
    assert outputs[0] == {"instruction": "Question [id0]?", "output": make_sample(0)["policy"],
                          "generator": "policy"}
    assert references[1]["output"] == make_sample(1)["chosen"] and references[1]["generator"] == "chosen"
    annotations = json.loads((tmp_path / "alpaca" / "annotations.json").read_text())
    assert [annotation["preference"] for annotation in annotations] == [2.0, 1.0, 2.0, 2.0, 1.5, 1.5]
    assert annotations[0]["output_2"] == outputs[0]["output"] and annotations[0]["annotator"] == "gpt-4-0613"


# ---- the chart --------------------------------------------------------------------------------------------------


def test_the_win_rate_chart_is_an_image_of_every_judges_rates(tmp_path):
    import matplotlib.image

    write_sample_file(tmp_path)
    with JudgeServer(judges={"contrarian": contrarian_judge}) as server:
        assert run_compare(tmp_path, server, "-j", "gpt-4-0613", "contrarian", "--plot",
                           str(tmp_path / "win_rates.png")) == 0
    image = matplotlib.image.imread(tmp_path / "win_rates.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.01  # more than a blank canvas
    [result] = read_jsonl(tmp_path / "results.jsonl")
    figure = win_rate_figure(result)
    bars = [patch.get_height() for patch in figure.axes[0].patches]
    raw_rates = [0.5, pytest.approx(1 / 6), 0.0]  # marker judge, contrarian, ensemble (all ties)
    assert bars[:3] == raw_rates
    assert [tick.get_text() for tick in figure.axes[0].get_xticklabels()] == ["gpt-4-0613", "contrarian",
                                                                              "ensemble"]


def test_plot_without_matplotlib_fails_before_judging(tmp_path, monkeypatch, capsys):
    """matplotlib is a dependency now, but a trimmed install still gets a one-line error, not a traceback."""
    write_sample_file(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else find_spec(name, *a))
    with JudgeServer() as server:
        assert run_compare(tmp_path, server, "--plot", str(tmp_path / "win_rate.png")) == 2
        assert server.requests == []
    assert "needs matplotlib" in capsys.readouterr().err


# ---- the README's command ---------------------------------------------------------------------------------------


def test_the_readmes_two_judge_command_runs_as_written(tmp_path):
    """The README's command, with its sample file and local endpoints swapped for the test's."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- example: compare-two-judges -->\n```bash\n(.*?)```", readme, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["python", "compare.py"]
    write_sample_file(tmp_path)
    with JudgeServer() as first, JudgeServer() as second:
        replacements = {"samples/X.json": str(tmp_path / "samples.json"),
                        "results.jsonl": str(tmp_path / "results.jsonl"),
                        "http://localhost:8000/v1": first.base_url, "http://localhost:8001/v1": second.base_url}
        for old, new in replacements.items():
            argv = [argument.replace(old, new) for argument in argv]
        assert compare.main(argv[2:] + ["--no-verbose"]) == 0
    assert len(first.requests) == len(second.requests) == 2 * SAMPLE_COUNT
    [result] = read_jsonl(tmp_path / "results.jsonl")
    assert list(result["judges"]) == ["llama-3-70b", "qwen2-72b"] and result["settings"]["both_orders"]
    assert result["agreement"][0]["kappa"] == 1.0 and result["win_rate"]["bootstrap_low"] is not None
