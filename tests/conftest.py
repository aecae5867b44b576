"""Shared fixtures: tiny random backbones and a simulated hub cache, built once per session; nothing is
downloaded."""

import os
import tempfile
from pathlib import Path

# Before huggingface_hub is imported (it reads these once): the suite never touches the network, and its hub
# cache is a fresh folder that the published_hub fixture fills with the published repos.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="latentgraph-hub-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from latentgraph.testing import ARCHITECTURES, tiny_backbone  # noqa: E402

transformers.logging.set_verbosity_error()
ALL_ARCHS = list(ARCHITECTURES)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(arch, hidden_size, seed=0, chat_template="chatml", init_std=0.02) -> (model, tokenizer)``, cached."""
    made = {}

    def make(arch="llama", hidden_size=64, seed=0, chat_template="chatml", init_std=0.02):
        key = (arch, hidden_size, seed, chat_template, init_std)
        if key not in made:
            made[key] = tiny_backbone(arch, hidden_size, seed=seed, chat_template=chat_template, init_std=init_std)
        return made[key]

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def published_hub():
    """The hub cache (``HF_HUB_CACHE``) holding every published repo of every style; see published_hub.py."""
    from published_hub import PublishedHub

    from latentgraph.checkpoints.published import published_styles

    hub = PublishedHub(Path(os.environ["HF_HUB_CACHE"]))
    for style in published_styles():
        hub.build(style)
    return hub


@pytest.fixture
def saved(tiny, tmp_path):
    """A tiny sequential system saved with its backbones as local directories, as the CLI loads it."""
    from systems import save_with_backbone_dirs, sequential

    return save_with_backbone_dirs(sequential(tiny), tmp_path)
