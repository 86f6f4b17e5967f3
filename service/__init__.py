"""``indexer-search-serve``: an always-on HTTP API and web page over a built index.

One long-running process keeps the live index generation loaded and a Triton
connection open, answers ``POST /v1/identify`` (which track, and where in it,
does this clip come from?), ranks similar tracks (``GET /v1/tracks/{id}/similar``,
``POST /v1/similar``) and lists the catalogue, while new generations
written by ``indexer-client`` or ``indexer-merge`` are swapped in without a
restart (:mod:`.generations`).

Why FastAPI (on Starlette) with uvicorn: it is the Python ecosystem's usual
stack for a JSON API, so operators and contributors know it; it writes the
OpenAPI description from the same typed models that shape the answers; its
ASGI request stream lets an upload be counted against its size cap while it
arrives (:mod:`.upload`), which a WSGI framework buffers first; and uvicorn
serves HTTPS with one flag each for a certificate and a key. The heavy work of
a query -- decoding and Triton requests -- runs in a bounded thread pool, so
the event loop only moves bytes. ``prometheus_client`` renders ``/metrics``
in the format every scraper reads. All four are in the ``[service]`` extra;
the indexer's base install does not need them.

Modules, one job each:

    options.py      ServiceOptions: every default of the service, read by the CLI
    errors.py       ApiError and the mapping of the project's errors to HTTP statuses
    upload.py       the request body (raw or multipart) under a size cap, while streaming
    generations.py  the live index generation: loading off the request path, atomic
                    swaps, reference-counted release of old generations; each
                    generation's track finder
    triton.py       the Triton link: connecting, health checks, query-priority inference
    runtime.py      SearchService: the above joined; identify (and rank a clip's similar
                    tracks) in a thread pool; metrics
    metrics.py      the Prometheus metrics
    models.py       the JSON shapes of the API (OpenAPI schemas)
    v1.py           the /v1 routes (identify, tracks, index)
    similar.py      the /v1 track-similarity routes (tracks/{id}/similar, similar)
    app.py          the FastAPI app: /v1, health, readiness, metrics, the page, errors, auth
    server.py       uvicorn: serving in the foreground or in a thread
    cli.py          indexer-search-serve's arguments
    static/         the web page (one HTML file: no build step, no CDN)
"""
