"""Inference engines behind LLMServer; one module per engine, all speaking engines.base.Engine."""
