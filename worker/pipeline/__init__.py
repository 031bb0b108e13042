"""The per-image pipeline: read (allowed roots, size cap), check headers, decode and crop, batch,
infer through a runner, and turn outputs into records. No Celery, no Redis: the one-process run and
the worker both drive it through `build_service`.
"""
