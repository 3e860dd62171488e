"""``jointface serve``: the gallery as an HTTP API and a web page (FastAPI, run by uvicorn).

* :mod:`.keys`: API keys (only their sha256 is stored) and the audit log;
* :mod:`.batching`: one engine shared by every request, photos detected together;
* :mod:`.uploads`: upload limits, checked before any pixel is decoded;
* :mod:`.app`: the routes, their errors and the page in ``static/``.
"""
