"""A run's events as JSON, one row's view: what a request that asks for ``{"latentgraph": {"events": true}}``
receives. Each record has the event's class name as ``type`` and its ``round``; tensors become their shape
(and a thought its norm), lists per question become the row's value. A ``TokensDecoded`` record carries the
row's new text of that decoding step, and comes only when there is some."""

from __future__ import annotations

from typing import Any

from ..core.events import (
    AgentFinished,
    AgentSpoke,
    AgentStarted,
    AgentThought,
    Event,
    MessageDelivered,
    RoundEnded,
    TokensDecoded,
)


def event_record(event: Event, row: int) -> dict[str, Any] | None:
    """What ``event`` says about row ``row`` of its batch, or None for events that say nothing per row."""
    record: dict[str, Any] = {"type": type(event).__name__, "round": event.round}
    if not _ran_for(event, row):
        return None  # conditional edges routed this row past the agent
    if isinstance(event, AgentStarted):
        record.update(agent=event.agent, prompt=event.prompt)
    elif isinstance(event, AgentThought):
        index = row if event.rows is None else event.rows.index(row)  # a routed turn's thoughts are its rows'
        hidden = event.thoughts.hidden[index].detach().float()
        record.update(agent=event.agent, latent_steps=hidden.shape[0], norm=hidden.norm(dim=-1).mean().item())
    elif isinstance(event, TokensDecoded):
        if not event.texts[row]:
            return None  # nothing new for this row in this step
        record.update(agent=event.agent, text=event.texts[row])
    elif isinstance(event, AgentSpoke):
        record.update(agent=event.agent, text=event.texts[row])
        if event.tokens_out is not None:
            record["tokens_out"] = event.tokens_out[row]
        if event.tool_calls is not None:
            record["tool_calls"] = [{"tool": c.tool, "input": c.input, "output": c.output, "seconds": c.seconds}
                                    for c in event.tool_calls[row]]
    elif isinstance(event, MessageDelivered):
        record.update(edge=event.edge, receiver=event.receiver, slot=event.slot, next_round=event.next_round)
        if event.latent is not None:
            record["latent_shape"] = list(event.latent.shape[1:])
        if event.text is not None:
            record["text"] = event.text[row]
    elif isinstance(event, AgentFinished):
        step = event.step
        record.update(agent=event.agent, tokens_in=step.tokens_in[row], latents_in=step.latents_in,
                      latent_steps=step.latent_shape[1] if step.latent_shape else 0,
                      tokens_out=step.tokens_out[row] if step.tokens_out else 0, seconds=step.seconds)
    elif not isinstance(event, RoundEnded):
        return None
    return record


def _ran_for(event: Event, row: int) -> bool:
    """Whether the agent of an agent's event ran for ``row`` (routing may run it for some rows only)."""
    if isinstance(event, (AgentStarted, AgentThought)):
        return event.rows is None or row in event.rows
    if isinstance(event, AgentFinished):
        return event.step.rows is None or row in event.step.rows
    if isinstance(event, AgentSpoke):
        return event.texts[row] is not None
    return True
