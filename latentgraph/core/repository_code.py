"""latentgraph never runs code from a backbone's repository.

A model repo may name Python files of its own (``auto_map`` in ``config.json`` or ``tokenizer_config.json``)
for an architecture transformers does not implement. Left to decide, transformers would ask "Do you wish to
run the custom code? [y/N]" on the terminal, and run the file on ``y``. Every transformers loader
latentgraph calls gets ``trust_remote_code=False`` instead, so nothing asks and nothing runs: transformers
raises a ``ValueError``, which the functions here explain, for a
:class:`~latentgraph.errors.CheckpointError` that names the backbone and the files and says what to do (a
backbone transformers implements, or the model loaded by the user and passed in). They also explain the
other ``ValueError`` of a model folder, a ``config.json`` without a model type transformers knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.auto.tokenization_auto import get_tokenizer_config

LOAD_IT_YOURSELF = (
    "Use a backbone whose architecture transformers implements; or, if you trust that code, load the model and "
    "its tokenizer yourself (transformers' from_pretrained with trust_remote_code=True) and pass both as the "
    "agent's backbone: Agent(name, model, tokenizer=tokenizer), or System.from_pretrained(directory, "
    "backbones={agent: (model, tokenizer)})"
)


def config_problem(source: str, revision: str | None, error: ValueError) -> str:
    """Why transformers could not build ``source``'s config (``error``, from ``AutoConfig``)."""
    try:
        fields, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError):
        fields = {}
    model_type = fields.get("model_type")
    if model_type in CONFIG_MAPPING:  # a type transformers knows, with values its config class rejects
        return (f"backbone {source!r}: transformers cannot read its config.json ({error}); fix the file, or pass "
                "the folder the model's save_pretrained wrote")
    code = _code_files(fields.get("auto_map"), "AutoConfig")
    if code:
        return _needs_code(source, code, "config.json", f"model type {model_type!r}")
    if not fields and Path(source).is_dir() and not (Path(source) / "config.json").exists():
        return (f"backbone directory {source!r} has no config.json, so it is no model folder transformers can "
                "load: pass the folder the model's save_pretrained wrote (config.json, weights and tokenizer "
                "files), a hub id, or a loaded model")
    if model_type is None:
        return (f"backbone {source!r}: its config.json has no model_type, so transformers cannot tell which "
                "architecture to load; pass the folder the model's save_pretrained wrote (its config.json names "
                "the model_type)")
    return (f"backbone {source!r} is of model type {model_type!r}, which transformers {transformers.__version__} "
            "does not implement: upgrade transformers if the model is newer than it, or use a backbone of an "
            "architecture it implements")


def model_problem(source: str, config: PretrainedConfig) -> str | None:
    """Why transformers could not load ``source`` (of ``config``) as a causal LM, or None when the reason is
    neither repository code nor the kind of model."""
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    code = _code_files(getattr(config, "auto_map", None), "AutoModelForCausalLM")
    if code:
        return _needs_code(source, code, "config.json", f"causal LM of model type {config.model_type!r}")
    return (f"backbone {source!r} is a {config.model_type!r} model, which transformers does not load as a causal "
            "language model (AutoModelForCausalLM): an agent's backbone must be one")


def tokenizer_problem(source: str, revision: str | None, config: PretrainedConfig, error: ValueError) -> str:
    """Why transformers could not load ``source``'s tokenizer (``error``, from ``AutoTokenizer``)."""
    try:
        fields = get_tokenizer_config(source, revision=revision)
    except (OSError, ValueError):
        fields = {}
    code = (_code_files(fields.get("auto_map"), "AutoTokenizer")
            or _code_files(getattr(config, "auto_map", None), "AutoTokenizer"))
    if code:
        return _needs_code(source, code, "tokenizer_config.json", f"tokenizer {fields.get('tokenizer_class')!r}")
    return (f"backbone {source!r}: transformers cannot load its tokenizer ({error}); pass the folder the model's "
            "and its tokenizer's save_pretrained wrote, or pass tokenizer= yourself")


def _needs_code(source: str, files: list[str], named_in: str, what: str) -> str:
    return (f"backbone {source!r} needs code from its repository to load: transformers has no {what} of its own, "
            f"and its {named_in} points to {', '.join(files)} (auto_map). latentgraph never runs repository code. "
            f"{LOAD_IT_YOURSELF}")


def _code_files(auto_map: Any, auto_class: str) -> list[str]:
    """The Python files ``auto_map`` names for ``auto_class`` (``"module.Class"``, ``"repo--module.Class"``,
    or a ``[slow, fast]`` pair of those for tokenizers; older tokenizer configs hold the pair alone)."""
    if isinstance(auto_map, (list, tuple)) and auto_class == "AutoTokenizer":
        references = auto_map
    elif isinstance(auto_map, dict):
        references = auto_map.get(auto_class)
    else:
        return []
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, (list, tuple)):
        return []
    files = []
    for reference in references:
        if isinstance(reference, str) and "." in reference:
            repo, _, module = reference.rpartition("--")
            file = module.rsplit(".", 1)[0].replace(".", "/") + ".py"
            files.append(f"{file} of {repo}" if repo else file)
    return sorted(set(files))
