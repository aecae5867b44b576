"""Agents: the nodes of a system. An agent is a frozen backbone, its prompts, and its inner link."""

from __future__ import annotations

import re
from collections.abc import Container, Generator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..errors import CheckpointError, GraphError, InputError
from ..tools.base import Tool
from .backbone import Backbone, get_backbone
from .config import DEFAULT_SYSTEM_PROMPT, AgentConfig, BackboneConfig
from .detokenize import Decoded
from .limits import LATENT_STEPS
from .links import config_of, make_link
from .messages import Encoded, Message
from .prompt import PromptTemplate, marker, render_chat, scrub, split_at_markers
from .sampling import Sampling
from .speak import Generation, generate
from .think import Thoughts, latent_rollout

if TYPE_CHECKING:
    from .forward import KVPrefix


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(name: Any, what: str) -> str:
    if not (isinstance(name, str) and name.isidentifier()):
        raise GraphError(f"{what} name {name!r} is not a Python identifier; use letters, digits and '_'")
    return name


def check_tools(tools: Sequence[Tool], agent: str) -> list[Tool]:
    """The agent's tools, each a :class:`Tool` with its own well-formed tag."""
    if isinstance(tools, Tool):
        tools = [tools]
    seen: dict[str, Tool] = {}
    for tool in tools:
        if not isinstance(tool, Tool):
            raise GraphError(f"agent '{agent}': tools must be latentgraph.Tool instances, got {tool!r}")
        tag = tool.tag.lower() if isinstance(tool.tag, str) else ""
        if not re.fullmatch(r"[a-z][a-z0-9_.-]*", tag) or tag == "result":
            raise GraphError(f"agent '{agent}': tool {tool!r} has tag {tool.tag!r}; a tag is a word like 'python' "
                             "(letters, digits, '_', '.', '-'), and 'result' is taken by the results")
        if tag in seen:
            raise GraphError(f"agent '{agent}': tools {seen[tag]!r} and {tool!r} share the tag <{tag}>; "
                             "give one of them another tag")
        seen[tag] = tool
    return list(seen.values())


