"""What a client may ask: OpenAI's chat and text completion requests, checked and turned into :class:`Job`\\ s.

Requests are parsed from the raw body, so that every mistake (malformed JSON, a wrong type, a value out of
range, a field we cannot honour) becomes a :class:`~latentgraph.errors.RequestError` with our own message
naming the field. Fields that do not change an answer (``user``, ``metadata``, ...) are accepted and ignored.

A chat's question is its last message, which must be the user's; the messages before it are passed on as a
transcript before the question (:func:`question_of`, documented in docs/serve.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.sampling import Sampling
from ..errors import InputError, RequestError
from .limits import Limits

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's seed
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Row:
    """One answer to decode: a question with its settings. A request with ``n`` choices makes ``n`` rows."""

    question: str
    sampling: Sampling
    seed: int | None
    index: int  # the choice's index in the response


@dataclass(frozen=True)
class Job:
    """A checked request: its rows, and what its response needs."""

    rows: list[Row]
    stream: bool
    include_usage: bool
    events: bool
    prompts: int  # distinct questions (usage counts each prompt once)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Extension(_Strict):
    events: bool = False  # also send the agents' events


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None  # a string or a list of text parts, checked by question_of


class _Request(_Strict):
    """The fields chat and text completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: Any = None  # a string or a list of strings, checked by stop_strings
    stream: bool = False
    stream_options: _StreamOptions | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    latentgraph: _Extension | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something the server cannot do."""
        given = {
            "logprobs": self.logprobs not in (None, False, 0),
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
        }
        return [name for name, set_ in given.items() if set_]


class ChatRequest(_Request):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        given = {
            "top_logprobs": self.top_logprobs is not None,
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none"),
            "response_format": self.response_format not in (None, {"type": "text"}),
        }
        return super().unsupported() + [name for name, set_ in given.items() if set_]


class CompletionRequest(_Request):
    prompt: Any  # a string or a list of strings, checked by prompt_questions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        given = {"echo": self.echo, "suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1)}
        return super().unsupported() + [name for name, set_ in given.items() if set_]


def parse(kind: type[_Request], body: bytes) -> _Request:
    """The request in ``body``, or a :class:`RequestError` naming the first thing wrong with it."""
    try:
        request = kind.model_validate_json(body)
    except ValidationError as e:
        raise _request_error(e.errors()[0]) from None
    if unsupported := request.unsupported():
        name = unsupported[0]
        why = "log probabilities are" if "logprobs" in name else f"'{name}' is"
        raise RequestError(f"{why} not supported by this server; remove '{name}' from the request", param=name,
                           code="unsupported_parameter")
    return request


def _request_error(error: dict) -> RequestError:
    """Pydantic's first error as our message: the field's path and what it must be."""
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind = error["type"]
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')}); "
                            "send one JSON object")
    if kind in ("model_type", "dict_type") and not param:
        return RequestError("the request body must be a JSON object")
    must = {"missing": "is required", "int_type": "must be an integer", "float_type": "must be a number",
            "string_type": "must be a string", "bool_type": "must be true or false", "list_type": "must be a list",
            "model_type": "must be an object", "dict_type": "must be an object",
            "int_from_float": "must be an integer"}.get(kind)
    if kind == "literal_error":
        must = f"must be one of {error['ctx']['expected']}"
    return RequestError(f"'{param}' {must or error['msg']}", param=param)


def job_of(request: _Request, questions: list[str], limits: Limits) -> Job:
    """Check the settings against the limits and make the request's rows."""
    max_tokens = _max_tokens(request, limits)
    n = request.n
    if not 1 <= n * len(questions) <= limits.max_n:
        what = "'n'" if len(questions) == 1 else "'n' times the number of prompts"
        raise RequestError(f"{what} must be between 1 and {limits.max_n} (this server's --max-n), got "
                           f"{n * len(questions)}", param="n")
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be above 0 and at most 1, got {top_p}", param="top_p")
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1] - limits.max_n:
        raise RequestError(f"'seed' must be a 64-bit integer, got {request.seed}", param="seed")
    for question in questions:
        if len(question) > limits.max_question_chars:
            raise RequestError(f"the question has {len(question)} characters, more than this server's limit of "
                               f"{limits.max_question_chars} (--max-question-chars); shorten it",
                               param="messages" if isinstance(request, ChatRequest) else "prompt",
                               code="context_length_exceeded")
    if request.stream_options is not None and not request.stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    greedy = temperature == 0
    try:
        sampling = Sampling(do_sample=not greedy, temperature=1.0 if greedy else temperature, top_p=top_p,
                            max_new_tokens=max_tokens, stop=stop_strings(request.stop))
    except InputError as e:  # what is left to check: the stop strings' count and lengths
        raise RequestError(f"'stop' is invalid: {str(e).removeprefix('invalid decoding settings: ')}",
                           param="stop") from None
    rows = [Row(question=question, sampling=sampling, index=p * n + i,
                seed=None if request.seed is None else request.seed + i)
            for p, question in enumerate(questions) for i in range(n)]
    return Job(rows=rows, stream=request.stream, events=bool(request.latentgraph and request.latentgraph.events),
               include_usage=bool(request.stream_options and request.stream_options.include_usage),
               prompts=len(questions))


