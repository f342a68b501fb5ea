"""fervit: facial emotion recognition with Vision Transformers on FER-2013."""

__version__ = "0.1.0"
