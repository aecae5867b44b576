"""latentgraph: multi-agent LLM systems whose agents talk in latent space (RecursiveMAS) as typed graphs.

Agents wrap frozen Hugging Face causal LMs; edges carry small learned links over hidden states; feedback
edges close loops; one engine unrolls any topology for R rounds, for inference and training alike.
"""

from .agent import DEFAULT_SYSTEM_PROMPT, Agent
from .config import AgentConfig, BackboneConfig, EdgeConfig, SystemConfig
from .decode import ToolCall
from .errors import CheckpointError, GraphError, InputError, LatentGraphError, SandboxUnavailable
from .evaluation import evaluate
from .events import AgentStep, RunOutput
from .links import Link, LinkConfig, link_types, register_link
from .published import list_styles, load_style
from .render import render
from .system import Edge, System
from .tools import Tool
from .train_data import TrainExample, load_training_data
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentConfig",
    "BackboneConfig",
    "AgentStep",
    "CheckpointError",
    "DEFAULT_SYSTEM_PROMPT",
    "Edge",
    "EdgeConfig",
    "GraphError",
    "InputError",
    "LatentGraphError",
    "Link",
    "LinkConfig",
    "RunOutput",
    "SandboxUnavailable",
    "System",
    "SystemConfig",
    "Tool",
    "ToolCall",
    "TrainConfig",
    "TrainExample",
    "evaluate",
    "link_types",
    "list_styles",
    "load_style",
    "register_link",
    "render",
    "train",
    "load_training_data",
]
