"""The OpenAI Batch API: ``/v1/files`` and ``/v1/batches``, in OpenAI's shapes.

So that the official ``openai`` client (and any other written against
OpenAI's Batch API) drives batchexec with only its ``base_url`` and
``api_key`` changed. The key is sent as ``Authorization: Bearer <key>`` (or as
``Integrations-API-Key``), one of the same accepted keys; files and batches
belong to the key. Errors are OpenAI's envelope, ``{"error": {"message",
"type", "param", "code"}}`` (``errors.py``); objects are in ``schemas.py``;
the routes in ``files.py`` and ``batches.py``. Underneath, a file is kept in
the store in chunks and a batch is a batchexec batch like any other.
"""
