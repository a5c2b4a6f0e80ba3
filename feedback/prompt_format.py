"""How a conversation becomes model text: the original's four prefix strings, or a chat template.

Training, eval.py sampling and the reference log-prob cache all get their text from one `PromptFormat`, built
from the run's config by `prompt_format_from_config`:

* `model.chat_template: null` (the default of the original's presets): `PrefixFormat` — every user/system turn
  is `human_prefix + text + human_suffix`, every assistant turn `assistant_prefix + text + assistant_suffix`, and
  the prompt ends with `assistant_prefix`; byte for byte the original's prompts.
* `model.chat_template: tokenizer`: `ChatTemplateFormat` with the tokenizer's own chat template (the shipped
  `assets/halos_chat_template.jinja` when the tokenizer has none); any other value is the path of a Jinja template
  file. The prompt is the template's rendering with the generation prompt; a response is what rendering the
  conversation with that assistant turn adds after the prompt (its end-of-turn marker included).

Tokenisation (feedback/tokenization.py) checks the templated prompt's tokens are a prefix of prompt + response's tokens.
"""
import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from errors import ConfigError
from feedback.examples import DataError, Example, Message
from utils import REPO_ROOT

FALLBACK_TEMPLATE = REPO_ROOT / "assets" / "halos_chat_template.jinja"
TOKENIZER_TEMPLATE = "tokenizer"  # model.chat_template value: the tokenizer's own template


class RenderedExample(NamedTuple):
    """The text of one Example under a prompt format.

    Attributes:
        prompt: the prompt text, ending where the response starts.
        responses: generation index -> response text (after the prompt).
        assistant_spans: (start, end) character spans of the prompt's own assistant turns (every-turn SFT only).
    """
    prompt: str
    responses: Dict[int, str]
    assistant_spans: Tuple[Tuple[int, int], ...]


class PromptFormat(ABC):
    """Renders Examples as text; `templated` says whether tokenisation must check the chat-template prefix property."""

    templated: bool = False
    name: str = ""

    @abstractmethod
    def render(self, example: Example, indices: Sequence[int], with_spans: bool = False) -> RenderedExample:
        """The prompt and the generations at `indices`; `with_spans` also locates the prompt's assistant turns."""

    @abstractmethod
    def fingerprint(self) -> Dict[str, object]:
        """What determines the rendered text, for the reference log-prob cache key."""


class PrefixFormat(PromptFormat):
    """The original's formatting with four strings (defaults: the original's config defaults)."""

    def __init__(self, human_prefix: str = "\n<|user|>\n", human_suffix: str = "",
                 assistant_prefix: str = "\n<|assistant|>\n", assistant_suffix: str = ""):
        self.human_prefix, self.human_suffix = human_prefix, human_suffix
        self.assistant_prefix, self.assistant_suffix = assistant_prefix, assistant_suffix
        self.name = "the prefix strings"

    @property
    def strings(self) -> Tuple[str, str, str, str]:
        """(human_prefix, human_suffix, assistant_prefix, assistant_suffix), as `get_<name>` functions of the
        original's contract take them."""
        return self.human_prefix, self.human_suffix, self.assistant_prefix, self.assistant_suffix

    def render(self, example: Example, indices: Sequence[int], with_spans: bool = False) -> RenderedExample:
        if not example.is_conversational:
            # A formatted Example (the original's contract): its texts are final.
            if with_spans:
                raise DataError(f"{example.describe()}: sft_all_assistant_turns needs conversational Examples, but "
                                f"this dataset's function returns formatted prompts")
            return RenderedExample(example.prompt, {i: example.generations[i] for i in indices}, ())
        pieces, spans, length = [], [], 0
        for message in example.prompt_messages:
            if message.role == "assistant":
                opening, closing = self.assistant_prefix, self.assistant_suffix
                spans.append((length + len(opening), length + len(opening) + len(message.content) + len(closing)))
            else:
                opening, closing = self.human_prefix, self.human_suffix
            pieces.append(opening + message.content + closing)
            length += len(pieces[-1])
        prompt = "".join(pieces) + self.assistant_prefix
        return RenderedExample(prompt, {i: example.generations[i] + self.assistant_suffix for i in indices},
                               tuple(spans))

    def fingerprint(self) -> Dict[str, object]:
        return {"format": "prefixes", "strings": list(self.strings)}


