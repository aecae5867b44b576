"""Absurd sizes are refused where they enter, each with one error that says how to fix it, before anything big
is allocated (latentgraph.core.limits; prompts too long for the context, from their characters).

The absurd cases run in one child process whose address space is capped at 1 GiB above what it holds after its
imports: a regression that allocates fails its case with a MemoryError instead of swapping the machine, and
one that loops is stopped by the timeout."""

import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import latentgraph as lg
from latentgraph import cli
from latentgraph.core.config import LinkConfig
from latentgraph.core.limits import LIMITS, ROUNDS, shown
from latentgraph.testing import tiny_backbone

TESTS = Path(__file__).parent
BIG, HUGE = 10**18, 10**30
TEN_MB = 10_000_000


class Context:
    """What the cases build on: a tiny backbone, a saved tiny system and a scratch folder."""

    def __init__(self, saved: Path, scratch: Path):
        self.saved, self.scratch = saved, scratch
        self.model, self.tokenizer = tiny_backbone("llama", 64)

    def agent(self, name="a", **kwargs):
        return lg.Agent(name, self.model, tokenizer=self.tokenizer, **kwargs)

    def system(self, **agent_kwargs):
        return lg.System([self.agent(**agent_kwargs)])

    def json_file(self, content) -> Path:
        path = self.scratch / f"file-{len(list(self.scratch.iterdir()))}.json"
        path.write_text(json.dumps(content))
        return path

    def system_file(self, suffix=".json", **changes):
        """The saved system's config with ``changes`` (top-level keys; ``link`` goes on the first edge), as a
        .json or .yaml file."""
        config = json.loads((self.saved / "latentgraph_config.json").read_text())
        if "link" in changes:
            config["edges"][0]["link"] = changes.pop("link")
        config.update(changes)
        path = self.scratch / f"system-{len(list(self.scratch.iterdir()))}{suffix}"
        path.write_text(yaml.safe_dump(config) if suffix == ".yaml" else json.dumps(config))
        return path


def with_env(variable, value, build):
    os.environ[variable] = value
    try:
        build()
    finally:
        del os.environ[variable]


def over_edges(c):
    system = lg.System([c.agent("a"), c.agent("b")], answer="b")
    system.connect("a", "b")
    system.connect("b", "a", feedback=True)


def register_low_rank() -> None:
    """A user link type whose config has a size field of its own, ``rank`` (registered in the child process
    only, so that other tests' lists of link types do not see it)."""

    class Rank(LinkConfig):
        rank: int = 8

    @lg.register_link("low_rank_test", config=Rank)
    class LowRankLink(lg.Link):  # x -> up(down(x)) through rank units
        def __init__(self, config):
            super().__init__(config)
            self.down = torch.nn.Linear(config.in_dim, config.rank)
            self.up = torch.nn.Linear(config.rank, config.out_dim)

        def forward(self, x):
            return self.up(self.down(x))


FIX = "raise the limit with the environment variable"

