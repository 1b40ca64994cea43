"""Predict with a trained checkpoint.

    python predict.py -r saved/models/NAME/RUN/model_best.pth photos/ cat.png [-o predictions.csv]
    python predict.py -r CKPT table.csv --json --top-k 2 [-d cpu] [key.path=VALUE ...]

INPUTs are image files, folders of images (recursively) or CSV files with the training
table's feature columns. One row per input: its path (and CSV row number), the predicted
class, its probability and the top-k classes. The command line is
:func:`parts.predict.predict_command`; the work is :func:`parts.predict.predict`.
"""

import sys

from parts.predict import predict_command

if __name__ == "__main__":
    sys.exit(predict_command(sys.argv[1:]))
