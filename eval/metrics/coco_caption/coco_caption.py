"""COCO caption metrics as a local `evaluate` module: BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR).

The scores are pycocoevalcap's own scorers (the code behind the MS COCO caption leaderboard); this
module only tokenizes, lays the inputs out the way those scorers expect, and calls them once over
the whole set. Load it offline with `evaluate.load("<path to this folder>")`.

The file is self-contained on purpose: `evaluate.load` copies it into its module cache and imports
it from there, so it must not import from the rest of the project.
"""

import re
import shutil

import datasets
import evaluate
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

_DESCRIPTION = """\
Captioning metrics of the MS COCO caption evaluation (pycocoevalcap): BLEU-1..4, ROUGE-L, CIDEr-D,
and METEOR when a `java` executable is available. pycocoevalcap's `Cider` class is CIDEr-D (clipped
n-gram counts, a Gaussian length penalty with sigma 6, scaled by 10, no stemming), the variant the
COCO leaderboard prints; it is returned under the key `cider`. CIDEr-D's IDF weights come from the
references of the evaluated set, so scores are only comparable when computed over the same full set
in one call (never average per-batch CIDEr-D).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): the reference captions of each image (at least one each).
    tokenizer (`str`, default `"simple"`): `"simple"` is a pure-Python approximation of the COCO
        PTB tokenization (lowercase, clitics split, punctuation dropped); `"ptb"` runs
        pycocoevalcap's Stanford PTBTokenizer (needs `java`, writes a temporary file next to it).
    meteor (`bool | None`, default `None`): `None` adds METEOR when `java` is on PATH, `True`
        requires it, `False` leaves it out.
Returns:
    `bleu_1` .. `bleu_4`, `rouge_l`, `cider` (CIDEr-D), and `meteor` when computed; all floats.
Examples:
    >>> metric = evaluate.load("eval/metrics/coco_caption")
    >>> metric.compute(predictions=["a red circle"], references=[["a red circle", "a circle"]], meteor=False)
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh
          and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

# The tokens pycocoevalcap removes after PTB tokenization (its PUNCTUATIONS list, after -lowerCase,
# plus the plain double quote that PTB would have rewritten as `` or '' first). PTB's bracket
# tokens survive in coco-caption because the list spells them in upper case; we keep that quirk.
_DROPPED = frozenset({"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTB splits although they carry no apostrophe.
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"""(?:[a-z]\.){2,}                 # initialisms keep their dots: u.s., i.e.
      | n't | '(?:s|re|ve|ll|d|m)\b     # clitics, already split off their word
      | \w+(?:[-./&]\w+|[,:]\d+|'\w+)*  # words; inner hyphens, dots, slashes, 1,000 and 3:30 stay
      | \.{2,} | [.?!]+ | -+ | `+ | '+  # punctuation runs, one token each as in PTB
      | \S                              # any other symbol is a token of its own
    """,
    re.VERBOSE,
)


def coco_tokenize(text: str) -> str:
    """Tokenize a caption roughly as coco-caption's PTBTokenizer + punctuation removal would.

    Lowercases, splits clitics ("dog's" -> "dog 's", "don't" -> "do n't"), separates symbols,
    drops the punctuation coco-caption drops. Known differences from PTB: it does not know PTB's
    abbreviation list ("mr." loses its dot) or forms such as "'n'"; both are rare in captions.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = _CLITIC.sub(r"\1 \2", text)
    tokens = []
    for token in _TOKEN.findall(text):
        if re.fullmatch(r"\.{2,}", token):
            token = "..."
        token = _BRACKETS.get(token, _SPLIT_WORDS.get(token, token))
        if token not in _DROPPED:
            tokens.append(token)
    return " ".join(tokens)


def _java_missing_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} needs a `java` executable on PATH and none was found; install a JRE "
        "(e.g. `apt-get install default-jre-headless`) or use the default tokenizer='simple' / meteor=False."
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR) from pycocoevalcap, computed over the whole set."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]],
        tokenizer: str = "simple",
        meteor: bool | None = None,
    ) -> dict[str, float]:
        for index, refs in enumerate(references):
            if not refs:
                raise ValueError(f"references[{index}] is empty; every image needs at least one reference caption.")
        java = shutil.which("java") is not None
        if tokenizer == "simple":
            res = {i: [coco_tokenize(p)] for i, p in enumerate(predictions)}
            gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(references)}
        elif tokenizer == "ptb":
            if not java:
                raise _java_missing_error("tokenizer='ptb'")
            ptb = PTBTokenizer()
            res = ptb.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
            gts = ptb.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
        else:
            raise ValueError(f"tokenizer={tokenizer!r} is not known; use 'simple' or 'ptb'.")

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge_l, _ = Rouge().compute_score(gts, res)
        cider_d, _ = Cider().compute_score(gts, res)
        scores = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["rouge_l"] = float(rouge_l)
        scores["cider"] = float(cider_d)
        if meteor is True and not java:
            raise _java_missing_error("meteor=True")
        if meteor or (meteor is None and java):
            scorer = Meteor()
            scores["meteor"] = float(scorer.compute_score(gts, res)[0])
            del scorer  # its __del__ stops the java process now rather than at interpreter exit
        return scores
