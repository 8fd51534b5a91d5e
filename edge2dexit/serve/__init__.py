"""`edge2dexit serve`: a local HTTP service for apps that are not Python, with one engine shared by every client.

- `settings`: every default of the service, in one place (the CLI's options read them from there);
- `worker`: the engine thread, which owns the classifier and batches every client's texts into `Engine.run_many`;
- `streams`: one client's text as it arrives, on a sequence of its own, and what the page shows of it;
- `app`: the ASGI app (Starlette): endpoints, errors, the API key, CORS, metrics (`metrics`) and the page (`static/`);
- `server`: uvicorn, with SIGTERM refusing what has not started.

Nothing here is imported by the runtime or by `edge2dexit --help`: Starlette and uvicorn come with the `serve` extra.
"""
