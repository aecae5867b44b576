"""A hub cache holding every published RecursiveMAS repo, in the published layout, on tiny random backbones.

Agent repos: a full base model (config, safetensors weights, tokenizer, chat template, generation config),
``adapter_config.json`` beside it, and inner links as pickled bf16 state dicts: ``adapter(math).pt`` and
``adapter(code).pt`` named by ``innerlink_config.json`` (sequential and distillation agents), or one
``adapter.pt`` (mixture and deliberation). Outer-link repos: one ``.pt`` per edge and an
``outerlink_config.json``, per task (sequential, distillation) or flat (mixture, deliberation).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from latentgraph.checkpoints.published import style_module
from latentgraph.core.links import make_link
from latentgraph.testing import tiny_backbone, tiny_tokenizer

# role -> (architecture, hidden size); "gemma3" and "qwen3_5" are composite (vision + text) checkpoints.
BACKBONES = {
    "sequential_light": {"planner": ("qwen3", 64), "critic": ("llama", 48), "solver": ("qwen2", 32)},
    "sequential_scaled": {"planner": ("gemma3", 40), "critic": ("llama", 48), "solver": ("qwen3_5", 32)},
    "mixture": {"math": ("qwen2", 32), "code": ("qwen2", 48), "science": ("mistral", 64),
                "summarizer": ("qwen3_5_text", 48)},
    "distillation": {"expert": ("qwen3_5_text", 64), "learner": ("qwen3_5_text", 48)},
    "deliberation": {"reflector": ("qwen3_5_text", 48), "toolcaller": ("qwen3_5_text", 48)},
}
PER_TASK = {"sequential_light", "sequential_scaled", "distillation"}  # one inner link per task, scoped manifest
OUTER_FILES = {
    "sequential_light": {"outer_12": "Planner-Critic-Outerlink.pt", "outer_23": "Critic-Solver-Outerlink.pt",
                         "outer_31": "Solver-Planner-Outerlink.pt"},
    "mixture": {f"outer_{i}s": f"{d}-Summarizer-Outerlink.pt" for i, d in zip("123", ("Math", "Code", "Science"))}
    | {f"outer_s{i}": f"Summarizer-{d}-Outerlink.pt" for i, d in zip("123", ("Math", "Code", "Science"))},
    "distillation": {"outer_el": "Expert-Learner-Outerlink.pt", "outer_le": "Learner-Expert-Outerlink.pt"},
    "deliberation": {"outer_rt": "Reflector-Toolcaller-Outerlink.pt", "outer_tr": "Toolcaller-Reflector-Outerlink.pt"},
}
OUTER_FILES["sequential_scaled"] = OUTER_FILES["sequential_light"]


def composite_model(arch: str, hidden: int, tokenizer):
    """A tiny vision+text checkpoint, as the real Gemma 3 and Qwen3.5 repos are."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
    )

    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(hidden)
    if arch == "gemma3":
        text |= dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        return Gemma3ForConditionalGeneration(config)
    text |= dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    return Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))


def random_link_state(role: str, d_in: int, d_out: int, seed: int) -> dict[str, torch.Tensor]:
    """A published-layout ln_res state dict with random bf16 values."""
    link = make_link("ln_res", role=role, in_dim=d_in, out_dim=d_out, where="fixture")
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator).to(torch.bfloat16) for k, v in link.state_dict().items()}


class PublishedHub:
    """Writes the repos into a hub cache directory and remembers every link tensor it wrote."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.inner: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}  # (style, role, task) -> state
        self.outer: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}  # (style, legacy key, task) -> state
        self.seed = 0

    def write_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for name, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))

    def pickled(self, state: dict[str, torch.Tensor]) -> bytes:
        with tempfile.TemporaryFile() as f:
            torch.save(state, f)
            f.seek(0)
            return f.read()

    def build(self, style: str) -> None:
        module = style_module(style)
        widths = {}
        for role, (arch, hidden) in BACKBONES[style].items():
            tokenizer = tiny_tokenizer()
            if arch in ("gemma3", "qwen3_5"):
                model = composite_model(arch, hidden, tokenizer)
            else:
                model, tokenizer = tiny_backbone(arch, hidden, seed=hidden)
            widths[role] = hidden
            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                tokenizer.save_pretrained(directory)
                files = {p.name: p.read_bytes() for p in Path(directory).iterdir()}
            files["adapter_config.json"] = json.dumps({"adapter_type": "ln_res_adapter"}).encode()
            tasks = ("math", "code") if style in PER_TASK else (None,)
            for task in tasks:
                self.seed += 1
                state = random_link_state("inner", hidden, hidden, self.seed)
                files[f"adapter({task}).pt" if task else "adapter.pt"] = self.pickled(state)
                for t in (task,) if task else ("math", "code"):
                    self.inner[(style, role, t)] = state
            if style in PER_TASK:
                files["innerlink_config.json"] = json.dumps(
                    {"tasks": {t: {"adapter.pt": f"adapter({t}).pt"} for t in tasks}}).encode()
            self.write_repo(module.CHECKPOINTS[role], files)

        files, entries = {}, {"math": [], "code": []}
        for key, filename in OUTER_FILES[style].items():
            src, dst = module.LEGACY_KEYS[key]
            for task in ("math", "code") if style in PER_TASK else ("any",):
                self.seed += 1
                state = random_link_state("outer", widths[src], widths[dst], self.seed)
                name = filename if task in ("math", "any") else filename.replace(".pt", "-code.pt")
                files[name] = self.pickled(state)
                for t in ("math", "code") if task == "any" else (task,):
                    self.outer[(style, key, t)] = state
                    entries[t].append({"legacy_key": key, "filename": name})
        if style in PER_TASK:
            manifest = {"tasks": {t: {"adapters": entries[t]} for t in entries}}
        else:
            manifest = {"adapters": entries["math"]}
        files["outerlink_config.json"] = json.dumps(manifest).encode()
        self.write_repo(module.CHECKPOINTS["links"], files)
