"""An OpenAI-compatible HTTP server per instance (FastAPI + uvicorn), and a helper that runs one."""
