"""The engine: model loading, KV caches, the speculation loop, stop policies, stats.

It knows nothing of HTTP. Plain-data inputs (`SamplingParams`, `SpecConfig`) come in,
plain-data outputs (`TokenEvent`, `RequestStats`) go out.
"""
