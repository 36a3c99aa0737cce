"""`python -m app`: a web page (Gradio) on a trained model: caption an image, chat about it, rank captions by
image-text similarity. The models' side is `app.chat`, the page `app.ui`, the command line `app.__main__`.

    python -m app --model outputs/demo/vlm [--qformer outputs/demo/qformer] [--examples <shards>] [--port 7860]
"""