PYTHON_CASES = {  # name: (what raises, error class, what the message says)
    "System(rounds=10**18)": (
        lambda c: lg.System([c.agent()], rounds=BIG), lg.GraphError,
        "rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds: use fewer rounds, or "
        f"{FIX} LATENTGRAPH_MAX_ROUNDS"),
    "system.rounds = 10**30": (
        lambda c: setattr(c.system(), "rounds", HUGE), lg.GraphError,
        "rounds: 1,000,000,000,000,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "run(rounds=10**18)": (
        lambda c: c.system(latent_steps=1).run("Q?", rounds=BIG, max_new_tokens=1), lg.InputError,
        f"rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds: use fewer rounds, or {FIX}"),
    "a system file with rounds 10**18": (
        lambda c: lg.System.from_config(c.system_file(rounds=BIG)), lg.CheckpointError,
        "does not describe a system: rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "a YAML system file with rounds 10**30": (
        lambda c: lg.System.from_config(c.system_file(".yaml", rounds=HUGE)), lg.CheckpointError,
        "does not describe a system: rounds: 1,000,000,000,000,000,000,000,000,000,000 exceeds"),
    "a config dict with rounds 10**18": (
        lambda c: lg.System.from_config({"rounds": BIG, "agents": []}), lg.GraphError,
        "invalid SystemConfig: rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "evaluate(rounds=[1, 10**18])": (
        lambda c: lg.evaluate(c.system(), [], rounds=[1, BIG]), lg.InputError,
        "rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "Agent(latent_steps=10**18)": (
        lambda c: c.agent(latent_steps=BIG), lg.GraphError,
        "agent 'a': latent_steps: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 10,000 latent steps: use "
        f"fewer latent steps, or {FIX} LATENTGRAPH_MAX_LATENT_STEPS"),
    "a system file with latent_steps 10**18": (
        lambda c: lg.System.from_config(c.system_file(agents=[{"name": "a", "backbone": "x", "latent_steps": BIG}])),
        lg.CheckpointError, "agents.0.latent_steps: 1,000,000,000,000,000,000 exceeds latentgraph's limit"),
    "inner link hidden_dim 3e7": (
        lambda c: c.agent(inner_link={"type": "ln_res", "hidden_dim": 30_000_000}), lg.GraphError,
        "agent 'a' inner link: invalid 'ln_res' link config: hidden_dim: 30,000,000 exceeds latentgraph's limit of "
        f"131,072 hidden units: lower hidden_dim, or {FIX} LATENTGRAPH_MAX_LINK_WIDTH"),
    "edge link hidden_dim 10**12": (
        lambda c: lg.System([c.agent("a"), c.agent("b")]).connect("a", "b", link={"type": "mlp", "hidden_dim": 10**12}),
        lg.GraphError, "edge 'a->b': invalid 'mlp' link config: hidden_dim: 1,000,000,000,000 exceeds"),
    "a system file with a link hidden_dim 10**12": (
        lambda c: lg.System.from_config(c.system_file(link={"type": "ln_res", "hidden_dim": 10**12})),
        lg.CheckpointError, "edges.0.link.hidden_dim: 1,000,000,000,000 exceeds latentgraph's limit"),
    "a user link type of 10**11 rank": (
        lambda c: c.agent(inner_link={"type": "low_rank_test", "rank": 10**11}), lg.GraphError,
        f"agent 'a' inner link: this 'low_rank_test' link (64 -> 64) of {(64 + 1 + 64) * 10**11 + 64:,} parameters "
        "exceeds "
        f"latentgraph's limit of 2,147,483,648 parameters per link: lower the link's hidden_dim or pick a smaller "
        f"link type, or {FIX} LATENTGRAPH_MAX_LINK_PARAMETERS"),
    "a system file of 300 agents": (
        lambda c: lg.System.from_config(c.system_file(agents=[{}] * 300)), lg.CheckpointError,
        "does not describe a system: agents: 300 exceeds latentgraph's limit of 256 agents: use fewer agents, or "
        f"{FIX} LATENTGRAPH_MAX_AGENTS"),
    "a system file of 5,000 edges": (
        lambda c: lg.System.from_config(c.system_file(edges=[{}] * 5000)), lg.CheckpointError,
        "does not describe a system: edges: 5,000 exceeds latentgraph's limit of 4,096 edges"),
    "257 agents in a System": (
        lambda c: lg.System([c.agent(f"a{i}") for i in range(257)]), lg.GraphError,
        "cannot add agent 'a256': a system of 257 agents exceeds latentgraph's limit of 256 agents"),
    "more edges than LATENTGRAPH_MAX_EDGES": (
        lambda c: with_env("LATENTGRAPH_MAX_EDGES", "1", lambda: over_edges(c)), lg.GraphError,
        "cannot add edge 'b->a': a system of 2 edges exceeds latentgraph's limit of 1 edges"),
    "a 10 MB question": (
        lambda c: c.system(latent_steps=1).run("x" * TEN_MB, max_new_tokens=1), lg.InputError,
        "agent 'a': question 0 makes a prompt of 10,000,"),
    "a 10 MB system prompt": (
        lambda c: c.system(system_prompt="x" * TEN_MB).run("Q?", max_new_tokens=1), lg.InputError,
        "makes a prompt of 10,000,"),
}

