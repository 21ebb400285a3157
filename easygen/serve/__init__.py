"""EasyGen over HTTP: an OpenAI-compatible API (``easygen serve``) and the web chat page it serves.

The layers, each thin over the one below:

- ``app``: FastAPI routes, authentication, size limits, OpenAI-style errors, server-sent events;
- ``openai_chat``: OpenAI chat requests checked and turned into engine turns, replies into OpenAI
  responses and chunks (images out as markdown plus an ``images`` list);
- ``images``: untrusted images in (``data:`` URLs, optional http(s)), limits before decoding;
- ``service``: the queue in front of the engine: one engine thread, waiting requests batched into
  one ``generate`` call, cancellation when a client goes away;
- the engine itself: ``easygen.assistant.Assistant`` and ``easygen.generation``, as in the terminal chat.
"""
