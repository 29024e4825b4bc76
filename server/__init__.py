"""The HTTP server: OpenAI Chat Completions / Responses / legacy Completions and the Workers AI run shape.

Modules: `app` (create_app, run_server, add_serve_arguments, misc routes, auth); one module per API shape that
only converts (`openai_chat`, `openai_responses`, `completions`, and `workers_ai`, built on the OpenAI ones);
`protocol_*` (pydantic request models); the shared core they stand on: `serving` (request preparation,
generation, answering), `engine_client` (the typed engine protocol, submitting requests), `admission`,
`events` (API-neutral events and results), `harmony_events` (the harmony event fold), `logprobs`; and
`errors` (each API's error shape), `metrics` (Prometheus text), `sse`, `state`.
"""
