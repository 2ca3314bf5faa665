"""What tests share: starting the stack in process, running tools as a user
would, reading SSE and grpcurl output, the real PostgreSQL and Redis, API-key
callers, a fake Ollama, a headless browser, and a task run through the runner
to its end. Fixtures live in conftest.py; everything a test imports lives
here."""
