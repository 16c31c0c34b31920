"""`danlu serve REF [REF ...]`: the HTTP server (registered on cli.app).

Settings come from, last wins: ServeSettings defaults → the `serve:` section of the first
run's config (or of --config) → command-line options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, out


@app.command()
@command
def serve(
    refs: Annotated[
        list[str],
        typer.Argument(help="run directories or registry references NAME[:VERSION|:STAGE]"),
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML whose serve: section sets the defaults")
    ] = None,
    host: Annotated[str | None, typer.Option(help="address (0.0.0.0: every interface)")] = None,
    port: Annotated[int | None, typer.Option(help="port (0: any free one)")] = None,
    name: Annotated[
        list[str] | None, typer.Option("--name", help="served name, one per REF")
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(help="dynamic batching: inputs or prompts per model call (1 = off)"),
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="dynamic batching: wait for company")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="inputs waiting before 429")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds per request (504 after)")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="required key (repeatable)")
    ] = None,
    request_log: Annotated[
        Path | None, typer.Option(help="log every input (summarized) here for danlu monitor")
    ] = None,
    registry: Annotated[Path | None, typer.Option(help="registry root")] = None,
    trusted_key: Annotated[
        Path | None, typer.Option(help="serve only runs signed by this public key")
    ] = None,
    playground: Annotated[bool, typer.Option(help="the web playground at /")] = True,
    debug: Debug = False,
) -> None:
    """Serve models over HTTP: /v1/predict, /v1/generate, the OpenAI-compatible
    /v1/completions and /v1/chat/completions, /metrics, and a web playground at /."""
    from danlu.serve.server import serve as run_server

    given = {
        "host": host, "port": port, "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms, "max_queue": max_queue, "timeout_s": timeout,
        "api_keys": api_key, "request_log": request_log and str(request_log),
        "registry": registry and str(registry), "trusted_key": trusted_key and str(trusted_key),
    }  # fmt: skip
    settings = settings_for(refs[0], config, {k: v for k, v in given.items() if v is not None})
    if not playground:
        settings = settings.model_copy(update={"playground": False})
    if name and len(name) != len(refs):
        from danlu.errors import ConfigError

        raise ConfigError(
            f"{len(name)} --name for {len(refs)} models", fix="give one --name per REF, or none"
        )
    run_server(refs, settings, names=name, announce=lambda s: out.print(escape(s)))


def settings_for(ref: str, config: Path | None, options: dict[str, Any]) -> Any:
    """ServeSettings from a config's serve: section (or the run's own) and the CLI options."""
    from danlu.config_serve import ServeSettings
    from danlu.errors import ConfigError

    section: dict[str, Any] = {}
    if config is not None:
        from danlu.config import load

        cfg = load(config)
        section = cfg.serve.model_dump() if cfg.serve else {}
    elif (Path(ref) / "config.yaml").is_file():
        import yaml

        raw = yaml.safe_load((Path(ref) / "config.yaml").read_text()) or {}
        section = raw.get("serve") or {}
    try:
        return ServeSettings(**{**section, **options})
    except ValueError as e:
        raise ConfigError(f"serve settings: {e}", fix="check the serve: section") from None
