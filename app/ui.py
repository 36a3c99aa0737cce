"""The app's page (Gradio): an image (uploaded, dropped, pasted or picked among evaluation samples), its caption, a
chat about it, and, with a stage-1 Q-Former, captions ranked by image-text similarity. The models' side is
`app.chat`; this file only lays out the page and wires its events."""

import json
from collections.abc import Sequence

import gradio as gr

from cli import UserError
from eval.generation import GENERATION_PRESETS
from eval.tables import markdown_table

from .chat import MAX_NEW_TOKENS, Models, answer, caption, rank

# Small pictures (the tiny recipe's are 32 to 63 pixels wide) fill their frames with sharp pixels; the ranking's
# number columns stay on one line. Gradio takes a page's CSS at launch.
PAGE_CSS = """
#image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#examples img { image-rendering: pixelated; }
#ranking th, #ranking td:first-child, #ranking td:last-child { white-space: nowrap; }
"""
# How many of the evaluation samples' captions fill the ranking box at start: the picked sample's own caption is
# then among a few others to tell it from.
CANDIDATES_FROM_EXAMPLES = 4


def _need_image(image) -> None:
    if image is None:
        raise gr.Error("Upload, drop or pick an image first.")


def build_app(models: Models, examples: Sequence[dict] = ()) -> gr.Blocks:
    """The page for `models`; `examples` are rows with `image` (PIL) and `caption`, shown as a gallery to pick from.

    Element ids (`image`, `examples`, `caption`, `chat`, `question`, `candidates`, `ranking`, and `caption-button`,
    `ask-button`, `rank-button`) name the parts a browser test reads and fills.
    """

    def on_caption(image, strategy, max_new_tokens):
        _need_image(image)
        return caption(models, image, strategy, int(max_new_tokens))

    def on_ask(image, question, history, strategy, max_new_tokens):
        _need_image(image)
        if not question.strip():
            raise gr.Error("Write a question first.")
        reply = answer(models, image, question.strip(), strategy, int(max_new_tokens))
        return [*history, {"role": "user", "content": question.strip()}, {"role": "assistant", "content": reply}], ""

    def on_rank(image, candidates):
        _need_image(image)
        try:
            ranked = rank(models, image, candidates.splitlines())
        except UserError as err:
            raise gr.Error(str(err)) from None
        return markdown_table(["rank", "caption", "similarity"],
                              [[i, text, score] for i, (text, score) in enumerate(ranked, start=1)])

    with gr.Blocks(title="qformer-vlm") as page:
        gr.Markdown("## qformer-vlm\nA BLIP-2-style model: Q-Former visual tokens read by a small language model.")
        with gr.Row():
            with gr.Column(scale=1):
                # PNG keeps the pixels the model sees equal to the file's (the default WebP is lossy).
                image = gr.Image(type="pil", format="png", sources=["upload", "clipboard"], label="Image",
                                 elem_id="image", height=320)
                if examples:
                    gr.Examples([[row["image"]] for row in examples], inputs=[image], label="Evaluation samples",
                                examples_per_page=len(examples), elem_id="examples")
                strategy = gr.Radio(list(GENERATION_PRESETS), value="greedy", label="Decoding")
                max_new_tokens = gr.Slider(1, 128, value=MAX_NEW_TOKENS, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                with gr.Row():
                    caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button", scale=0)
                    caption_box = gr.Textbox(label="Caption", interactive=False, elem_id="caption", scale=4)
                # Plain text: markdown would restyle a model's stray `*` or `#`.
                chat = gr.Chatbot(label="Chat about the image", elem_id="chat", height=260, render_markdown=False)
                about_the_image = [caption_box, chat]
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image, e.g. what color is the circle?",
                                          show_label=False, elem_id="question", scale=4)
                    ask_button = gr.Button("Ask", elem_id="ask-button", scale=0)
                if models.qformer is not None:
                    candidates = gr.Textbox(
                        value="\n".join(row["caption"] for row in examples[:CANDIDATES_FROM_EXAMPLES]), lines=4,
                        label="Captions to rank, one per line", elem_id="candidates",
                    )
                    rank_button = gr.Button("Rank by image-text similarity", elem_id="rank-button")
                    ranking = gr.Markdown(elem_id="ranking")
                    rank_button.click(on_rank, [image, candidates], ranking)
                    about_the_image.append(ranking)

        settings = [strategy, max_new_tokens]
        caption_button.click(on_caption, [image, *settings], caption_box)
        for event in (ask_button.click, question.submit):
            event(on_ask, [image, question, chat, *settings], [chat, question])
        # A new picture starts a new conversation: what was said about the previous one is cleared, in the browser
        # (no round trip to the server that could land after a first answer about the new picture).
        cleared = [[] if component is chat else "" for component in about_the_image]
        image.change(None, None, about_the_image, js=f"() => {json.dumps(cleared)}")
    return page


__all__ = ["PAGE_CSS", "build_app"]
