"""The version is written once, in llm_omninode.__version__, and read from there."""

import asyncio
import json
from importlib.metadata import version

from omninode_shim.http import ollama

import llm_omninode


def test_the_distribution_reads_the_package_version():
    assert version("llm-omninode") == llm_omninode.__version__


def test_api_version_names_it():
    response = asyncio.run(ollama.version(None))
    assert json.loads(response.body)["omninode"] == llm_omninode.__version__
