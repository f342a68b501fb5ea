"""`fervit serve`: the web page and JSON API (FastAPI; install with `pip install 'fervit[serve]'`)."""
