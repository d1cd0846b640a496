"""Importing goclaw (and then LiteLLM) must not reach the network."""

from __future__ import annotations

import os
import subprocess
import sys


def test_importing_goclaw_switches_off_litellms_cost_map_download():
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    code = (
        "import os, goclaw; "
        "assert os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] == 'True'; "
        "import goclaw.bench_agent as b; b._import_litellm()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to fetch remote model cost map" not in result.stderr
