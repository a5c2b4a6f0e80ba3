"""Files of model responses that compare.py reads and writes, turned into prompt-aligned pairs.

Read (the format is recognised from the content):
* eval.py sample files: `{"sampled_at", "config", "samples": [{"prompt", "chosen", "policy"}, ...]}`;
* AlpacaEval model outputs: a JSON list of `{"instruction", "output", "generator", ...}`;
* Arena-Hard-Auto answers: JSONL of `{"question_id", "model_id", "choices": [{"turns": [{"content"}]}]}`, with the
  questions (JSONL of `{"question_id", "turns": [{"content"}]}`) from a separate file.

Bare instructions (AlpacaEval, Arena-Hard) are formatted with the run's turn prefixes, as eval.py formats them, so
the judge sees every source the same way and two files can be matched prompt by prompt. Written: AlpacaEval
model outputs and annotations (`write_alpaca_eval`).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from errors import HalosError
from judging.protocol import DEFAULT_ASSISTANT_PREFIX, DEFAULT_HUMAN_PREFIX, PromptFormat, history_before_last_turn

SAMPLES, ALPACA_EVAL, ARENA_HARD = "eval.py samples", "AlpacaEval outputs", "Arena-Hard answers"
# (candidate key in a one-file comparison, baseline key there, prompt key); the baseline of a two-file
# comparison is the other file's candidate key.
DEFAULT_KEYS = {SAMPLES: ("policy", "chosen", "prompt"), ALPACA_EVAL: ("output", "reference", "instruction"),
                ARENA_HARD: ("output", None, "instruction")}
PREVIEW_CHARS = 60


@dataclass(frozen=True)
class ResponseFile:
    """One file's rows, normalised to dicts of strings, with what it says about the run that wrote it."""

    path: Path
    format: str
    rows: list[dict]
    name: str  # the model: config.exp_name, the AlpacaEval generator, the Arena-Hard model_id, else the file stem
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PairSet:
    """Prompt-aligned candidate and baseline responses. Every list has one entry per prompt, in file order."""

    prompts: list[str]  # formatted as the policy saw them (ending with the assistant prefix)
    instructions: list[str]  # the bare user turn, for AlpacaEval outputs
    candidate: list[str]
    baseline: list[str]
    candidate_name: str
    baseline_name: str
    exp_name: str
    config: dict  # the candidate file's eval.py config ({} for other formats)
    prompt_format: PromptFormat
    source: Path  # the candidate's file


def read_json(path: Path, what: str) -> object:
    """A JSON document, or a list of rows if the file is JSON Lines."""
    if not path.is_file():
        raise HalosError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise HalosError(f"{what} {str(path)!r} is not UTF-8 text ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole_error:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise HalosError(f"{what} {str(path)!r} is not valid JSON or JSON Lines ({whole_error})") from None


def read_questions(path: str | None) -> dict:
    """Arena-Hard questions by question_id: their single user turn."""
    if path is None:
        raise HalosError("Arena-Hard answers hold no question text: pass the questions file with --questions")
    rows = read_json(Path(path), "questions file")
    questions = {}
    for index, row in enumerate(rows if isinstance(rows, list) else [None]):
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], dict) \
                or not isinstance(turns[0].get("content"), str):
            raise HalosError(f"question {index} in {path!r} must have 'question_id' and one turn "
                             "{'content': str} (multi-turn questions are not supported)")
        questions[row.get("question_id")] = turns[0]["content"]
    return questions


def arena_hard_rows(rows: list, path: Path, questions_path: str | None) -> list[dict]:
    """Arena-Hard answers as {"instruction", "output"} rows."""
    questions = read_questions(questions_path)
    normalised = []
    for index, row in enumerate(rows):
        try:
            answer = row["choices"][0]["turns"][-1]["content"]
        except (KeyError, IndexError, TypeError):
            answer = None
        if not isinstance(answer, str):
            raise HalosError(f"answer {index} in {str(path)!r} has no choices[0].turns[-1].content string")
        if row["question_id"] not in questions:
            raise HalosError(f"answer {index} in {str(path)!r}: question_id {row['question_id']!r} is not in "
                             f"{questions_path!r}")
        normalised.append({"instruction": questions[row["question_id"]], "output": answer})
    return normalised


