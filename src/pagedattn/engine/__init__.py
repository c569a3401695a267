"""The engine: scheduler, model runner, sampler, and the offline LLM API."""
