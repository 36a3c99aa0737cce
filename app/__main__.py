"""`python -m app --model <VLM folder or Hub id> [--qformer <stage-1 folder or Hub id>]`: a web page to caption
images, chat about them and rank captions."""

import argparse
import importlib.util
import socket
from collections.abc import Sequence

from cli import ArgumentParser, UserError, count, positive_int, run_command
from eval.run import load_rows

from .chat import load_models


def _port(text: str) -> int:
    value = count(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {value}")
    return value


def _parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(
        prog="python -m app",
        description="A web page on a trained model: upload or pick an image, get a caption, ask questions about it, "
                    "and (with --qformer) rank captions by image-text similarity.",
        epilog="example: python -m app --model outputs/demo/vlm --qformer outputs/demo/qformer "
               "--examples outputs/demo/data/validation",
    )
    parser.add_argument("--model", required=True, help="a stage-2 VLM: a saved folder or a Hub id")
    parser.add_argument("--qformer", default=None,
                        help="a stage-1 Q-Former (saved folder or Hub id) to rank captions by similarity with")
    parser.add_argument("--examples", default=None,
                        help="images to pick from: shards folder, .tar files, dataset folder/file or Hub dataset")
    parser.add_argument("--num-examples", type=positive_int, default=12,
                        help="how many of --examples to show, from the start (default 12)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=_port, default=7860, help="port to serve on (default 7860)")
    return parser.parse_args(argv)


def _check_can_serve(host: str, port: int) -> None:
    """Raises `UserError` when a server could not listen on `host:port`: now, before the models load, and naming
    this command's options (gradio finds out only at launch, and names its own parameters)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            sock.bind(address)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"cannot serve on {host}:{port} ({reason}); choose another --port or --host") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    # Gradio is the `app` extra: an environment installed without it gets one line, not an import traceback.
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web app needs Gradio, which this environment does not have: `make app` installs it, "
                        "or pip install -e '.[app]'")
    from .ui import PAGE_CSS, build_app

    _check_can_serve(args.host, args.port)
    models = load_models(args.model, args.qformer)
    examples = []
    if args.examples:
        try:
            examples = load_rows(args.examples, None, args.num_examples)
        except UserError as err:
            raise UserError(f"--examples: {err}") from None
    build_app(models, examples).launch(server_name=args.host, server_port=args.port, css=PAGE_CSS)


if __name__ == "__main__":
    run_command(main)
