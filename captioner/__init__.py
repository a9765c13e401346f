"""captioner: Show and Tell image captioning (pretrained CNN encoder, LSTM decoder, beam search, COCO metrics).

`from captioner import Captioner` loads torch; the command line's parsing and --help do not.
"""
from .config import Decoding
from .errors import CaptionerError

__version__ = "0.1.0"
__all__ = ["Captioner", "Caption", "CaptionerError", "Decoding", "__version__"]


def __getattr__(name: str):
    if name in ("Captioner", "Caption"):
        from . import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
