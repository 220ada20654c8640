"""raystack: Ray-based cluster inference for LLMs on Ascend NPU clusters."""

__version__ = "0.1.0"
