"""The llm plugin's hooks: models named ``omni/<alias>`` and the ``llm omni`` command group.

Start-up cost matters (this module is imported on every ``llm`` call): registering models reads
one small JSON file, and everything heavy is imported inside the commands and ``execute``.
"""

from __future__ import annotations

import llm

from .home import read_aliases


def _aliases() -> list[str]:
    try:
        return sorted(read_aliases())
    except Exception:  # a broken data dir must never break `llm` itself
        return []


@llm.hookimpl
def register_models(register):
    from .llm_model import AsyncOmniModel, OmniModel

    for alias in _aliases():
        register(OmniModel(alias), AsyncOmniModel(alias))


@llm.hookimpl
def register_embedding_models(register):
    from .llm_embed import OmniEmbeddingModel

    for alias in _aliases():
        register(OmniEmbeddingModel(alias))


@llm.hookimpl
def register_commands(cli):
    from . import cluster_cli
    from .models_cli import omni

    cluster_cli.register(omni)
    cli.add_command(omni)
