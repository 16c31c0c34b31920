"""`danlu keygen`, `danlu sign` and `danlu verify`: signed manifests of run directories
(registered on cli.app; the work is done by danlu.manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, out


@app.command()
@command
def keygen(
    out_path: Annotated[
        Path,
        typer.Option("--out", help="private key file to write (the public key goes to OUT.pub)"),
    ],
    force: Annotated[bool, typer.Option("--force", help="replace existing key files")] = False,
    debug: Debug = False,
) -> None:
    """Make an Ed25519 key pair for `danlu sign`: OUT (private, mode 0600; keep it secret)
    and OUT.pub (public; give it to whoever runs `danlu verify`)."""
    from danlu import signing_keys

    made = signing_keys.keygen(out_path, force=force)
    out.print(
        f"wrote {escape(made['private'])} (private, keep it secret) and "
        f"{escape(made['public'])} (public)\nfingerprint: {made['fingerprint']}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@command
def sign(
    run: Annotated[Path, typer.Argument(help="run directory")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (danlu keygen)")],
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="glob of files to leave out, e.g. 'checkpoints/' (repeatable)"),
    ] = None,
    debug: Debug = False,
) -> None:
    """Write RUN/manifest.json (the SHA-256 of every file) and sign it into RUN/manifest.sig."""
    from danlu import manifest

    signed = manifest.sign(run, key, exclude=exclude)
    size = manifest.human_size(signed["bytes"])
    changed = signed["changed_since_previous"]
    note = f"; {len(changed)} changed since the previous manifest" if changed else ""
    out.print(
        f"signed {escape(str(run))}: {signed['files']} files, {size}{note}; "
        f"key {signed['fingerprint']}",
        highlight=False,
        soft_wrap=True,
    )
    for name in changed:
        out.print(f"  {escape(name)}", highlight=False, soft_wrap=True)


@app.command()
@command
def verify(
    run: Annotated[Path, typer.Argument(help="run directory")],
    pubkey: Annotated[
        Path | None,
        typer.Option(help="the signer's public key; without it the signature is not checked"),
    ] = None,
    list_all: Annotated[
        bool, typer.Option("--list", help="on failure, list every difference first")
    ] = False,
    debug: Debug = False,
) -> None:
    """Re-hash every file of RUN against its manifest and check the signature against
    --pubkey; exit 2 naming the first difference (a changed, missing or added file, an edited
    manifest, a bad signature or a wrong key)."""
    from danlu import manifest

    try:
        result = manifest.verify(run, pubkey)
    except manifest.IntegrityError as e:
        if list_all:
            for problem in e.problems:
                out.print(f"  {escape(problem)}", highlight=False, soft_wrap=True)
        raise
    out.print(f"{escape(str(run))}: {escape(result['summary'])}", highlight=False, soft_wrap=True)