def _max_tokens(request: _Request, limits: Limits) -> int:
    given = {name: value for name in ("max_completion_tokens", "max_tokens")
             if (value := getattr(request, name, None)) is not None}
    if len(set(given.values())) > 1:
        raise RequestError("'max_tokens' and 'max_completion_tokens' differ; give one of them",
                           param="max_completion_tokens")
    name, value = next(iter(given.items()), ("max_tokens", min(limits.default_max_tokens, limits.max_tokens_cap)))
    if not 1 <= value <= limits.max_tokens_cap:
        raise RequestError(f"'{name}' must be between 1 and {limits.max_tokens_cap} (this server's "
                           f"--max-tokens-cap), got {value}", param=name)
    return value


def stop_strings(stop: Any) -> tuple[str, ...]:
    """OpenAI's ``stop``: none, a string, or a list of strings (how many and how long: see ``Sampling``)."""
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not (isinstance(strings, list) and all(isinstance(s, str) for s in strings)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    return tuple(strings)


def question_of(messages: list[_Message]) -> str:
    """The question a chat asks: its last message, the user's. Earlier messages come before it as a transcript,
    one paragraph each (``User: ...``, ``Assistant: ...``, ``System: ...``), then a blank line."""
    if not messages:
        raise RequestError("'messages' is empty; send at least one user message", param="messages")
    texts = [_text(message, f"messages[{i}]") for i, message in enumerate(messages)]
    if messages[-1].role != "user":
        raise RequestError(f"the last message must be the user's question, got a '{messages[-1].role}' message",
                           param=f"messages[{len(messages) - 1}].role")
    earlier = [f"{ROLE_NAMES[m.role]}: {text}" for m, text in zip(messages[:-1], texts)]
    return "\n\n".join([*earlier, texts[-1]]) if earlier else texts[-1]


def _text(message: _Message, param: str) -> str:
    if message.role not in ROLE_NAMES:
        raise RequestError(f"'{message.role}' messages are not supported (this server runs no tools); send "
                           "system, user and assistant messages", param=f"{param}.role")
    content = message.content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "\n".join(p.get("text") for p in content) if all(isinstance(p.get("text"), str)
                                                                    for p in content) else None
    if not isinstance(content, str):
        raise RequestError(f"'{param}.content' must be a string or a list of text parts "
                           '({"type": "text", "text": "..."}); images and audio are not supported',
                           param=f"{param}.content")
    return content


def prompt_questions(prompt: Any) -> list[str]:
    """A text completion's questions: its prompt, a string or a list of strings (not token ids)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise RequestError("'prompt' must be a string or a non-empty list of strings (token ids are not "
                           "supported)", param="prompt")
    return prompts
