"""`genflow serve`: registered models served over HTTP on onnxruntime, following their registry alias.

    app.py       FastAPI routes, error bodies, the lifespan that runs the poller; serve() runs uvicorn
    models.py    the served-model table, loading a version, its smoke check, the pinned-version LRU
    follow.py    the registry poller: alias moves -> download, smoke check, atomic swap; outages
    queue.py     a bounded queue per model and its worker (micro-batches diffusion requests)
    generate.py  request schemas, their checks against a model, running them (PNG / text out)
    shadow.py    --shadow: the challenger on a sample of requests (latency, cross-likelihoods)
    metrics.py   Prometheus metrics

No PyTorch anywhere here: the engines of components/inference/ run the graphs. Import the
modules themselves (FastAPI loads only when app.py is imported).
"""
