"""Stage-1 losses: image-text contrastive (ITC, gathered across processes) and image-text matching (ITM).

They are implemented in `modeling/qformer_losses.py`, beside the model, because `QFormerModel.forward` computes its
loss with them and `save_pretrained` ships only the model's own sibling files: a model loaded from the Hub must
compute the same loss as the one trained here. Training code imports them from this module.
"""

from modeling.qformer_losses import (
    MAX_LOGIT_SCALE,
    ContrastiveLossOutput,
    contrastive_loss,
    gather_with_grad,
    itm_loss,
    query_text_similarity,
    sample_itm_negatives,
)

__all__ = [
    "MAX_LOGIT_SCALE",
    "ContrastiveLossOutput",
    "contrastive_loss",
    "gather_with_grad",
    "itm_loss",
    "query_text_similarity",
    "sample_itm_negatives",
]