def read_response_file(path: str, questions_path: str | None = None) -> ResponseFile:
    """Read and recognise one file of responses (any of the three formats)."""
    file = Path(path)
    data = read_json(file, "sample file")
    if isinstance(data, dict) and "question_id" in data:
        data = [data]  # JSON Lines with a single answer parse as one object
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        config = data.get("config", {})
        if not isinstance(config, dict):
            raise HalosError(f"sample file {path!r}: 'config' must be an object")
        check_rows(data["samples"], file)
        return ResponseFile(file, SAMPLES, data["samples"], str(config.get("exp_name", file.stem)), config)
    if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        if all("question_id" in row and "choices" in row for row in data):
            return ResponseFile(file, ARENA_HARD, arena_hard_rows(data, file, questions_path),
                                str(data[0].get("model_id", file.stem)))
        if all("instruction" in row for row in data):
            return ResponseFile(file, ALPACA_EVAL, data, str(data[0].get("generator", file.stem)))
    if isinstance(data, dict) and "samples" not in data:
        raise HalosError(f"sample file {path!r} has no 'samples' list")
    raise HalosError(f"sample file {path!r} is none of: an eval.py sample file {{samples: [...]}}, AlpacaEval "
                     "outputs [{instruction, output, generator}], Arena-Hard answers (JSONL of {question_id, "
                     "choices})")


def check_rows(rows: list, path: Path) -> None:
    if not rows:
        raise HalosError(f"sample file {str(path)!r} has no samples")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise HalosError(f"sample {index} in {str(path)!r} is not an object")


def field_of(response_file: ResponseFile, index: int, key: str) -> str:
    """`rows[index][key]`, which must be a string."""
    row = response_file.rows[index]
    if key not in row:
        raise HalosError(f"sample {index} in {str(response_file.path)!r} has no {key!r} key")
    if not isinstance(row[key], str):
        raise HalosError(f"sample {index} in {str(response_file.path)!r}: {key!r} must be a string")
    return row[key]


def prompt_format_of(config: dict) -> PromptFormat:
    return PromptFormat(config.get("human_prefix", DEFAULT_HUMAN_PREFIX),
                        config.get("assistant_prefix", DEFAULT_ASSISTANT_PREFIX))


def prompts_of(response_file: ResponseFile, prompt_key: str, count: int, prompt_format: PromptFormat) -> list[str]:
    """The first `count` prompts, formatted: as stored for eval.py samples, from the instruction otherwise."""
    texts = [field_of(response_file, index, prompt_key) for index in range(count)]
    return texts if response_file.format == SAMPLES else [prompt_format.prompt_for(text) for text in texts]


def instruction_of(prompt: str, prompt_format: PromptFormat) -> str:
    """The bare user turn of a single-turn prompt; the whole history (stripped) of a longer one."""
    history = history_before_last_turn(prompt, prompt_format.assistant_prefix)
    human = prompt_format.human_prefix.strip()
    if human and history.startswith(human) and human not in history[len(human):] \
            and prompt_format.assistant_prefix.strip() not in history:
        return history[len(human):].strip()
    return history


def unique_positions(prompts: list[str], path: Path) -> dict[str, int]:
    """Position of each prompt; two equal prompts are an error (they could not be told apart or matched)."""
    positions = {}
    for index, prompt in enumerate(prompts):
        if prompt in positions:
            raise HalosError(f"samples {positions[prompt]} and {index} in {str(path)!r} have the same prompt "
                             f"({preview(prompt)}); remove one")
        positions[prompt] = index
    return positions


def preview(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS] + "...")


@dataclass(frozen=True)
class PairKeys:
    """Which field of each row holds what; None takes the format's default (DEFAULT_KEYS)."""

    candidate: str | None = None
    baseline: str | None = None
    prompt: str | None = None


