"""`adapterctl`: manage the adapters of a running adapter-server over HTTP.

    adapterctl upload PATH --name NAME [--overwrite]   PATH: a PEFT adapter directory or a .tar.gz/.tgz/.tar/.zip
    adapterctl list [--json]
    adapterctl show NAME [--json]
    adapterctl delete NAME [--json]
    adapterctl convert DIR [--remove-pickle]   AdapterHub pytorch_adapter.bin -> adapter.safetensors (local)

Options (before or after the command): --server URL (env ADAPTERCTL_SERVER, default
http://127.0.0.1:8000), --api-key KEY (env ADAPTERCTL_API_KEY; an admin key when the server
has keys), --timeout SECONDS. Output is a human-readable table or summary; --json prints the
server's JSON instead. Exit codes: 0 success, 1 the server refused (the reason is printed),
2 bad usage or a local problem (missing path, not an adapter), 3 the server could not be reached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
HUB_FILES = ("adapter_config.json", "adapter.safetensors", "README.md", "head_config.json", "model_head.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CLIError(Exception):
    """A failure reported as one line on stderr with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------- HTTP


class Client:
    def __init__(self, server: str, api_key: str | None, timeout: float):
        self.server = server.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CLIError(f"{self.server} did not answer in time", EXIT_UNREACHABLE) from None
        except httpx.TransportError as exc:
            raise CLIError(f"cannot reach {self.server}: {exc}", EXIT_UNREACHABLE) from None
        if response.status_code >= 400:
            raise CLIError(f"{response.status_code} {_error_message(response)}", EXIT_REFUSED)
        try:
            return response.json()
        except ValueError:
            raise CLIError(f"{self.server} answered {response.status_code} with a body that is not JSON",
                           EXIT_REFUSED) from None


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return response.reason_phrase or "request failed"


# ---------------------------------------------------------------------------------- upload


