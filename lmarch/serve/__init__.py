"""Serving models over HTTP: an OpenAI-compatible API with continuous batching, and a web
playground (``lmarch serve``; see docs/serve.md).

- :mod:`lmarch.serve.engine`: batched decoding over a slotted KV cache (per-row positions);
- :mod:`lmarch.serve.scheduler`: the thread that owns the model, admitting and retiring
  requests between decode steps;
- :mod:`lmarch.serve.app`: the FastAPI routes, errors in OpenAI's shape, body and key checks;
- :mod:`lmarch.serve.server`: running it under uvicorn (foreground or a background thread);
- :mod:`lmarch.serve.state`: loading what is served and the limits it enforces;
- :mod:`lmarch.serve.attention_maps`: attention weights for the playground's view.

The engine and scheduler need only torch; the app and server need fastapi and uvicorn
(``pip install 'lmarch[serve]'``).
"""