CLI_CASES = {  # name: (the command's arguments, what its one error line says)
    "run --rounds 10**18": (
        lambda c: ["run", "Q?", "--style", str(c.saved), "--rounds", str(BIG)],
        f"--rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds: use fewer rounds, or {FIX}"),
    "run --rounds 10**30": (
        lambda c: ["run", "Q?", "--style", str(c.saved), "--rounds", str(HUGE)],
        "--rounds: 1,000,000,000,000,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "run --latent-steps 10**18": (
        lambda c: ["run", "Q?", "--style", str(c.saved), "--latent-steps", str(BIG)],
        "--latent-steps: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 10,000 latent steps"),
    "eval --rounds 1,10**18": (
        lambda c: ["eval", "--style", str(c.saved), "--dataset", "gsm8k", "--output", str(c.scratch / "out"),
                   "--rounds", f"1,{BIG}"],
        "--rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "run --style a system file with rounds 10**18": (
        lambda c: ["run", "Q?", "--style", str(c.system_file(".yaml", rounds=BIG))],
        "does not describe a system: rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "run --style a system file with rounds 10**30": (
        lambda c: ["run", "Q?", "--style", str(c.system_file(rounds=HUGE))],
        "rounds: 1,000,000,000,000,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "train --config with rounds 10**18": (
        lambda c: ["train", "--style", str(c.saved), "--data", str(c.scratch / "data.jsonl"), "--output",
                   str(c.scratch / "trained"), "--config", str(c.json_file({"rounds": BIG}))],
        "invalid TrainConfig: rounds: 1,000,000,000,000,000,000 exceeds latentgraph's limit of 1,000 rounds"),
    "run --style a system file with a link hidden_dim 3e7": (
        lambda c: ["run", "Q?", "--style", str(c.system_file(link={"type": "ln_res", "hidden_dim": 30_000_000}))],
        "edges.0.link.hidden_dim: 30,000,000 exceeds latentgraph's limit of 131,072 hidden units"),
}


