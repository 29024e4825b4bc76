"""The HTTP server: OpenAI Chat Completions / Responses / legacy Completions and the Workers AI run shape.

Modules: `app` (create_app, run_server, add_serve_arguments, misc routes, auth), `generation` (engine ->
API-neutral events), one module per API shape (`openai_chat`, `openai_responses`, `completions`,
`workers_ai`), `protocol_*` (pydantic request models), `errors` (each API's error shape), `metrics`
(Prometheus text), `structured` (grammar-constrained outputs), `sse`, `state`.
"""
