"""Export a trained checkpoint's model for serving.

    python export.py -r saved/models/NAME/RUN/model_best.pth --format onnx [-o model.onnx]
    python export.py -r CKPT --format {torchscript,onnx,exported_program} [key.path=VALUE ...]

The model is exported in eval mode with a dynamic batch dimension, checked against the
eager model on real inputs before it is written, and its preprocessing (size, mean, std,
class names) is written beside it as ``<file>.preprocess.json``. The command line is
:func:`parts.export.export_command`; the work is :func:`parts.export.export_checkpoint`.
"""

import sys

from parts.export import export_command

if __name__ == "__main__":
    sys.exit(export_command(sys.argv[1:]))