class Agent(nn.Module):
    """A node of a system: a frozen causal LM, its prompts and its inner link.

    Args:
        name: identifier of the agent; also the default slot name of its outgoing edges.
        backbone: a hub id, a local directory, or a loaded ``PreTrainedModel`` (then pass ``tokenizer``).
        prompt: user prompt; ``{question}`` is the task, every other ``{name}`` the slot of an incoming
            edge. Literal braces are written ``{{`` and ``}}``.
        feedback_prompt: prompt used from round 2 on, when feedback edges deliver; it has the feedback
            slots in addition to the forward ones. Required when the agent receives feedback.
        system_prompt: system message; ``None`` for none.
        latent_steps: ``m``, the number of latent thoughts the agent produces when it thinks.
        inner_link: a registered link type name, a :class:`~latentgraph.LinkConfig` (or dict), or a module.
        tokenizer: the tokenizer, when ``backbone`` is a loaded model (or to override the saved one).
        revision: hub revision of the backbone.
        device: where the backbone runs (default: CUDA when available, else CPU).
        dtype: backbone dtype (default: bf16 on GPUs that support it, fp32 on CPU). Links stay fp32.
        device_map: instead of ``device``, spread a backbone too big for one device over several GPUs, with
            CPU or disk offload, as transformers' ``from_pretrained(device_map=...)`` does (it needs
            accelerate): ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a
            ``{module: device}`` dict such as ``{"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}``
            (devices: a GPU index, ``"cuda:1"``, ``"cpu"`` or ``"disk"``). The inner link and the incoming
            outer links sit where the input embeddings run (``agent.backbone.device``).
        max_memory: with ``device_map``, the most each device may hold, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        offload_folder: with ``device_map``, where weights offloaded to disk go.
        tools: the :class:`~latentgraph.Tool` objects the agent may call while it speaks (it writes
            ``<tag>input</tag>`` and reads the answer in ``<result>…</result>``). Tools are code, not weights: a
            saved system does not keep them.
        max_tool_calls: most tool calls per question each time the agent speaks; later calls get an error note.
    """

    def __init__(self, name: str, backbone: str | Path | PreTrainedModel | Backbone, prompt: str = "{question}",
                 *, feedback_prompt: str | None = None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 latent_steps: int = 32, inner_link: Any = "ln_res", tokenizer: Any = None,
                 revision: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
                 max_memory: dict | None = None, offload_folder: str | Path | None = None,
                 tools: Sequence[Tool] = (), max_tool_calls: int = 5):
        super().__init__()
        self.name = check_name(name, "agent")
        self.latent_steps = latent_steps
        self.tools = tools
        if not (_is_int(max_tool_calls) and max_tool_calls >= 0):
            raise GraphError(f"agent '{name}': max_tool_calls must be an integer >= 0, got {max_tool_calls!r}")
        self.max_tool_calls = max_tool_calls
        self.system_prompt = system_prompt
        self.prompt = prompt
        self.feedback_prompt = feedback_prompt
        try:
            self.backbone = get_backbone(backbone, tokenizer=tokenizer, revision=revision, device=device,
                                         dtype=dtype, device_map=device_map, max_memory=max_memory,
                                         offload_folder=offload_folder)
        except (CheckpointError, InputError) as e:
            raise type(e)(f"agent '{name}': {e}") from None
        width = self.backbone.hidden_size
        self.inner_link = make_link(inner_link, role="inner", in_dim=width, out_dim=width,
                                    where=f"agent '{name}' inner link")

    @property
    def config(self) -> AgentConfig:
        """The agent as data: what ``latentgraph_config.json`` stores for it (tools are code and are not
        part of it)."""
        return AgentConfig(name=self.name, backbone=BackboneConfig(name_or_path=str(self.backbone.name_or_path),
                                                                   revision=self.backbone.revision),
                           prompt=self.prompt, feedback_prompt=self.feedback_prompt, system_prompt=self.system_prompt,
                           latent_steps=self.latent_steps,
                           inner_link=config_of(self.inner_link, f"agent '{self.name}' inner link"))

    @classmethod
    def from_config(cls, config: AgentConfig, backbone: Any = None, **kwargs: Any) -> Agent:
        """Build the agent ``config`` describes.

        Args:
            config: an :class:`~latentgraph.AgentConfig` (or a dict of its fields).
            backbone: instead of the config's backbone: a hub id, a directory, a loaded model, a
                ``(model, tokenizer)`` pair or a ``Backbone``.
            kwargs: further :class:`Agent` arguments (``device``, ``dtype``, ``device_map``, ``tools``, ...).
        """
        if isinstance(config, dict):
            config = AgentConfig(**config)
        if not isinstance(config, AgentConfig):
            raise GraphError(f"Agent.from_config takes an AgentConfig, got {config!r}")
        if backbone is None:
            source, tokenizer, revision = config.backbone.name_or_path, None, config.backbone.revision
        elif isinstance(backbone, tuple):
            (source, tokenizer), revision = backbone, None
        else:
            source, tokenizer, revision = backbone, None, None
        return cls(config.name, source, config.prompt, feedback_prompt=config.feedback_prompt,
                   system_prompt=config.system_prompt, latent_steps=config.latent_steps,
                   inner_link=config.inner_link, tokenizer=tokenizer, revision=revision, **kwargs)

    @property
    def latent_steps(self) -> int:
        return self._latent_steps

    @latent_steps.setter
    def latent_steps(self, value: int) -> None:
        if not (_is_int(value) and value >= 0):
            raise GraphError(f"agent '{self.name}': latent_steps must be an integer >= 0, got {value!r}")
        if problem := LATENT_STEPS.problem(value):
            raise GraphError(f"agent '{self.name}': latent_steps: {problem}")
        self._latent_steps = value

    @property
    def prompt(self) -> str:
        return self._prompt.text

    @prompt.setter
    def prompt(self, text: str) -> None:
        self._prompt = self._template(text, "prompt")

    @property
    def feedback_prompt(self) -> str | None:
        return self._feedback_prompt.text if self._feedback_prompt else None

    @feedback_prompt.setter
    def feedback_prompt(self, text: str | None) -> None:
        self._feedback_prompt = self._template(text, "feedback_prompt") if text is not None else None

    def _template(self, text: str, field: str) -> PromptTemplate:
        if not isinstance(text, str):
            raise GraphError(f"agent '{self.name}': {field} must be a string, got {text!r}")
        try:
            return PromptTemplate(text)
        except GraphError as e:
            raise GraphError(f"agent '{self.name}' {field}: {e}") from None

    @property
    def tools(self) -> list[Tool]:
        return self._tools

    @tools.setter
    def tools(self, tools: Sequence[Tool]) -> None:
        self._tools = check_tools(tools, self.name)

    def template(self, feedback: bool) -> PromptTemplate:
        return self._feedback_prompt if feedback else self._prompt

    @property
    def model(self) -> PreTrainedModel:
        """The Hugging Face model (loaded on first use)."""
        return self.backbone.model

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def extra_repr(self) -> str:
        tools = f", tools={[t.tag for t in self.tools]}" if self.tools else ""
        return f"name={self.name!r}, backbone={self.backbone.name_or_path!r}, latent_steps={self.latent_steps}{tools}"

    def render(self, questions: list[str], template: PromptTemplate,
               messages: dict[str, Message]) -> list[list[str | tuple[str]]]:
        """Each row's rendered prompt, split into text segments and ``(slot,)`` latent positions."""
        rows = []
        for i, question in enumerate(questions):  # a slot whose message does not reach a row is empty there
            latent_slots = [s for s in template.slots if messages[s].latent is not None and messages[s].reaches(i)]
            values = {s: marker(s) if s in latent_slots else scrub(messages[s].text[i] if messages[s].text else "")
                      for s in template.slots}
            user = template.fill(scrub(question), values)
            rows.append(split_at_markers(render_chat(self.tokenizer, self.system_prompt, user), latent_slots))
        return rows

    def tokenize(self, rows: list[list[str | tuple[str]]]) -> list[list[list[int] | tuple[str]]]:
        """Tokenize the text segments of rendered rows, each on its own and without special tokens."""
        segments = [p for row in rows for p in row if isinstance(p, str)]
        ids = iter(self.tokenizer(segments, add_special_tokens=False)["input_ids"]) if segments else iter(())
        return [[next(ids) if isinstance(p, str) else p for p in row] for row in rows]

    def encode(self, questions: list[str], template: PromptTemplate, messages: dict[str, Message],
               prefix: KVPrefix | None = None) -> Encoded:
        """Assemble a left-padded batch of prompt embeddings with the latent messages spliced in; ``prefix``: the
        KV cache the prompt continues."""
        rows = self.tokenize(self.render(questions, template, messages))
        device, dtype = self.backbone.device, self.backbone.dtype  # the embeddings' device, even when offloaded
        ids = [p for row in rows for p in row if not isinstance(p, tuple)]
        flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long, device=device)
        token_embeds = iter(self.backbone.embed(flat).split([len(x) for x in ids]))  # (n_i, H) per segment
        sequences, text_tokens = [], []
        for i, row in enumerate(rows):
            parts = [messages[p[0]].latent[i].to(device, dtype) if isinstance(p, tuple) else next(token_embeds)
                     for p in row]
            sequences.append(torch.cat(parts))  # (L_i, H)
            text_tokens.append(sum(len(p) for p in row if not isinstance(p, tuple)))
        length = max(len(s) for s in sequences)
        embeds = torch.stack([F.pad(s, (0, 0, length - len(s), 0)) for s in sequences])  # (B, L, H), left-padded
        mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long, device=device), (length - len(s), 0))
                            for s in sequences])  # (B, L)
        return Encoded(embeds=embeds, mask=mask, text_tokens=text_tokens,
                       prefix=None if prefix is None else prefix.to(device))

    def think(self, prompt: Encoded, *, use_cache: bool = True, grad_steps: int | None = None,
              keep_cache: bool = False) -> Thoughts:
        """Latent rollout of ``latent_steps`` steps (see :func:`~latentgraph.core.think.latent_rollout`);
        ``keep_cache``: the thoughts keep the KV cache they end with (for outgoing KV edges)."""
        return latent_rollout(self.backbone, self.inner_link, prompt.embeds, prompt.mask, self.latent_steps,
                              use_cache=use_cache, grad_steps=grad_steps, prefix=prompt.prefix, keep_cache=keep_cache)

    def speak(self, prompt: Encoded, sampling: Sampling | Sequence[Sampling],
              generators: Sequence[torch.Generator | None] | None = None, *, cancelled: Container[int] = ()
              ) -> Generator[Decoded, None, list[Generation]]:
        """Decode text, calling the agent's tools when it writes their tags: a generator that yields each
        step's new text per row and returns one :class:`Generation` per row. ``sampling``: one for every row or
        one per row; ``generators``: one per row; ``cancelled``: rows to end (see
        :func:`~latentgraph.core.speak.generate`; ``run_to_end(agent.speak(...))`` gives just the rows)."""
        return generate(self.backbone, prompt.embeds, prompt.mask, sampling, generators, tools=self.tools,
                        max_tool_calls=self.max_tool_calls, cancelled=cancelled, prefix=prompt.prefix)
