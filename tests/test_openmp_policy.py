"""ggml's OpenMP threads wait asleep unless the user chose otherwise (llm_omninode/backend):
checked in fresh interpreters, since libgomp reads the variables once, when ggml loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = (
    "import os, llm_omninode.backend.ggml_stage; "
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
)


def policy_after_import(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("env", "seen"),
    [
        ({}, "PASSIVE None"),  # before ggml is loaded, so libgomp reads it
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
        ({"GOMP_SPINCOUNT": "20000"}, "None 20000"),
    ],
)
def test_wait_policy(env: dict[str, str], seen: str) -> None:
    assert policy_after_import(**env) == seen
