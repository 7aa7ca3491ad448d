"""exmyconv: low-bit ExMy floating-point weights for LLM checkpoints."""
__version__ = "0.1.0"
