"""Small systems shared by the tests."""

import json

import latentgraph as lg

QUESTIONS = ["What is 17 * 23?", "Natalia sold clips to 48 of her friends in April. How many in May?",
             "Why?"]


def sequential(tiny, archs=("qwen3", "llama", "gemma3_text"), sizes=(64, 48, 32), steps=(3, 4, 2)):
    """planner -> critic -> solver, with solver -> planner feedback."""
    models = [tiny(arch, size, seed=i) for i, (arch, size) in enumerate(zip(archs, sizes))]
    prompts = ["Plan how to solve: {question}", "Plan: {planner}\nRefine it for: {question}",
               "Plan: {critic}\n{question}\nAnswer in \\boxed{{}}."]
    agents = [lg.Agent(name, model, tokenizer=tok, prompt=prompt, latent_steps=m)
              for name, (model, tok), prompt, m in zip(["planner", "critic", "solver"], models, prompts, steps)]
    agents[0].feedback_prompt = "Feedback: {feedback}\nImprove your plan for: {question}"
    system = lg.System(agents, rounds=3, answer="solver")
    system.connect("planner", "critic").connect("critic", "solver")
    system.connect("solver", "planner", slot="feedback", feedback=True)
    return system


def save_with_backbone_dirs(system, directory):
    """Save ``system`` with each backbone written to a directory and referenced by its path, as a user's
    system on local checkpoints would be; returns the system's directory."""
    for name, agent in system.agents.items():
        agent.model.save_pretrained(directory / f"backbone-{name}")
        agent.tokenizer.save_pretrained(directory / f"backbone-{name}")
    system.save_pretrained(directory / "system")
    config_path = directory / "system" / "latentgraph_config.json"
    config = json.loads(config_path.read_text())
    for agent in config["agents"]:
        agent["backbone"]["name_or_path"] = str(directory / f"backbone-{agent['name']}")
    config_path.write_text(json.dumps(config))
    return directory / "system"
