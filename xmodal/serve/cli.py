"""``xmodal serve DIR``: the HTTP API and web page over a saved classifier, on uvicorn.

Secure by default: it binds 127.0.0.1 and accepts only loopback Host headers there; any other address
needs a bearer token (``XMODAL_API_TOKEN`` or ``--token-file``) and the command refuses to start without
one. The socket is bound before uvicorn starts so a busy port is one clear error, and ``--port 0`` picks
a free port (the address is printed on stderr).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli_util import resolve_device
from ..errors import InputError, ResourceError, UsageError
from ..extras import require_extra

TOKEN_ENV = "XMODAL_API_TOKEN"
MIN_TOKEN_CHARS = 16
_TOKEN_HINT = ("create one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt, "
               f"then pass --token-file token.txt (or set {TOKEN_ENV})")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, names, LAN addresses) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(token_file: Optional[Path], env: dict[str, str]) -> Optional[str]:
    """The bearer token from ``--token-file`` (preferred) or the environment; None when neither is given."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise InputError(f"token file not found: {token_file}", hint=_TOKEN_HINT) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read token file {token_file}: {exc}", hint=_TOKEN_HINT) from None
        source = f"token file {token_file}"
    elif env.get(TOKEN_ENV, "").strip():
        token, source = env[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UsageError(f"the API token in {source} must be at least {MIN_TOKEN_CHARS} characters without spaces",
                         hint=_TOKEN_HINT)
    return token


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to expose the API beyond this machine without a token."""
    if not is_loopback(host) and token is None:
        raise UsageError(f"--host {host} would expose the API to other machines without authentication",
                         hint=f"keep the default --host 127.0.0.1, or set an API token: {_TOKEN_HINT}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a busy port or bad address is a ResourceError naming the fix."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve --host {host}: {exc.strerror}",
                         hint="pass an IP address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ResourceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                            hint="choose another --port (--port 0 picks a free one) or stop the program using it") from None
    sock.set_inheritable(True)
    return sock


def serve_command(
    model_dir: Path = typer.Argument(..., help="Folder written by `xmodal fit` / FewShotClassifier.save."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs a token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: pick a free one)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most images in one forward pass."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long a batch waits to fill up."),
    max_queue: int = typer.Option(1024, "--max-queue", min=1, help="Images that may wait; beyond it requests get 503."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help=f"File holding the bearer token "
                                              f"(else ${TOKEN_ENV}); required for a non-loopback --host."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.001, help="Largest request body, in MB."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Largest image, in pixels."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... or auto."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log one line per request."),
    force: bool = typer.Option(False, "--force", help="Serve a classifier whose files were edited or whose backbone "
                                                      "fingerprint differs (with a warning)."),
) -> None:
    """Serve a saved classifier over HTTP: POST /v1/classify, GET /v1/model, /healthz, /docs, and a web page at /."""
    require_extra("serve", "xmodal serve")
    import uvicorn

    from ..classifier import FewShotClassifier
    from .app import LOOPBACK_HOST_NAMES, ServeSettings, create_app
    from .limits import UploadLimits

    if log_level.lower() not in {"critical", "error", "warning", "info", "debug", "trace"}:
        raise UsageError(f"unknown --log-level {log_level!r}", hint="use one of critical, error, warning, info, debug")
    token = resolve_token(token_file, dict(os.environ))
    check_bind(host, token)
    if not model_dir.is_dir():
        raise InputError(f"no saved classifier folder at {model_dir}",
                         hint="create one with `xmodal fit ... --out DIR` and pass that DIR")
    classifier = FewShotClassifier.load(str(model_dir), device=resolve_device(device), force=force)
    settings = ServeSettings(
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, token=token,
        limits=UploadLimits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_pixels=max_pixels,
                            max_files=max_batch),
        trusted_hosts=LOOPBACK_HOST_NAMES if is_loopback(host) and token is None else None)
    app = create_app(classifier, settings)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    print(f"xmodal serve: listening on http://{shown}:{bound}/ (page), /docs (API), /v1/classify"
          f"{' — bearer token required' if token else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level.lower(), access_log=access_log, lifespan="on",
                            server_header=False, timeout_keep_alive=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
