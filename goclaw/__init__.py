"""goclaw: a durable orchestration kernel for AI agents.

LiteLLM downloads a model cost map when it is imported unless told not to.
goclaw must never reach the network on import, whichever of its modules (or a
benchmark's direct LiteLLM baseline) imports LiteLLM first, so the package sets
the switch before anything else can. An explicit setting in the environment wins.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