class ChatTemplateFormat(PromptFormat):
    """Formatting with a Jinja chat template, rendered by the tokenizer's `apply_chat_template`."""

    templated = True

    def __init__(self, tokenizer, template: str, name: str):
        self.tokenizer, self.template, self.name = tokenizer, template, name

    def apply(self, messages: Sequence[Message], generation_prompt: bool, example: Example) -> str:
        try:
            return self.tokenizer.apply_chat_template([message._asdict() for message in messages], tokenize=False,
                                                      add_generation_prompt=generation_prompt,
                                                      chat_template=self.template)
        # Templates raise whatever their Jinja code raises (TemplateError, TypeError, ...).
        except Exception as err:
            raise DataError(f"{example.describe()}: {self.name} failed to render it "
                            f"({type(err).__name__}: {err})") from err

    def render(self, example: Example, indices: Sequence[int], with_spans: bool = False) -> RenderedExample:
        if not example.is_conversational:
            raise DataError(f"{example.describe()}: the dataset's function formats its own prompts with the four "
                            f"prefix strings, so it cannot use {self.name}; return conversational Examples (see "
                            f"README: Adding a dataset) or set ++model.chat_template=null")
        messages = example.prompt_messages
        prompt = self.apply(messages, True, example)
        responses = {i: self.continuation(prompt, [*messages, Message("assistant", example.generations[i])],
                                          example) for i in indices}
        spans = []
        if with_spans:
            for position, message in enumerate(messages):
                if message.role == "assistant":
                    opening = self.apply(messages[:position], True, example)
                    turn = self.continuation(opening, messages[:position + 1], example)
                    if not prompt.startswith(opening + turn):
                        raise DataError(f"{example.describe()}: {self.name} renders the prompt's assistant turn "
                                        f"{position + 1} differently inside the whole prompt")
                    spans.append((len(opening), len(opening) + len(turn)))
        return RenderedExample(prompt, responses, tuple(spans))

    def continuation(self, prompt: str, conversation: List[Message], example: Example) -> str:
        """What `conversation` (the prompt's messages plus an assistant turn) renders after `prompt`."""
        full = self.apply(conversation, False, example)
        if not full.startswith(prompt):
            cut = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise DataError(f"{example.describe()}: {self.name} breaks the prefix property: the prompt rendered "
                            f"with the generation prompt is not the start of the conversation rendered with the "
                            f"response (they differ at character {cut}: {prompt[cut:cut + 20]!r} vs "
                            f"{full[cut:cut + 20]!r})")
        return full[len(prompt):]

    def fingerprint(self) -> Dict[str, object]:
        return {"format": "chat_template", "template_sha1": hashlib.sha1(self.template.encode()).hexdigest()}


def template_path(value: str) -> Optional[Path]:
    """The template file a model.chat_template path names: as given (relative to the working directory), else
    relative to this repository; None if neither exists."""
    return next((path for path in (Path(value), REPO_ROOT / value) if path.is_file()), None)


def chat_template_problem(value) -> Optional[str]:
    """`model.chat_template: problem`, or None when the value is usable (the config check's part)."""
    if value is None or value == TOKENIZER_TEMPLATE:
        return None
    if not isinstance(value, str) or template_path(value) is None:
        return (f"model.chat_template: {value!r} is not null, '{TOKENIZER_TEMPLATE}' or an existing Jinja template "
                f"file")
    return None


def prompt_format_from_config(config, tokenizer) -> PromptFormat:
    """The run's prompt format: model.chat_template, else the four prefix strings of the top-level config."""
    choice = config.model.get("chat_template")
    if choice is None:
        return PrefixFormat(config.human_prefix, config.human_suffix, config.assistant_prefix, config.assistant_suffix)
    if choice == TOKENIZER_TEMPLATE:
        if tokenizer.chat_template:
            return ChatTemplateFormat(tokenizer, tokenizer.chat_template, "the tokenizer's chat template")
        return ChatTemplateFormat(tokenizer, FALLBACK_TEMPLATE.read_text(),
                                  f"the fallback chat template {FALLBACK_TEMPLATE.name} (the tokenizer has none)")
    path = template_path(str(choice))
    if path is None:
        raise ConfigError(chat_template_problem(choice))
    return ChatTemplateFormat(tokenizer, path.read_text(), f"the chat template {path}")


def config_fingerprint(config) -> Dict[str, object]:
    """The prompt format as the config determines it, without a tokenizer (the tokenizer's name is keyed elsewhere;
    a template file is keyed by its content)."""
    choice = config.model.get("chat_template")
    if choice is None:
        return PrefixFormat(config.human_prefix, config.human_suffix, config.assistant_prefix,
                            config.assistant_suffix).fingerprint()
    path = None if choice == TOKENIZER_TEMPLATE else template_path(str(choice))
    return {"format": "chat_template", "template": str(choice),
            "template_sha1": hashlib.sha1(path.read_bytes()).hexdigest() if path else None}
