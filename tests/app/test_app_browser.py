"""`python -m app` served for real and used through headless Chromium: what the page shows is what the models give.

The models are trained for the test through the real stage-1 and stage-2 entry points, on 16 synthetic images: a
trained Q-Former ranks an image's own caption first (a random one would not), and a trained VLM writes words (a
random one writes only blank lines, which would make "the page shows the model's answer" an empty check).
"""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from app.chat import MAX_NEW_TOKENS
from data.synthetic import generate_dataset
from eval.generation import CAPTION_PROMPT
from eval.run import load_rows
from tests.helpers import REPO
from tests.training.launch import (
    LEARNABLE,
    LEARNABLE_QFORMER,
    SMALL_QFORMER,
    SMALL_VISION,
    finish,
    script_env,
    stage1_args,
    stage2_args,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Slow tier (`make test`, not `make test-fast`): drives a real browser.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: install Debian's chromium and chromium-driver"
)]
# What the closed network here needs besides headless mode: no sandbox (root), no calls home, no QUIC.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000"]
TRAIN_IMAGES, EXAMPLES = 16, 4
# A bound on waiting for the page, never a measurement: the test only fails on it when nothing arrives.
PATIENCE_S = 120
CHAT_MESSAGES = "#chat [data-testid=user], #chat [data-testid=bot]"

# Both stages in one interpreter, as `make demo` runs them (one start-up instead of two).
TRAIN_BOTH_STAGES = """
import json, sys
from training import train_qformer, train_vlm
stage1, stage2 = json.loads(sys.argv[1])
train_qformer.main(stage1)
train_vlm.main(stage2)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with `data/` (16 training shapes images), `qformer/` and `vlm/` trained on them until they
    remember them: the Q-Former for 100 steps, the VLM for 150 (on a caption and one question per image)."""
    out = tmp_path_factory.mktemp("app_models")
    generate_dataset(out / "data", {"train": TRAIN_IMAGES, "validation": 4}, seed=3, image_size=32, num_proc=1)
    stage1 = stage1_args(
        out / "data", out / "qformer", vision_config={**SMALL_VISION, **LEARNABLE},
        qformer_config={**SMALL_QFORMER, **LEARNABLE_QFORMER}, itc_similarity="mean", max_steps=100,
        # The captions the app ranks (the tiny config's stage 1 reads the "size colour shape" ones).
        caption_column="caption", negative_captions_column="negative_captions",
        per_device_train_batch_size=16, warmup_steps=4, logging_steps=25, do_eval=False,
    )  # fmt: skip
    stage2 = stage2_args(
        out / "data", out / "qformer", out / "vlm", max_steps=150, per_device_train_batch_size=16, max_length=160,
        learning_rate=3e-3, warmup_steps=5, logging_steps=25, do_eval=False,
    )  # fmt: skip
    with open(out / "train.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", TRAIN_BOTH_STAGES, json.dumps([stage1, stage2])], cwd=REPO, env=script_env(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finish(process, out / "train.log")
    return out


@pytest.fixture(scope="module")
def app_url(trained, free_port, tmp_path_factory):
    """`python -m app` on the trained models with the first training images as examples, until the module ends."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**script_env(), "GRADIO_TEMP_DIR": str(log.parent / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "app", "--model", str(trained / "vlm"), "--qformer", str(trained / "qformer"),
               "--examples", str(trained / "data" / "train"), "--num-examples", str(EXAMPLES), "--port", str(free_port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{free_port}/"
    try:
        _wait(lambda: server.poll() is not None or _answers(url), f"the app to serve {url}")
        assert server.poll() is None, f"the app exited with {server.returncode}:\n{log.read_text()[-4000:]}"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(condition, what: str):
    """`condition()`'s first truthy value, polled until PATIENCE_S; fails naming `what` when none comes."""
    try:
        return WebDriverWait(None, PATIENCE_S, poll_frequency=0.2).until(lambda _: condition())
    except TimeoutException:
        pytest.fail(f"waited {PATIENCE_S} s for {what}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, app_url):
    """The app freshly opened."""
    browser.get(app_url)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#caption-button"), "the page to load")
    return browser


@pytest.fixture(scope="module")
def rows(trained) -> list[dict]:
    return load_rows(str(trained / "data"), "train", None)


def _shown_images(page) -> set[str]:
    return {img.get_attribute("src") for img in page.find_elements(By.CSS_SELECTOR, "#image img")}


def _upload(page, image: Image.Image, folder: Path) -> None:
    """Uploads `image` as a PNG file through the image box, and waits until the page shows it."""
    path = folder / "upload.png"
    image.save(path)
    before = _shown_images(page)
    page.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))
    _wait(lambda: _shown_images(page) - before, "the uploaded image to show")


