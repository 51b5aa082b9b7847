"""The dtype names users give (--dtype, --draft-dtype, a head's hidden-state shards): one table.

Torch-free, so the CLI can offer the names as choices without importing torch;
`engine.loading.loader.parse_dtype` turns a name into the torch dtype.
"""

DTYPES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # name -> torch attribute
