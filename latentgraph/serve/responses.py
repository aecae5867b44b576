"""What the server answers, in OpenAI's shapes: completions, streamed chunks, server-sent events and errors.

A :class:`Reply` collects the items of one request's rows (see :mod:`~latentgraph.serve.batcher`) into
OpenAI's response objects, for chat completions (``chat.completion`` and ``chat.completion.chunk``) and
text completions (``text_completion``) alike.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..errors import RequestError
from ..version import __version__
from .batcher import Delta, Finished, Item, Record
from .protocol import Job

FINGERPRINT = f"latentgraph-{__version__}"
DONE = b"data: [DONE]\n\n"


def error_body(message: str, *, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; its type follows from the status."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "server_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def request_error_body(error: RequestError) -> dict:
    return error_body(str(error), status=error.status, param=error.param, code=error.code)


def sse(payload: dict) -> bytes:
    """One server-sent event holding ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class Reply:
    """One request's response, built from its items. ``chat`` picks chat completion shapes over text ones."""

    def __init__(self, job: Job, model: str, *, chat: bool):
        self.job, self.model, self.chat = job, model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = {row.index: "" for row in job.rows}
        self.finished: dict[int, Finished] = {}
        self.records: list[dict] = []

    def add(self, item: Item) -> None:
        """Keep what a whole (not streamed) response needs."""
        if isinstance(item, Delta):
            self.texts[item.index] += item.text
        elif isinstance(item, Finished):
            self.finished[item.index] = item
        elif isinstance(item, Record):
            self.records.append({"index": item.index, "event": item.event})

    def usage(self) -> dict:
        """The answer agent's final turn: its prompt tokens once per prompt, the tokens it generated for
        every choice."""
        choices = len(self.job.rows) // self.job.prompts  # choice i of prompt p has index p * choices + i
        prompt = sum({index // choices: f.prompt_tokens for index, f in self.finished.items()}.values())
        completion = sum(f.completion_tokens for f in self.finished.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        """The response to a request without ``stream``."""
        choices = []
        for index in sorted(self.texts):
            choice: dict[str, Any] = {"index": index, "logprobs": None,
                                      "finish_reason": self.finished[index].finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": self.texts[index]}
            else:
                choice["text"] = self.texts[index]
            choices.append(choice)
        body = self._head(whole=True) | {"choices": choices, "usage": self.usage()}
        if self.job.events:
            body["latentgraph"] = {"events": self.records}
        return body

    def _head(self, *, whole: bool) -> dict:
        kind = ("chat.completion" if whole else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(self, choices: list[dict], **extra: Any) -> bytes:
        """A streamed chunk; with ``include_usage`` every chunk has ``usage`` (null but in the last)."""
        body = self._head(whole=False) | {"choices": choices}
        if self.job.include_usage:
            body["usage"] = None
        return sse(body | extra)

    def opening(self) -> list[bytes]:
        """A chat stream's first chunks: the assistant's role, for every choice."""
        if not self.chat:
            return []
        return [self.chunk([{"index": row.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for row in self.job.rows]

    def streamed(self, item: Item) -> bytes | None:
        """The chunk that carries ``item``, if any."""
        if isinstance(item, Record):
            return self.chunk([], latentgraph={"index": item.index, "event": item.event})
        if isinstance(item, Delta):
            return self.chunk([self._choice(item.index, item.text, None)])
        if isinstance(item, Finished):
            self.finished[item.index] = item
            return self.chunk([self._choice(item.index, None, item.finish_reason)])
        return None

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def closing(self) -> list[bytes]:
        """The usage chunk when asked for, then ``[DONE]``."""
        usage = [self.chunk([], usage=self.usage())] if self.job.include_usage else []
        return [*usage, DONE]