def load_pairs(path: str, keys: PairKeys, max_comp: int | None, baseline_path: str | None = None,
               questions_path: str | None = None) -> PairSet:
    """The first `max_comp` prompts of `path` with its candidate response and a baseline response.

    The baseline comes from the same rows (`keys.baseline`), or, with `baseline_path`, from the row of that file
    with the same formatted prompt (its `keys.baseline`, by default its model response).
    """
    candidate_file = read_response_file(path, questions_path)
    default_candidate, default_baseline, default_prompt = DEFAULT_KEYS[candidate_file.format]
    candidate_key, prompt_key = keys.candidate or default_candidate, keys.prompt or default_prompt
    count = len(candidate_file.rows) if max_comp is None else min(max_comp, len(candidate_file.rows))
    baseline_file = read_response_file(baseline_path, questions_path) if baseline_path else None
    configs = [f.config for f in (candidate_file, baseline_file) if f is not None and f.config]
    prompt_format = prompt_format_of(configs[0] if configs else {})
    prompts = prompts_of(candidate_file, prompt_key, count, prompt_format)
    unique_positions(prompts, candidate_file.path)
    candidate = [field_of(candidate_file, index, candidate_key) for index in range(count)]
    if baseline_file is None:
        baseline_key = keys.baseline or default_baseline
        if baseline_key is None:
            raise HalosError(f"{candidate_file.format} in {path!r} hold one model's answers; pass the baseline's "
                             "file with --baseline_file")
        if baseline_key == candidate_key:
            raise HalosError(f"--candidate_key and --baseline_key are both {candidate_key!r}")
        baseline = [field_of(candidate_file, index, baseline_key) for index in range(count)]
        names = (candidate_key, baseline_key)
    else:
        baseline = matched_responses(prompts, baseline_file, keys, prompt_format)
        names = (candidate_file.name, baseline_file.name)
    instructions = [instruction_of(prompt, prompt_format) for prompt in prompts]
    return PairSet(prompts, instructions, candidate, baseline, *names, candidate_file.name, candidate_file.config,
                   prompt_format, candidate_file.path)


def matched_responses(prompts: list[str], baseline_file: ResponseFile, keys: PairKeys,
                      prompt_format: PromptFormat) -> list[str]:
    """The baseline file's response to each prompt, matched on the formatted prompt text."""
    response_key, _, default_prompt = DEFAULT_KEYS[baseline_file.format]
    response_key = keys.baseline or response_key
    baseline_prompts = prompts_of(baseline_file, keys.prompt or default_prompt, len(baseline_file.rows),
                                  prompt_format)
    positions = unique_positions(baseline_prompts, baseline_file.path)
    responses = []
    for index, prompt in enumerate(prompts):
        if prompt not in positions:
            raise HalosError(f"the prompt of sample {index} ({preview(prompt)}) is not in "
                             f"{str(baseline_file.path)!r}")
        responses.append(field_of(baseline_file, positions[prompt], response_key))
    return responses


def write_json_atomically(path: Path, data: object) -> None:
    """Write JSON to a temporary file and rename it into place, so a crash leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)


def write_alpaca_eval(directory: Path, pairs: PairSet, preferences: dict[str, list[float | None]]) -> None:
    """AlpacaEval files: `model_outputs.json` (the candidate), `reference_outputs.json` (the baseline) and
    `annotations.json`, one entry per judge and judged prompt in AlpacaEval's annotation format.

    `preferences[judge][i]` is AlpacaEval's preference for prompt i: 2 the candidate (output_2) won, 1 the
    baseline (output_1) won, 1.5 a tie; None (a failed judgment) writes no annotation.
    """
    for file_name, responses, generator in [("model_outputs.json", pairs.candidate, pairs.candidate_name),
                                            ("reference_outputs.json", pairs.baseline, pairs.baseline_name)]:
        write_json_atomically(directory / file_name, [
            {"instruction": instruction, "output": output, "generator": generator}
            for instruction, output in zip(pairs.instructions, responses)])
    annotations = [
        {"instruction": pairs.instructions[index], "output_1": pairs.baseline[index],
         "generator_1": pairs.baseline_name, "output_2": pairs.candidate[index],
         "generator_2": pairs.candidate_name, "annotator": judge, "preference": preference}
        for judge, judge_preferences in preferences.items()
        for index, preference in enumerate(judge_preferences) if preference is not None]
    write_json_atomically(directory / "annotations.json", annotations)
