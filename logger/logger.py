"""Console and file logging for a run, set up by ``trainer.run.open_run`` (never at import)."""

import logging
import sys

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def setup_logging(log_dir=None, verbosity=2, name="train"):
    """Log to the console at ``verbosity`` and, when ``log_dir`` is given, everything to ``log_dir/info.log``.

    Calling it again (a second run in one process, as the tests do) replaces the handlers.
    """
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = _ConsoleHandler(sys.stdout)
    console.setLevel(LEVELS[verbosity])
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_dir is not None:
        file = logging.FileHandler(f"{log_dir}/info.log", encoding="utf-8")
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    return logger


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts an active progress bar off the line and redraws it below the message,
    so log lines never leave fragments of a bar on screen."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def close_logging(name="train"):
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
