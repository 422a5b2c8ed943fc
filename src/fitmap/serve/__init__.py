"""``fitmap serve``: an OpenAI-compatible server on the placed model.

``placement`` chooses one split copy or k replicas from the workload; ``engine`` loads
each replica once (fitmap's loader) and runs its requests; ``app`` is the HTTP API
(FastAPI + uvicorn; ``pip install -e ".[serve]"``).
"""
