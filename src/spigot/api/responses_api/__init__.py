"""The OpenAI Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

    wire.py     the request body: what is supported, and every other field refused by name
    items.py    input items as chat messages; the response object and its echoed settings
    events.py   output items built from engine outputs, and the streamed events
    job.py      the ``Job`` that runs a request through the shared pipeline (generation.py)
    routes.py   the routes; stored responses are read and deleted here, kept by the job
                (``spigot.metering.stored_responses``: the ``responses`` table)

docs/responses.md says what a client sees.
"""
