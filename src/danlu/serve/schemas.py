"""Request bodies of the server's endpoints (FastAPI validates them: a wrong field is a 422
naming it). The OpenAI-compatible ones accept and ignore fields danlu does not use, so existing
client libraries work unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(Strict):
    model: str | None = Field(None, description="served model name (optional with one model)")
    inputs: list[Any] | None = Field(None, description="texts, table rows or base64 images")
    input: Any = Field(None, description="one input (instead of inputs)")

    @model_validator(mode="after")
    def _one(self) -> PredictRequest:
        if (self.inputs is None) == (self.input is None):
            raise ValueError("send either 'inputs' (a list) or 'input' (one item)")
        return self

    @property
    def items(self) -> list[Any]:
        return self.inputs if self.inputs is not None else [self.input]


class Sampling(BaseModel):
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class GenerateRequest(Sampling, Strict):
    model: str | None = None
    prompt: str | list[str]
    max_new_tokens: int = Field(64, ge=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    num_beams: int = Field(1, ge=1, le=16)


class OpenAIRequest(Sampling):
    model_config = ConfigDict(extra="allow")  # OpenAI fields danlu does not use are ignored
    model: str
    n: int = Field(1, ge=1, le=16)
    stream_options: dict[str, Any] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message text (OpenAI's content parts of type text, joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
