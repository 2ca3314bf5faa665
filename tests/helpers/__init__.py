"""What tests share: starting the stack in process, running tools as a user
would, reading SSE and grpcurl output, the real PostgreSQL and Redis, API-key
callers, a fake Ollama and a headless browser. Fixtures live in conftest.py;
everything a test imports lives here."""
