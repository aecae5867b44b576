"""The executor: one loop that unrolls any system for R rounds.

In round r, agents run in topological order of the forward edges. An agent runs if it has an outgoing
forward edge, or an outgoing feedback edge and r < R, or it is the answer node. It reads
``feedback_prompt`` when feedback from round r-1 has arrived, else ``prompt``. It *thinks* (a latent
rollout) when one of its active outgoing edges is latent, and *speaks* (decodes text) when one is a text
edge or when it is the answer node in round R. A link computes each message; the executor delivers it:
forward edges in this round, feedback edges in the next.

Two baselines run on the same graph: ``mode="text"`` treats every edge as a text edge, and
``mode="single"`` runs the answer node alone, once, with its slots empty.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from .agent import Agent, Encoded, Message
from .decode import Sampling, ToolCall
from .errors import InputError
from .links import placement
from .rollout import Thoughts

if TYPE_CHECKING:
    from .system import Edge, System

Mode = Literal["latent", "text", "single"]
MODES = ("latent", "text", "single")


@dataclass
class AgentStep:
    """What one agent did in one round (lists hold one value per question)."""

    round: int
    agent: str
    prompt: str  # "prompt" or "feedback_prompt"
    tokens_in: list[int]  # prompt tokens, latent positions not counted
    latents_in: int  # latent vectors spliced into the prompt
    latent_shape: tuple[int, ...] | None = None  # (B, m, H) of the thoughts, when the agent thought
    latent_norm: float | None = None  # mean L2 norm of the raw hidden states
    tokens_out: list[int] | None = None  # tokens the model generated (end token included), when it spoke
    text: list[str] | None = None  # what it said, tool results included
    tool_calls: list[list[ToolCall]] | None = None  # per question, when the agent has tools and spoke
    seconds: float = 0.0


@dataclass
class RunOutput:
    """The result of :meth:`System.run`."""

    texts: list[str]  # the answer node's final text, one per question
    trace: list[dict[str, AgentStep]] = field(default_factory=list)  # trace[r - 1][agent]
    latents: list[dict[str, torch.Tensor]] | None = None  # latents[r - 1][agent]: (B, m, H), on CPU
    mode: Mode = "latent"  # how it ran: the graph as built, every edge as text, or the answer node alone

    @property
    def seconds(self) -> float:
        return sum(step.seconds for steps in self.trace for step in steps.values())

    @property
    def tokens_out(self) -> int:
        """Every token generated in the run, by every agent."""
        return sum(sum(step.tokens_out or []) for steps in self.trace for step in steps.values())

    def table(self) -> str:
        """The trace as a plain-text table: one line per agent per round, token counts summed over rows."""
        header = ("round", "agent", "prompt", "tokens in", "latents in", "thoughts", "tokens out", "seconds")
        lines = [header]
        for steps in self.trace:
            for s in steps.values():
                lines.append((str(s.round), s.agent, s.prompt, str(sum(s.tokens_in)), str(s.latents_in),
                              "x".join(map(str, s.latent_shape)) if s.latent_shape else "-",
                              str(sum(s.tokens_out)) if s.tokens_out is not None else "-", f"{s.seconds:.3f}"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


@dataclass
class Turn:
    """One agent's part in one round."""

    agent: Agent
    incoming: list[Edge]  # the edges whose messages fill its prompt's slots
    outgoing: list[Edge]  # the edges it sends on this round
    thinks: bool  # an outgoing edge is latent
    speaks: bool  # an outgoing edge is text, or it is the answer node in the last round
    reads_feedback: bool  # feedback from the previous round has arrived: use feedback_prompt


def schedule(system: System, rounds: int, mode: Mode = "latent") -> list[list[Turn]]:
    """The turns of each round, in execution order.

    ``mode="text"`` makes every edge a text edge; ``mode="single"`` is the answer node alone, once, with its
    slots empty.
    """
    if mode == "single":
        return [[Turn(agent=system.agents[system.answer], incoming=[], outgoing=[], thinks=False, speaks=True,
                      reads_feedback=False)]]
    edges = [replace(e, mode="text") if mode == "text" else e for e in system.edges.values()]
    order, plan = system.order(), []
    for r in range(1, rounds + 1):
        last, turns = r == rounds, []
        for name in order:
            outgoing = [e for e in edges if e.src == name and not (e.feedback and last)]
            answers = last and name == system.answer
            if outgoing or answers:
                incoming = [e for e in edges if e.dst == name and (r > 1 or not e.feedback)]
                turns.append(Turn(agent=system.agents[name], incoming=incoming, outgoing=outgoing,
                                  thinks=any(e.mode == "latent" for e in outgoing),
                                  speaks=answers or any(e.mode == "text" for e in outgoing),
                                  reads_feedback=any(e.feedback for e in incoming)))
        plan.append(turns)
    return plan


