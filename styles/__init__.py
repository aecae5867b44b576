"""The styles: the published RecursiveMAS systems, and training-free ones, each a small graph built with
latentgraph's public API.

A published style module defines:

- ``CHECKPOINTS``: each role's published hub repo (a full base model plus its inner links), and under
  ``"links"`` the repo of the style's outer links;
- ``LEGACY_KEYS``: the published name of each outer link (``outer_12``, ...) and the edge it sits on;
- ``build(backbones, task="math")``: the :class:`latentgraph.System`, given a backbone for each role.

A training-free style module has no checkpoint: it defines ``ROLES``, ``build(backbones, task="math")`` and
``build_default(backbones=None, task="math", *, fit=True, ...)``, which builds it on the embedded backbone and
fits its links in closed form.

Load one with ``latentgraph.load_style(name)``; list them with ``latentgraph.list_styles()``.
"""

PUBLISHED = ("sequential_light", "sequential_scaled", "mixture", "distillation", "deliberation")
TRAINING_FREE = ("latent_mas",)
STYLES = PUBLISHED + TRAINING_FREE
