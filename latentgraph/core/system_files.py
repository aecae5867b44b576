"""A system as data and files: its config, and the checkpoint folder ``save_pretrained`` writes.

:class:`SystemFiles` gives :class:`~latentgraph.System` ``to_config``/``from_config`` (the graph as a
:class:`~latentgraph.core.config.SystemConfig`, or a YAML/JSON file) and ``save_pretrained``/``from_pretrained``/
``push_to_hub`` (the config and the link weights, crash-safe: :mod:`latentgraph.checkpoints.native`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import native
from ..checkpoints.link_dtype import check_link_dtype
from ..errors import CheckpointError, GraphError
from ..files.hub import fetch
from ..version import __version__
from .agent import Agent
from .config import (
    CONFIG_NAME,
    CONFIG_SUFFIXES,
    FORMAT_VERSION,
    EdgeConfig,
    LinkConfig,
    SubsystemConfig,
    SystemConfig,
    read_config,
)
from .links import config_of

if TYPE_CHECKING:
    from typing_extensions import Self


class SystemFiles:
    """A :class:`~latentgraph.System` as data and files (a mixin: the system's graph lives in ``system.py``)."""

    def to_config(self) -> SystemConfig:
        """The system as data (a :class:`~latentgraph.SystemConfig`): exactly what ``latentgraph_config.json``
        holds (a nested system as a ``subsystems`` entry holding its own config). Link weights and tools are not
        part of it."""
        return SystemConfig(
            format_version=FORMAT_VERSION, latentgraph_version=__version__, rounds=self.rounds, answer=self.answer,
            agents=[agent.config for agent in self.agents.values()],
            subsystems=[SubsystemConfig(name=name, entry=list(sub.entry), rounds=sub.rounds,
                                        system=sub.system.to_config()) for name, sub in self.subsystems.items()],
            edges=[EdgeConfig(src=e.src, dst=e.dst, slot=e.slot, mode=e.mode, feedback=e.feedback,
                              link=self._link_config(e.name) if e.kind.carries_link else None, when=e.when,
                              **e.kind.options())
                   for e in self.edges.values()])

    def _link_config(self, edge: str) -> LinkConfig:
        """An edge's link config; into a nested system, the one config all its entries' links share."""
        link = self.links[edge]
        if edge.split("->")[1] not in self.subsystems:
            return config_of(link, f"edge '{edge}' link")
        configs = {entry: config_of(module, f"edge '{edge}' link to entry '{entry}'") for entry, module in link.items()}
        if len({c.model_dump_json() for c in configs.values()}) > 1:
            raise GraphError(f"edge '{edge}': its entries' links have different configs ({configs}), which one "
                             "edge config cannot describe; give them the same link type and settings")
        return next(iter(configs.values()))

    @classmethod
    def from_config(cls, config: SystemConfig | dict | str | Path, *, backbones: dict[str, Any] | None = None,
                    device: Any = None, dtype: Any = None, device_map: Any = None, max_memory: Any = None,
                    offload_folder: Any = None) -> Self:
        """Build the system a config describes, with freshly initialised links.

        Args:
            config: a :class:`~latentgraph.SystemConfig`, a dict of its fields, or a ``.json``/``.yaml``/``.yml``
                file holding one (a system declared in a file).
            backbones: ``{agent: backbone}`` to use instead of the config's: a hub id, a directory, a
                ``(model, tokenizer)`` pair or a ``Backbone``.
            device: where the backbones run; dtype: their dtype.
            device_map, max_memory, offload_folder: instead of ``device``, spread each backbone over several
                GPUs with CPU or disk offload (see :class:`~latentgraph.Agent`). Placement is not part of the
                config: pass it again on every load.
        """
        if isinstance(config, (str, Path)):
            if Path(config).suffix.lower() not in CONFIG_SUFFIXES:
                raise GraphError(f"{config} is not a system config file ({', '.join(CONFIG_SUFFIXES)}); to load a "
                                 "directory written by save_pretrained, use System.from_pretrained")
            config = read_config(Path(config))
        elif isinstance(config, dict):
            config = SystemConfig(**config)
        elif not isinstance(config, SystemConfig):
            raise GraphError(f"System.from_config takes a SystemConfig, a dict or a file path, got {config!r}")
        backbones = backbones or {}
        names = agent_names(config)
        for name in backbones:
            if name not in names:
                raise GraphError(f"backbones= names agent '{name}', which the config does not have; agents: {names}")
        placement = {"device": device, "dtype": dtype, "device_map": device_map, "max_memory": max_memory,
                     "offload_folder": offload_folder}
        return cls._build(config, backbones, placement).validate()

    @classmethod
    def _build(cls, config: SystemConfig, backbones: dict[str, Any], placement: dict[str, Any]) -> Self:
        """The system ``config`` describes, unvalidated: a nested system is valid only inside its outer one."""
        nested = [cls._build(sub.system, {k.partition(".")[2]: v for k, v in backbones.items()
                                          if k.startswith(f"{sub.name}.")}, placement)
                  .node(sub.name, entry=sub.entry, rounds=sub.rounds) for sub in config.subsystems]
        system = cls([*(Agent.from_config(a, backbones.get(a.name), **placement) for a in config.agents), *nested],
                     rounds=config.rounds, answer=config.answer)
        for e in config.edges:
            system.connect(e.src, e.dst, slot=e.slot, mode=e.mode, feedback=e.feedback, link=e.link, kv=e.kv,
                           when=e.when)
        return system

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the graph (``latentgraph_config.json``, which is :meth:`to_config` as JSON) and the link weights
        (``links.safetensors``).

        Backbones are referenced by ``name_or_path`` and revision, never copied. The save is crash-safe: a
        kill or a full disk leaves the complete old checkpoint or the complete new one, other files in the
        folder are kept, and a failed save raises :class:`~latentgraph.errors.CheckpointError` with the old
        one intact. See :mod:`latentgraph.checkpoints.native`.
        """
        return native.save(directory, self.validate().to_config(), self.link_modules())

    @classmethod
    def from_pretrained(cls, source: str | Path, *, revision: str | None = None,
                        backbones: dict[str, Any] | None = None, device: Any = None, dtype: Any = None,
                        device_map: Any = None, max_memory: Any = None, offload_folder: Any = None,
                        link_dtype: Any = "float32") -> Self:
        """Load a system written by :meth:`save_pretrained`, from a directory or a hub repo.

        Args:
            source: a directory, or a hub repo id (fetched through the hub cache). A path that cannot be a hub
                repo id (absolute, ``./x``, ``~/x``, ``a/b/c``) must name an existing folder.
            revision: hub revision of ``source``.
            backbones: ``{agent: backbone}`` to use instead of the saved references: a hub id, a directory,
                a ``(model, tokenizer)`` pair or a ``Backbone``.
            device: where the backbones run; dtype: their dtype.
            device_map, max_memory, offload_folder: instead of ``device``, spread each backbone over several
                GPUs with CPU or disk offload (see :class:`~latentgraph.Agent`).
            link_dtype: what the links hold their parameters and compute in: ``"float32"`` (default), ``"auto"``
                (the dtype ``links.safetensors`` holds them in: the dtype they had when saved), or another dtype
                (see :mod:`latentgraph.checkpoints.link_dtype`). Like placement, it is not saved.
        """
        link_dtype = check_link_dtype(link_dtype)
        directory = fetch(source, revision=revision)  # a folder a save killed midway left aside is put back
        config = read_config(directory / CONFIG_NAME)
        names = agent_names(config)
        for name in backbones or {}:
            if name not in names:
                raise CheckpointError(f"backbones= names agent '{name}', which {directory} does not have; "
                                      f"agents: {names}")
        system = cls.from_config(config, backbones=backbones, device=device, dtype=dtype, device_map=device_map,
                                 max_memory=max_memory, offload_folder=offload_folder)
        native.load_weights(directory, system.link_modules(), link_dtype=link_dtype)
        return system

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload latentgraph system") -> str:
        """Save the system to a temporary directory and upload it to the hub repo ``repo_id`` (created if
        needed). Returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory)
            return str(api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message))


def agent_names(config: SystemConfig) -> list[str]:
    """Every agent a config describes, a nested system's as ``<node>.<agent>``."""
    return [a.name for a in config.agents] + [f"{sub.name}.{name}" for sub in config.subsystems
                                              for name in agent_names(sub.system)]
