"""What a run stopping early (a signal, a hook's ``ask_to_stop``) needs and a default run does not, imported then:
the resumable ``last.pth``, and where a resume continues (the words ``utils/resume.py`` repeats when it does); and
the line of a stop during the test scoring after training (trainer/run.py: end)."""

import signal

from utils import dist_round


def save_last(trainer):
    """Write ``last.pth`` for ``trainer.stop`` (every process takes part) and say how to resume; returns the
    arguments of the ``RunStopped`` the loop raises."""
    stop, where = trainer.stop, dist_round.torchrun_round()
    trainer.stopped_by = {"exit_code": stop.exit_code, "why": stop.why,
                          **({"torchrun_run_id": where[0], "torchrun_round": where[1]} if where else {})}
    path = trainer.save_resumable("last.pth")
    if trainer.is_main:
        trainer.logger.warning(f"Stopped {stop.why} after step {trainer.global_step}; a resume continues at"
                               f" {continues_at(trainer)}. Resume with: python train.py -r {path} (or the same"
                               " command with -r auto)")
    return {"message": f"stopped {stop.why}; a resumable checkpoint is in last.pth", "exit_code": stop.exit_code,
            "logged": trainer.is_main}


def continues_at(trainer):
    """Where a run resumed from ``trainer``'s current state goes on: "epoch 2, batch 5 of 41" (both counted from 1),
    or the validation of an epoch whose batches are all done."""
    epoch, batch, of = trainer.epoch + 1, trainer.batch_in_epoch + 1, trainer.batches_per_epoch()
    return f"epoch {epoch}, batch {batch} of {of}" if batch <= of else f"the validation of epoch {epoch}"


def scoring_stopped(checkpoint, signum, before=False):
    """The arguments of the ``RunStopped`` of stop signal ``signum`` during the test scoring after training (``before``:
    during the last validation): the training is complete and ``result.json`` written (without the test values), so
    it says how to score the test."""
    return {"message": f"{signal.Signals(signum).name} {'before' if before else 'during'} the test scoring: training"
                       " is complete (result.json is"
                       f" written, without test values); score it with: python test.py -r {checkpoint}"
                       " (or the same command with -r auto)", "exit_code": 128 + signum}
