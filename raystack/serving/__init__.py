"""Serving: the Router ingress, the LLMServer deployment and the OpenAI wire protocol."""
