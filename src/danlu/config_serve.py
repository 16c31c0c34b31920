"""The `serve:` section: how `danlu serve` answers requests (also `ServeSettings` in Python).

    serve:
      port: 8000
      max_batch_size: 32      # inputs (or prompts, generating) one model call runs together
      max_wait_ms: 5          # how long the first input of a batch waits for company
      max_queue: 256          # inputs waiting; beyond this a request gets 429 + Retry-After
      api_keys: [sk-team-1]   # or DANLU_API_KEYS=a,b; /v1/* then need a key
      request_log: logs/      # every served input summarized there for `danlu monitor`

Command-line options of `danlu serve` override these keys.
"""

from __future__ import annotations

from pydantic import Field

from danlu.config_models import Section


class ServeSettings(Section):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="0 = any free port")
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="inputs or prompts per model call; 1 = batching off"
    )
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: int = Field(256, ge=1, description="inputs waiting before 429")
    timeout_s: float = Field(30.0, gt=0, description="per request; then 504")
    max_body_mb: float = Field(8.0, gt=0, description="larger request bodies get 413")
    max_inputs: int = Field(1024, ge=1, description="inputs in one /v1/predict request")
    max_new_tokens: int = Field(512, ge=1, description="cap on generated tokens per request")
    api_keys: list[str] = Field(default_factory=list, description="or env DANLU_API_KEYS")
    request_log: str | None = Field(None, description="folder for the request log (monitoring)")
    playground: bool = Field(True, description="the web playground at /")
    trusted_key: str | None = Field(
        None, description="public key (danlu keygen) every served run must be signed with"
    )
    registry: str | None = Field(None, description="registry root (default: DANLU_REGISTRY)")
    drain_s: float = Field(30.0, ge=0, description="graceful shutdown: time to finish requests")
