"""The replica process: LLMServer, the Serve deployment that owns one engine instance and answers the
requests the router sends it."""
