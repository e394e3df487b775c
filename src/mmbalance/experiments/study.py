"""The Optuna side of ``mmbalance tune``: storage, sampler, pruner, and a trial's training.

Imported only once Optuna is known to be installed (``tune.require_optuna``).

- **Trials train in memory.** A trial is a ``Trainer`` without a run folder: it
  writes nothing, reports each epoch's validation accuracy to the study (the
  curve the pruner reads) and its value is the best of them, the accuracy of
  the checkpoint a run would keep. It never evaluates the test split. A pruned
  trial leaves nothing to clean up; the study keeps its parameters and curve.
- **Resume draws what an uninterrupted study would.** A sampler seeded once
  repeats its first draws when a stopped study starts again. Here each trial
  gets a fresh TPE sampler seeded by (study seed, the trial's place among the
  trials that did not fail), so after a kill the trial that replaces the
  killed one samples the same parameters, and, training being deterministic,
  the study continues as if never stopped.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState

from ..config import RunConfig
from ..data.base import DataBundle
from ..errors import MMBalanceError, NonFiniteLossError
from ..search_space import Range
from ..training.trainer import Trainer

#: random trials before TPE models the results, and before the pruner compares curves
STARTUP_TRIALS = 5
#: with a shared ``--storage``: each worker's heartbeat, and how long a silent trial counts as running
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialSeededTPE(BaseSampler):
    """TPE whose randomness for a trial follows from (seed, the trial's place among trials that did not fail)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)

    def before_trial(self, study, trial) -> None:
        failed = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number < trial.number)
        place = trial.number - failed
        seed = int(np.random.SeedSequence([self.seed, place]).generate_state(1)[0])
        self._tpe = TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def pruner_warmup(epochs: int) -> int:
    """Epochs a trial always trains before the pruner may stop it: a third of the run.

    The first epochs of balancing methods are noisy (warm-ups, modulation
    windows that open later), so a median taken there prunes good settings.
    """
    return max(1, epochs // 3)


def open_study(url: str, name: str, seed: int, shared: bool, epochs: int = 3) -> optuna.Study:
    """Create or load the study; ``shared``: other processes may run it too (heartbeats mark their dead trials)."""
    beats = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS} if shared else {}
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they are what a shared study needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, **beats)
        return optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True,
            sampler=TrialSeededTPE(seed), pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=pruner_warmup(epochs)),
        )
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as exc:
        raise MMBalanceError(f"cannot open the study database {hide_password(url)}: {_first_line(exc)}") from None
    except Exception as exc:  # the database driver's own errors (sqlalchemy): unreachable host, bad file
        raise MMBalanceError(f"cannot open the study database {hide_password(url)}: {type(exc).__name__}: {_first_line(exc)}") from None


def delete_study(url: str, name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass  # nothing stored under that name yet


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark the study's running trials failed: call only when no other process can be running them."""
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=TrialState.FAIL)
    return stale


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class TrialTrainer(Trainer):
    """A run inside a study: no folder, each epoch's validation accuracy reported, never a read of test."""

    def __init__(self, config: RunConfig, trial: optuna.Trial, bundle: DataBundle):
        super().__init__(config, None, quiet=True, bundle=bundle)
        self.trial = trial

    def evaluate(self, split: str) -> dict:
        if split == "test":
            raise MMBalanceError("a tuning trial must not evaluate the test split")
        metrics = super().evaluate(split)
        if split == "val":  # the trainer's evaluation after each epoch (a trial never reaches the final report)
            epoch = self.state["epoch"] + 1
            self.trial.report(metrics[self.selection_metric], epoch)  # accuracy; micro-F1 on multi-label data
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")
        return metrics

    def finish(self) -> dict:
        """The trial's value: the best validation accuracy (the selection metric: micro-F1 on multi-label data)."""
        return {"val_accuracy": self.state["best_val_score"], "best_epoch": self.state["best_epoch"]}


def objective(base: RunConfig, space: dict[str, Range], bundle: DataBundle) -> Callable[[optuna.Trial], float]:
    """The function the study maximises: sample every key of ``space``, train, return the best validation accuracy."""

    def run(trial: optuna.Trial) -> float:
        params = {key: value.suggest(trial, key) for key, value in space.items()}
        trainer = TrialTrainer(base.replace(**params), trial, bundle)
        try:
            result = trainer.fit()
        except NonFiniteLossError as exc:  # a diverging setting is a bad setting, not a broken study
            trial.set_user_attr("stopped", "non-finite loss")
            raise optuna.TrialPruned(_first_line(exc)) from None
        finally:
            trainer.dist.shutdown()
        trial.set_user_attr("best_epoch", result["best_epoch"])
        return float(result["val_accuracy"])

    return run


def quiet_optuna():
    """Optuna's own log lines (and its tracebacks of failed trials) off; mmbalance logs one line per trial."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return lambda: optuna.logging.set_verbosity(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as a plain record: number, state, value, epochs trained, best epoch value so far, parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        rows.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value if t.state == TrialState.COMPLETE else None,  # Optuna gives pruned ones their last epoch's
            "epochs": len(curve),
            "reached": max(curve) if curve else None,
            "params": dict(t.params),
            "note": t.user_attrs.get("stopped", ""),
        })
    return rows
