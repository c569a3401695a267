"""Entry points: the CLI and the OpenAI-compatible server."""
