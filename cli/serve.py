"""``jointface serve`` and ``jointface keys``: the HTTP service and its API keys.

Registered on the main app in ``cli/app.py``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Optional

import typer
from rich.table import Table

from cli.common import CliError, err, handle_errors, load_engine, open_gallery, out, settings

keys_app = typer.Typer(help="API keys of `jointface serve`: create, list, revoke.", no_args_is_help=True)


@keys_app.command("create")
@handle_errors
def keys_create(ctx: typer.Context, name: str = typer.Argument(..., help="A name for the key (who uses it)."),
                scope: str = typer.Option("read", "--scope", help="read (search), write (also enrol) or admin "
                                                                  "(also remove, rename, merge, calibrate).")) -> None:
    """Create a key; it is printed once (only its hash is stored)."""
    from jointface.server import keys

    with open_gallery(ctx) as gallery:
        try:
            info, secret = keys.create_key(gallery.store, name, scope)
        except keys.KeyCommandError as exc:
            raise CliError(str(exc)) from exc
    out.print(secret, markup=False)
    err.print(f"key {info.name!r} created with scope {info.scope}: keep it now, it cannot be shown again",
              markup=False)


@keys_app.command("list")
@handle_errors
def keys_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every key: name, scope, first characters, created, revoked, last used."""
    from jointface.server import keys

    with open_gallery(ctx) as gallery:
        listing = keys.list_keys(gallery.store)
    if as_json:
        for info in listing:
            out.print(json.dumps(info.to_json(), ensure_ascii=False), markup=False)
        return
    if not listing:
        out.print("no keys: create one with `jointface keys create NAME --scope read|write|admin`", markup=False)
        return
    table = Table("name", "scope", "starts with", "created", "state")
    for info in listing:
        state = "active" if info.active else f"revoked {info.revoked_at:%Y-%m-%d %H:%M}"
        table.add_row(info.name, info.scope, info.prefix + "...", f"{info.created_at:%Y-%m-%d %H:%M}", state)
    out.print(table)


@keys_app.command("revoke")
@handle_errors
def keys_revoke(ctx: typer.Context, name: str) -> None:
    """Revoke a key: the service refuses it from the next request on."""
    from jointface.server import keys

    with open_gallery(ctx) as gallery:
        try:
            keys.revoke_key(gallery.store, name)
        except keys.KeyCommandError as exc:
            raise CliError(str(exc)) from exc
    err.print(f"key {name!r} revoked", markup=False)


@handle_errors
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told "
                                                          "otherwise; put a TLS proxy in front on a network)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    keep_thumbnails: bool = typer.Option(False, "--keep-thumbnails", help="Store a small crop of each enrolled "
                                                                          "face for the web page."),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="Allow browser calls from this "
                                                                                "origin (repeat); none by "
                                                                                "default."),
    max_file_mb: float = typer.Option(20.0, "--max-file-mb", min=0.001, help="Largest upload, per file."),
    max_files: int = typer.Option(16, "--max-files", min=1, max=1000, help="Files per request."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0, max=1000, help="How long the detector "
                                                                                      "waits for more photos "
                                                                                      "to batch."),
) -> None:
    """Run the HTTP API and the web page (see README: Service)."""
    import uvicorn

    from jointface.server.app import ServeConfig, create_app
    from jointface.server.uploads import UploadLimits

    config = settings(ctx)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        err.print(f"warning: listening on {host}: reachable from the network; use HTTPS in front of it",
                  markup=False)
    with open_gallery(ctx) as gallery:  # migrate (and report a broken database) before loading the engine
        from jointface.server import keys

        if not any(info.active for info in keys.list_keys(gallery.store)):
            err.print("note: no API key yet: every request but /v1/health will be refused; create one with "
                      "`jointface keys create NAME --scope admin`", markup=False)
    engine = load_engine(ctx)
    serve_config = ServeConfig(home=config.home, db_url=config.db_url, index_kind=config.index_kind,
                               limits=UploadLimits(max_file_bytes=int(max_file_mb * 1e6), max_files=max_files),
                               keep_thumbnails=keep_thumbnails, cors_origins=tuple(cors_origin or ()),
                               max_wait_s=batch_wait_ms / 1000)
    app = create_app(serve_config, engine)
    err.print(f"serving on http://{host}:{port}/ (engine {engine.name}); Ctrl-C stops", markup=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=64,
                timeout_graceful_shutdown=10, server_header=False)
