"""aiayn.packed_encoder: the encoder over real tokens only equals `Transformer.encode` there.

The reference is the model's own encoder on the padded batch. Searches through
`StaticDecoding`, which encodes this way on a CPU, are compared with the reference searches in
tests/test_decoding_model.py and tests/test_frozen_decoder.py.
"""

from __future__ import annotations

import pytest
import torch

from aiayn.config import TransformerConfig
from aiayn.errors import DataError
from aiayn.model import Transformer
from aiayn.packed_encoder import packed_encode

PAD = 0
LAYOUTS = [
    dict(),
    dict(norm="pre"),
    dict(activation="gelu", positions="learned", attention="reference"),
    dict(activation="silu", embedding_norm=True, scale_embeddings=False),
]


def make_model(**options) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=29, max_len=32, **options)
    model = Transformer(cfg)
    with torch.no_grad():  # non-zero biases and norms, so that each one is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("options", LAYOUTS, ids=lambda o: ",".join(o) or "paper")
def test_real_positions_equal_the_models_encoder(options: dict) -> None:
    model = make_model(**options)
    src = torch.randint(3, 29, (4, 9), generator=torch.Generator().manual_seed(1))
    src[1, 6:] = PAD
    src[2, 1:] = PAD  # one real token
    src[3, :] = PAD  # only padding: computed whole, as `encode` does (an empty sentence)
    read = src.ne(PAD)  # the positions a decoder attends to
    read[3] = True
    with torch.inference_mode():
        packed = packed_encode(model, src)
        full = model.encode(src)
    assert packed.shape == full.shape
    torch.testing.assert_close(packed[read], full[read], rtol=1e-12, atol=1e-12)
    assert bool(packed[~read].eq(0).all())
    # Not true of any encoder output: the real positions differ from one another.
    assert (packed[0, 0] - packed[0, 1]).abs().max() > 1e-3


def test_ids_are_checked_as_encode_checks_them() -> None:
    model = make_model()
    with pytest.raises(DataError, match="src_ids"):
        packed_encode(model, torch.full((2, 3), 99))
