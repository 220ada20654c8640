"""raystack bench: load-test OpenAI endpoints and compare backends."""