def upload_parts(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart file parts for an adapter directory or archive at ``path``."""
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise CLIError(f"{path} is neither an adapter directory nor a .tar.gz/.tgz/.tar/.zip archive", EXIT_USAGE)
        return [("files", (path.name, path.read_bytes()))]
    if not path.is_dir():
        raise CLIError(f"{path} does not exist", EXIT_USAGE)
    if not (path / "adapter_config.json").is_file():
        raise CLIError(f"{path} has no adapter_config.json; point at the directory PEFT's save_pretrained wrote",
                       EXIT_USAGE)
    for pickle, safe in (("pytorch_adapter.bin", "adapter.safetensors"),
                         ("pytorch_model_head.bin", "model_head.safetensors")):
        if (path / pickle).is_file() and not (path / safe).is_file():
            raise CLIError(f"{path} holds AdapterHub's pickle {pickle}, which the server refuses; run "
                           f"`adapterctl convert {path}` first", EXIT_USAGE)
    if (path / "adapter.safetensors").is_file():  # AdapterHub's format (bottleneck adapters)
        # a saved head goes too: the server accepts the adapter only if the head equals its lm_head
        return [("files", (name, (path / name).read_bytes())) for name in HUB_FILES if (path / name).is_file()]
    if not (path / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = (f" (found {pickles[0]}: pickle files are refused; save with safe_serialization=True)"
                if pickles else "")
        raise CLIError(f"{path} has no adapter_model.safetensors{hint}", EXIT_USAGE)
    return [("files", (name, (path / name).read_bytes())) for name in ADAPTER_FILES if (path / name).is_file()]


# ---------------------------------------------------------------------------------- output


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def format_list(adapters: list[dict]) -> str:
    if not adapters:
        return "no adapters"
    rows = [[a["name"], a["kind"], str(a["rank"]) if a["kind"] == "lora" else "-",
             ",".join(a["target_modules"]) or "-", _size(a["size_bytes"]), a["created_at"]] for a in adapters]
    return table(rows, ["NAME", "KIND", "RANK", "TARGETS", "SIZE", "CREATED"])


def format_one(adapter: dict) -> str:
    fields = [("name", adapter["name"]), ("kind", adapter["kind"]), ("rank", adapter["rank"]),
              ("target modules", ", ".join(adapter["target_modules"]) or "-"),
              ("virtual tokens", adapter["num_virtual_tokens"]), ("trained on", adapter.get("base_model") or "-"),
              ("size", f"{_size(adapter['size_bytes'])} ({adapter['size_bytes']} bytes)"),
              ("sha256", adapter["sha256"]), ("created", adapter["created_at"])]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in fields)


# ---------------------------------------------------------------------------------- commands


def run(args: argparse.Namespace) -> str:
    if args.command == "convert":  # local: no server involved
        from adapters.convert import ConvertError, convert_dir

        try:
            written = convert_dir(Path(args.path), remove_pickle=args.remove_pickle)
        except ConvertError as exc:
            raise CLIError(str(exc), EXIT_USAGE) from None
        return f"wrote {written}"
    client = Client(args.server, args.api_key, args.timeout)
    if args.command == "upload":
        parts = upload_parts(Path(args.path))
        try:
            body = client.request("POST", "/v1/adapters", files=parts,
                                  data={"name": args.name, "overwrite": "true" if args.overwrite else "false"})
        except CLIError as exc:
            if str(exc).startswith("409 "):
                raise CLIError(f"{exc} (pass --overwrite to replace it)", exc.code) from None
            raise
        return json.dumps(body, indent=2) if args.json else (
            f"uploaded {body['name']} ({body['kind']}, {_size(body['size_bytes'])}, sha256 {body['sha256'][:12]})")
    if args.command == "list":
        body = client.request("GET", "/v1/adapters")
        return json.dumps(body["data"], indent=2) if args.json else format_list(body["data"])
    if args.command == "show":
        body = client.request("GET", f"/v1/adapters/{quote(args.name, safe='')}")
        return json.dumps(body, indent=2) if args.json else format_one(body)
    body = client.request("DELETE", f"/v1/adapters/{quote(args.name, safe='')}")
    return json.dumps(body, indent=2) if args.json else f"deleted {args.name}"


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Connection options, accepted before and after the command (defaults only at the top level)."""
    p = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS
    p.add_argument("--server", metavar="URL",
                   default=os.environ.get("ADAPTERCTL_SERVER", DEFAULT_SERVER) if defaults else suppress,
                   help="server base URL (env ADAPTERCTL_SERVER)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("ADAPTERCTL_API_KEY") if defaults else suppress,
                   help="API key, an admin key when the server has keys (env ADAPTERCTL_API_KEY)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=300.0 if defaults else suppress)
    p.add_argument("--json", action="store_true", default=False if defaults else suppress,
                   help="print the server's JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterctl", description="Manage the adapters of an adapter-server.",
                                     parents=[_common(True)],
                                     epilog="adapterctl train --help: train a LoRA, IA3 or prefix adapter "
                                            "(and --upload it)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = [_common(False)]
    upload = commands.add_parser("upload", parents=sub, help="upload a PEFT adapter directory or archive")
    upload.add_argument("path", metavar="PATH")
    upload.add_argument("--name", required=True, help="the adapter's name on the server")
    upload.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    commands.add_parser("list", parents=sub, help="list the adapters")
    show = commands.add_parser("show", parents=sub, help="show one adapter")
    show.add_argument("name", metavar="NAME")
    delete = commands.add_parser("delete", parents=sub, help="delete an adapter")
    delete.add_argument("name", metavar="NAME")
    convert = commands.add_parser("convert", parents=sub,
                                  help="write adapter.safetensors from AdapterHub's pytorch_adapter.bin (locally)")
    convert.add_argument("path", metavar="DIR")
    convert.add_argument("--remove-pickle", action="store_true", help="delete pytorch_adapter.bin afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer has its own, long list of options
        from adapters.train import main as train_main

        return train_main(argv[1:], prog="adapterctl train")
    args = build_parser().parse_args(argv)
    try:
        output = run(args)
    except CLIError as exc:
        print(f"adapterctl: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"adapterctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