def execute(system: System, questions: str | list[str], *, rounds: int | None = None, mode: Mode = "latent",
            do_sample: bool = True, temperature: float = 0.6, top_p: float = 0.95, top_k: int | None = None,
            max_new_tokens: int = 256, seed: int | None = None, return_latents: bool = False) -> RunOutput:
    """Run ``system`` on ``questions``; the implementation of :meth:`System.run`."""
    questions = question_list(questions)
    rounds = system.rounds if rounds is None else rounds
    if isinstance(rounds, bool) or not (isinstance(rounds, int) and rounds >= 1):
        raise InputError(f"rounds must be an integer >= 1, got {rounds!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens)
    system.validate()
    plan = schedule(system, rounds, mode)
    _check_lengths(system, plan, questions, sampling)
    with torch.no_grad():
        out = _unroll(system, plan, questions, sampling, seed, return_latents)
    out.mode = mode
    return out


def question_list(questions: str | Sequence[str]) -> list[str]:
    """The batch a run answers: one question, or a list or tuple of them (not a dict, set or generator)."""
    if isinstance(questions, str):
        return [questions]
    if not isinstance(questions, (list, tuple)):
        raise InputError(f"run() takes a question or a list of questions, got {type(questions).__name__}: "
                         f"{questions!r:.80}")
    if not questions:
        raise InputError("run() got no questions; pass a question or a non-empty list of them")
    wrong = [f"{i}: {type(q).__name__}" for i, q in enumerate(questions) if not isinstance(q, str)]
    if wrong:
        raise InputError(f"questions must be strings; these are not: {', '.join(wrong[:5])}")
    return list(questions)


def _check_lengths(system: System, plan: list[list[Turn]], questions: list[str], sampling: Sampling) -> None:
    """Fail before any forward if a prompt plus what is appended to it exceeds a backbone's context."""
    seen = set()
    for turn in (t for turns in plan for t in turns):
        agent = turn.agent
        key = (agent.name, turn.reads_feedback, turn.thinks, turn.speaks)
        if key in seen or agent.backbone.max_positions is None:
            continue
        seen.add(key)
        template = agent.template(turn.reads_feedback)
        incoming = {e.slot: e for e in turn.incoming}
        messages = {s: Message(latent=torch.empty(0)) if s in incoming and incoming[s].mode == "latent" else
                    Message(text=[""] * len(questions)) for s in template.slots}
        extra = sum(system.agents[e.src].latent_steps if e.mode == "latent" else sampling.max_new_tokens
                    for e in incoming.values())
        extra += max(agent.latent_steps if turn.thinks else 0, sampling.max_new_tokens if turn.speaks else 0)
        rows = agent.tokenize(agent.render(questions, template, messages))
        for i, row in enumerate(rows):
            needed = sum(len(p) for p in row if not isinstance(p, tuple)) + extra
            if needed > agent.backbone.max_positions:
                raise InputError(
                    f"agent '{agent.name}': question {i} needs {needed} positions (prompt, incoming messages "
                    f"and its own output) but its backbone has {agent.backbone.max_positions}; shorten the "
                    "question or lower latent_steps / max_new_tokens"
                )


def _unroll(system: System, plan: list[list[Turn]], questions: list[str], sampling: Sampling,
            seed: int | None, return_latents: bool) -> RunOutput:
    system.place_links()
    generators: dict[torch.device, torch.Generator] = {}
    trace: list[dict[str, AgentStep]] = [{} for _ in plan]
    latents = [{} for _ in plan] if return_latents else None
    texts: list[str] = []
    inbox: dict[str, dict[str, Message]] = defaultdict(dict)  # per receiver, per slot
    for r, turns in enumerate(plan, start=1):
        next_inbox: dict[str, dict[str, Message]] = defaultdict(dict)  # feedback, delivered next round
        for turn in turns:
            agent, device = turn.agent, turn.agent.backbone.device
            if seed is not None and device not in generators:
                generators[device] = torch.Generator(device=device).manual_seed(seed)
            blank = Message(text=[""] * len(questions))  # slots with no edge: the single-agent baseline
            messages = {s: inbox[agent.name].get(s, blank) for s in agent.template(turn.reads_feedback).slots}
            start = _now(device)
            prompt = agent.encode(questions, agent.template(turn.reads_feedback), messages)
            step = AgentStep(round=r, agent=agent.name,
                             prompt="feedback_prompt" if turn.reads_feedback else "prompt",
                             tokens_in=prompt.text_tokens,
                             latents_in=sum(m.latent.shape[1] for m in messages.values() if m.latent is not None))
            if turn.thinks:
                thoughts = _think(agent, prompt, r)
                step.latent_shape = tuple(thoughts.hidden.shape)
                step.latent_norm = thoughts.hidden.float().norm(dim=-1).mean().item()
                if latents is not None:
                    latents[r - 1][agent.name] = thoughts.hidden.cpu()
            if turn.speaks:
                spoken = agent.speak(prompt, sampling, generators.get(device))
                step.tokens_out = [g.sampled for g in spoken]
                step.text = [t.strip() for t in agent.tokenizer.batch_decode([g.ids for g in spoken],
                                                                             skip_special_tokens=True)]
                if agent.tools:
                    step.tool_calls = [g.calls for g in spoken]
            for edge in turn.outgoing:
                if edge.mode == "text":
                    message = Message(text=step.text)
                else:
                    link = system.links[edge.name]
                    message = Message(latent=link(thoughts.embeds.to(**placement(link))))  # (B, m, d_dst)
                (next_inbox if edge.feedback else inbox)[edge.dst][edge.slot] = message
            if r == len(plan) and agent.name == system.answer:
                texts = step.text
            step.seconds = _now(device) - start
            trace[r - 1][agent.name] = step
        inbox = next_inbox
    return RunOutput(texts=texts, trace=trace, latents=latents)


def _think(agent: Agent, prompt: Encoded, round_: int) -> Thoughts:
    thoughts = agent.think(prompt)
    if not (torch.isfinite(thoughts.hidden).all() and torch.isfinite(thoughts.embeds).all()):
        raise InputError(
            f"agent '{agent.name}' produced non-finite latents (NaN/inf) in round {round_}; check the backbone "
            "dtype (fp16 overflows; use bf16 or fp32) and the inner link weights"
        )
    return thoughts


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