def _greedy(model, processor, image: Image.Image, text: str) -> str:
    """model.generate's greedy answer to `text` about `image`, decoded."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _similarities(folder: Path, image: Image.Image, captions: list[str]) -> list[float]:
    """The Q-Former's image-text similarity of `image` with each caption, computed directly."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.similarity(model.get_image_embeds(pixel_values),
                                model.get_text_embeds(text["input_ids"], text["attention_mask"]))[0].tolist()


def _ranking(page) -> list[tuple[str, float]]:
    """The ranking table shown: (caption, similarity) per row, top first."""
    table = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#ranking tbody tr"), "the ranking")
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in table]
    assert [int(rank) for rank, _, _ in cells] == list(range(1, len(cells) + 1))
    return [(text, float(score)) for _, text, score in cells]


def _assert_ranked(shown: list[tuple[str, float]], true_caption: str, captions: list[str], scores: list[float]):
    """`shown` lists `captions` best first with `scores` as displayed (3 decimals), and `true_caption` on top."""
    expected = sorted(zip(captions, scores), key=lambda pair: -pair[1])
    assert [text for text, _ in shown] == [text for text, _ in expected]
    assert [score for _, score in shown] == pytest.approx([score for _, score in expected], abs=5e-4 + 1e-6)
    assert shown[0][0] == true_caption, f"the trained Q-Former should rank the image's own caption first: {shown}"


def test_caption_and_chat_show_the_vlms_greedy_answers(page, trained, rows, tmp_path):
    row = rows[0]
    question = row["qa"][0]["question"]
    model = AutoModelForImageTextToText.from_pretrained(trained / "vlm", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(trained / "vlm", trust_remote_code=True)
    expected_caption = _greedy(model, processor, row["image"], CAPTION_PROMPT)
    expected_answer = _greedy(model, processor, row["image"], question)
    assert expected_caption and expected_answer, "the trained VLM should write something"

    _upload(page, row["image"], tmp_path)
    page.find_element(By.ID, "caption-button").click()
    caption_box = page.find_element(By.CSS_SELECTOR, "#caption textarea")
    assert _wait(lambda: caption_box.get_attribute("value"), "the caption") == expected_caption

    question_box = page.find_element(By.CSS_SELECTOR, "#question textarea")
    question_box.send_keys(question, Keys.ENTER)
    bot = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]"), "the answer")
    user = page.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user]")
    assert [m.get_attribute("textContent") for m in user] == [question]
    assert [m.get_attribute("textContent") for m in bot] == [expected_answer]
    assert question_box.get_attribute("value") == ""  # ready for the next question

    # The image stays for the next question; a second answer joins the conversation.
    question_box.send_keys(row["qa"][-1]["question"], Keys.ENTER)
    _wait(lambda: len(page.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")) == 2, "a second answer")
    second = page.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")[1].get_attribute("textContent")
    assert second == _greedy(model, processor, row["image"], row["qa"][-1]["question"])

    # Another picture starts a new conversation.
    _upload(page, rows[1]["image"], tmp_path)
    _wait(lambda: not page.find_elements(By.CSS_SELECTOR, CHAT_MESSAGES), "the chat to clear")
    assert caption_box.get_attribute("value") == ""


def test_uploaded_image_ranks_its_own_caption_first(page, trained, rows, tmp_path):
    captions = [row["caption"] for row in rows[4:8]]
    row = rows[6]  # its caption is third in the box, so the page must reorder them
    _upload(page, row["image"], tmp_path)
    candidates = page.find_element(By.CSS_SELECTOR, "#candidates textarea")
    candidates.clear()
    candidates.send_keys("\n".join(captions))
    page.find_element(By.ID, "rank-button").click()
    _assert_ranked(_ranking(page), row["caption"], captions,
                   _similarities(trained / "qformer", row["image"], captions))


def test_picked_example_ranks_its_caption_first_among_the_examples(page, trained, rows):
    # The gallery holds the first training images; the ranking box starts with their captions.
    examples = page.find_elements(By.CSS_SELECTOR, "#examples .gallery-item")
    assert len(examples) == EXAMPLES
    examples[1].click()
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#image img"), "the picked image to show")
    captions = [row["caption"] for row in rows[:EXAMPLES]]
    assert page.find_element(By.CSS_SELECTOR, "#candidates textarea").get_attribute("value") == "\n".join(captions)
    page.find_element(By.ID, "rank-button").click()
    _assert_ranked(_ranking(page), rows[1]["caption"], captions,
                   _similarities(trained / "qformer", rows[1]["image"], captions))
