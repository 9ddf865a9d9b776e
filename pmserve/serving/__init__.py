"""`pmserve serve`, one concern per module, in the order a request meets them (each imports only those above it):

- config: ServeConfig, the server's options;
- model: Served (a bundle as served) and load_bundle, the checks every version passes before it serves;
- candidate: a candidate version's graph run first in a child process (a crash there is not the server's);
- metrics: the Prometheus metrics;
- protocol: the v2 wire format (request parsing, limits, response encoding) and RequestError;
- access: who may call what (the API key, the admin key, loopback);
- inputs: texts checked, images decoded;
- batcher: dynamic batching of one model's requests into padded model calls (no HTTP);
- engine: a decoder's generation thread, iteration-level batching over pmserve.generation (no HTTP);
- model_table: name -> the version served and its batcher (encoder) or engine (decoder); swaps that drop nothing;
- repository: which version of each model serves while a model repository changes;
- generate_routes: the decoders' routes (KServe v2 generate, OpenAI-compatible completions), added by app;
- app: the FastAPI app and its routes, built from objects handed in;
- server: the command's entry (`serve`): builds the models, the repository and the app, and runs uvicorn.

Encoders and decoders are served side by side, from bundles or a repository, with the same checks and swaps.
"""
