"""captioner: Show and Tell image captioning (pretrained CNN encoder, LSTM decoder, beam search, COCO metrics)."""
from .errors import CaptionerError
from .inference import Caption, Captioner

__version__ = "0.1.0"
__all__ = ["Captioner", "Caption", "CaptionerError", "__version__"]
