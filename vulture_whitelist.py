"""Names that are used, though not where vulture can see it: frameworks read or call them by name.

`make lint` gives this file to vulture with the code (see [tool.vulture] in pyproject.toml). It is
never imported or run: each line only mentions a name, and vulture counts a name as used wherever
it is mentioned. Add a line only for a real false positive, with the reason.
"""

_ = object  # stands for any object: vulture matches attribute names, not what they belong to

_.extra_repr  # torch: nn.Module.__repr__ calls it (engine/loading/cpu_linear.py)
_.model_config  # pydantic: read from the class body (engine/params.py, server/schemas.py)
_.pytestmark  # pytest: a module's marks
_.should_exit  # uvicorn: Server.run polls it; set to stop the server (server/app.py)
_.pre_tokenizer  # tokenizers: a property setter on Tokenizer (tests/tiny.py)
_._name_or_path  # transformers: PretrainedConfig.name_or_path reads it (engine/loading/loader.py)

# RequestStats fields: written by the engine, read by name from RequestStats.to_dict()
# (Prometheus metrics, bench records, the generate command).
_.draft_seconds
_.target_seconds
_.total_seconds

# OpenAI request fields accepted (the schemas forbid unknown ones) and ignored (server/schemas.py).
_.tools
_.tool_choice
_.functions
_.function_call
_.parallel_tool_calls
_.store
_.metadata
_.strict  # response_format.json_schema.strict: accepted, the schema is always enforced

# llguidance's TokenizerWrapper reads these attributes of the tokenizer it wraps (engine/grammar.py: TokenBytes).
_.special_token_ids