def cap_memory(headroom: int = 2**30) -> None:
    """Cap this process's address space at ``headroom`` bytes above what it holds now."""
    held = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (held + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_cli(args: list[str]) -> dict:
    sys.argv = ["latentgraph", *args]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code or 0
    return {"code": code, "stderr": err.getvalue()}


def child(saved: str, scratch: str) -> None:
    """Run every case under the memory cap; print their outcomes as one JSON line."""
    register_low_rank()
    context = Context(Path(saved), Path(scratch))
    cap_memory()
    outcomes = {}
    for name, (build, _, _) in PYTHON_CASES.items():
        try:
            build(context)
            outcomes[name] = {"error": None}
        except BaseException as e:  # noqa: B036 (a MemoryError, or anything else a regression raises, is reported)
            outcomes[name] = {"error": type(e).__name__, "message": str(e)[:2000]}
    for name, (make_args, _) in CLI_CASES.items():
        outcomes[name] = run_cli(make_args(context))
    print(json.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes(tiny, tmp_path_factory):
    from systems import save_with_backbone_dirs, sequential

    saved = save_with_backbone_dirs(sequential(tiny), tmp_path_factory.mktemp("limits"))
    scratch = tmp_path_factory.mktemp("limits-scratch")
    script = (f"import sys; sys.path[:0] = [{str(TESTS)!r}]; import test_limits; "
              f"test_limits.child({str(saved)!r}, {str(scratch)!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", list(PYTHON_CASES))
def test_an_absurd_size_is_one_error_with_its_fix(case, outcomes):
    _, error, expected = PYTHON_CASES[case]
    outcome = outcomes[case]
    assert outcome["error"] == error.__name__, outcome
    assert expected in outcome["message"], outcome["message"]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_an_absurd_size_on_the_command_line_is_one_error_line(case, outcomes):
    outcome = outcomes[case]
    lines = [line for line in outcome["stderr"].splitlines() if line.strip()]
    assert outcome["code"] == 1, outcome
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome["stderr"]
    assert CLI_CASES[case][1] in lines[0], lines[0]


def agent_on(tiny, **kwargs):
    model, tokenizer = tiny()
    return lg.Agent("a", model, tokenizer=tokenizer, **kwargs)


def test_an_environment_variable_raises_a_limit(tiny, monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_MAX_ROUNDS", "5_000")
    system = lg.System([agent_on(tiny)], rounds=2000)
    assert system.rounds == 2000
    assert system.plan().rounds == 2000
    with pytest.raises(lg.InputError, match="5,001 exceeds latentgraph's limit of 5,000 rounds"):
        system.plan(rounds=5001)


def test_an_environment_variable_lowers_a_limit(tiny, monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_MAX_LATENT_STEPS", "4")
    assert agent_on(tiny, latent_steps=4).latent_steps == 4
    with pytest.raises(lg.GraphError, match="latent_steps: 5 exceeds latentgraph's limit of 4 latent steps"):
        agent_on(tiny, latent_steps=5)


@pytest.mark.parametrize("value", ["lots", "0", "-3", "1e9", "9" * 40])
def test_an_invalid_override_is_an_error_that_names_it(value, tiny, monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_MAX_ROUNDS", value)
    with pytest.raises(lg.GraphError, match=r"rounds: the environment variable LATENTGRAPH_MAX_ROUNDS is .*, not a "
                                            r"whole number >= 1: set it to the most rounds to allow \(the default is "
                                            r"1,000\), or unset it"):
        lg.System([agent_on(tiny)], rounds=3)


def test_an_empty_override_is_no_override(monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_MAX_ROUNDS", " ")
    assert ROUNDS.value() == 1000


def test_every_limit_is_documented_with_its_variable_and_default():
    page = (TESTS.parent / "docs" / "concepts.md").read_text()
    for limit in LIMITS:
        assert f"`{limit.variable}`" in page and f"{limit.default:,}" in page, limit


def test_a_number_too_long_to_print_is_shown_by_its_magnitude():
    assert shown(1234) == "1,234"
    assert shown(10**5000) == "about 10^5000"  # str() of it would raise: over 4,300 digits
    assert ROUNDS.problem(10**5000).startswith("about 10^5000 exceeds latentgraph's limit of 1,000 rounds")
    assert ROUNDS.problem(1000) is None


def test_no_text_has_fewer_tokens_than_its_characters_over_the_longest_token(tiny):
    backbone = agent_on(tiny).backbone
    vocabulary = backbone.tokenizer.get_vocab()
    assert backbone.longest_token == max(map(len, vocabulary))
    widest = backbone.tokenizer.convert_tokens_to_string([max(vocabulary, key=len)])
    for text in [widest * 50, "What is 17 * 23? " * 40, " \n\t" * 100, "é漢😀" * 30, "<|im_start|>x" * 20]:
        tokens = len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens >= math.ceil(len(text) / backbone.longest_token), text


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(tiny, monkeypatch):
    system = lg.System([agent_on(tiny, latent_steps=1)])
    agent = system.agents["a"]
    question = "x" * 7000
    rendered = agent.render([question], agent.template(feedback=False), {})[0]
    characters = sum(map(len, rendered))
    needed = math.ceil(characters / agent.backbone.longest_token) + 1  # + the one token it may speak
    monkeypatch.setattr(lg.Agent, "tokenize", lambda *args: pytest.fail("tokenized a prompt that cannot fit"))
    with pytest.raises(lg.InputError, match=f"agent 'a': question 1 makes a prompt of {characters:,} characters, "
                                            f"which needs at least {needed:,} positions .* but its backbone has 512"):
        system.run(["Q?", question], max_new_tokens=1)


def test_a_prompt_within_the_character_bound_is_still_counted_in_tokens(tiny):
    system = lg.System([agent_on(tiny, latent_steps=1)])
    question = "x" * 2000  # 2,000 tokens (no merge of x's), but 2,000 / longest_token characters' worth
    assert len(system.agents["a"].tokenizer(question, add_special_tokens=False)["input_ids"]) == 2000
    with pytest.raises(lg.InputError, match=r"agent 'a': question 0 needs \d+ positions .* has 512; shorten"):
        system.run(question, max_new_tokens=1)
