"""The detector stage: Detectron2 Faster R-CNN -> bottom-up-attention regions.

Importing it quiets three messages that upstream Detectron2 triggers inside torch 2.x on every
run and that no user can act on: ``torch.jit.script`` deprecation (its layers), the
``torch.meshgrid`` indexing notice (its anchor generator) and the ``is_fx_tracing`` log line
(its wrappers). Nothing else is filtered.
"""

import logging
import warnings

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning
)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
