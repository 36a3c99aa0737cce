"""`python -m app`'s own mistakes (where to serve, what to show) are one `UserError` naming the option, raised before
anything is served; the model options go through the checks every command shares (tests/cli)."""

import socket
import sys

import pytest

from app.__main__ import main
from cli import UserError
from tests.conftest import tiny_vlm_and_processor


@pytest.fixture
def vlm_folder(tmp_path):
    model, processor = tiny_vlm_and_processor()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    return str(tmp_path / "vlm")


def test_a_taken_port_is_refused_before_the_models_load(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model folder does not exist: the port is checked first.
        with pytest.raises(UserError, match=rf"cannot serve on 127\.0\.0\.1:{port} .*choose another --port"):
            main(["--model", str(tmp_path / "missing"), "--port", str(port)])


@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_port_out_of_range_names_the_option(port):
    with pytest.raises(UserError, match=rf"--port: must be at (least 1|most 65535), got {port}"):
        main(["--model", "unused", "--port", port])


def test_missing_examples_name_the_option(vlm_folder, tmp_path, free_port):
    with pytest.raises(UserError, match=rf"^--examples: .*{tmp_path / 'shapes'}: no such file or folder"):
        main(["--model", vlm_folder, "--examples", str(tmp_path / "shapes"), "--port", str(free_port)])


def test_an_environment_without_gradio_gets_one_line(monkeypatch):
    """Installed without the `app` extra: Python's own marker of a module that cannot be imported (None in
    sys.modules) stands for the missing package."""
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(UserError, match=r"needs Gradio.*make app.*pip install -e '\.\[app\]'"):
        main(["--model", "unused"])
