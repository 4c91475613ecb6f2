"""retrofit: make pretrained Vision Transformers faster by inserting a PatchMerger, then fine-tuning it back.

The Python API mirrors the CLI::

    from retrofit import convert, insert_patch_merger, export, load_model, model_cost
"""

__version__ = "0.1.0"

from .convert import ConvertResult, convert  # noqa: E402
from .cost import Cost, model_cost  # noqa: E402
from .errors import RetrofitError  # noqa: E402
from .export import export  # noqa: E402
from .families import FAMILIES, Family, Head, register  # noqa: E402
from .loading import load_model  # noqa: E402
from .merger import PatchMerger  # noqa: E402
from .surgery import insert_patch_merger  # noqa: E402

__all__ = [
    "FAMILIES",
    "ConvertResult",
    "Cost",
    "Family",
    "Head",
    "PatchMerger",
    "RetrofitError",
    "convert",
    "export",
    "insert_patch_merger",
    "load_model",
    "model_cost",
    "register",
]
