"""The router process: the OpenAI endpoint (ingress), API keys and their limits, the choice of backend and
replica, and the relay of each answer. It never loads an engine; it reaches LLMServer replicas
(raystack.replica) through Serve handles."""
