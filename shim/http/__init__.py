"""The shim's HTTP API (Ollama's and OpenAI's), adapters over the node's coordinator.

server.py   aiohttp on the node's loop: listening, the bearer token, JSON bodies and errors
parse.py    request bodies -> the one internal request type (pure)
run.py      one generation: resolve, first chunk, stream; failures -> HTTP statuses
listing.py  the cluster's models as /api/tags, /api/show, /api/ps and /v1/models show them
ollama.py   Ollama's routes;  openai.py   OpenAI's routes (/v1)
"""
