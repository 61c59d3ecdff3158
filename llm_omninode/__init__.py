"""OmniNode: one GGUF model split across several devices, pipeline-parallel.

Kept empty on purpose: `llm` imports the plugin module at start-up, so nothing heavy (MLX,
NumPy, the GGUF reader) may be imported here.
"""

__version__ = "0.1.0"
