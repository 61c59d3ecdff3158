"""OmniNode: one GGUF model split across several devices, pipeline-parallel.

Kept empty on purpose: `llm` imports the plugin module at start-up, so nothing heavy (MLX,
NumPy, the GGUF reader) may be imported here.
"""

import logging

__version__ = "0.1.0"

# a library's logs go where its host sends them (the shim configures logging); in `llm`, which
# configures none, they would otherwise reach stderr through logging's last resort
logging.getLogger(__name__).addHandler(logging.NullHandler())
