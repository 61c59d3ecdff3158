"""The shim's HTTP API (Ollama's and OpenAI's), adapters over the node's coordinator.

service.py  ApiService: all the adapters use of the node (the node builds it and hands it over)
server.py   aiohttp on the node's loop: listening, the bearer token, errors as JSON
bodies.py   JSON bodies in (read as hostile input) and out (NDJSON, server-sent events)
parse.py    request bodies -> the one internal request type (pure)
run.py      one generation: resolve, first chunk, stream; failures -> HTTP statuses
listing.py  the cluster's models as /api/tags, /api/show, /api/ps and /v1/models show them
ollama.py   Ollama's routes;  openai.py   OpenAI's routes (/v1)
"""
