"""Fine-tune the encoder on one session's examples (DESIGN step 8).

sentence-transformers' `SentenceTransformerTrainer` with `MultipleNegativesRankingLoss` (InfoNCE
over in-batch negatives plus the hard-negative column; Henderson et al. 2017), or its GradCache
version `CachedMultipleNegativesRankingLoss` (Gao et al. 2021) when `mini_batch_size` is set:
the same loss over the whole batch while only `mini_batch_size` texts are embedded at a time.

Compatible update mode (issue 14). Given `CompatibilityTargets` (the stored old-model vectors of
each example's positive and negative document), the loss is `BackwardCompatibleLoss`
(`tasks.compatibility_loss`): the same ranking loss plus a BCT / L2R term that keeps the new
query embeddings comparable with the stored vectors, so old document vectors need no
re-embedding. The vectors travel as the dataset's `label` column (2*d floats per row). Not
combined with `mini_batch_size` (GradCache).

Order of training. With a `batch_order` (from `tasks.batching.plan_batches`) the trainer gets
exactly those batches, in that order, through a fixed batch sampler: one pass, one optimizer
step per batch. Without one, steps follow `tasks.batching.training_budget` and the batches come
from sentence-transformers' no-duplicates sampler (no text twice in a batch), seeded.

Reproducibility. The model is loaded fresh from `model_path` (never the process-wide encoder
cache, which training would modify) and the trainer seeds Python, numpy and torch with `seed`, so
the same inputs and seed give the same weights bit for bit on the CPU (same thread count). GPU
kernels may differ in the last bits.

Outputs under `out_dir`: `model/` (safetensors weights plus the sentence-transformers config;
its digest is `tasks.models.model_version`), `tensorboard/` (loss curve, only when the
`tensorboard` package is importable), `trainer/` (the trainer's scratch; no checkpoints).

Progress. Optimizer steps are reported through `infra.progress.Progress` under the key
`train-<session>`: a Prefect progress artifact inside a run, a terminal bar when the CLI enabled
bars (the trainer's own tqdm bars stay off).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftlane.infra.config import FinetuneConfig
from driftlane.infra.logs import module_logger
from driftlane.infra.progress import Progress
from driftlane.tasks.batching import training_budget
from driftlane.tasks.models import model_version, resolve_device

if TYPE_CHECKING:
    from driftlane.tasks.compatibility_loss import CompatibilityTargets

__all__ = ["FINETUNE_VERSION", "fine_tune", "tensorboard_available"]

logger = module_logger(__name__)

# Bump when `fine_tune` changes what it computes for the same inputs (part of cache keys).
# 4: fine_tune_session returns a TrainedModel; 5: the compatible update mode (`compatibility`)
FINETUNE_VERSION = "5"


def tensorboard_available() -> bool:
    """Whether TensorBoard logs can be written (the `tensorboard` package is importable)."""
    return importlib.util.find_spec("tensorboard") is not None


def _training_frame(examples: pd.DataFrame, use_negatives: bool) -> tuple[pd.DataFrame, str]:
    """anchor, positive (and negative) text columns in that order; why negatives were dropped."""
    missing = {"anchor", "positive"} - set(examples.columns)
    if missing:
        raise ValueError(f"examples lack the columns {sorted(missing)}")
    columns = ["anchor", "positive"]
    reason = ""
    if "negative" in examples.columns and use_negatives:
        absent = int(examples["negative"].isna().sum())
        if absent:
            reason = (f"{absent} of {len(examples)} examples have no negative: training on "
                      "in-batch negatives only")
        else:
            columns.append("negative")
    frame = examples[columns]
    for column in columns:
        if frame[column].isna().any():
            raise ValueError(f"examples have missing {column} texts")
    return frame.astype(str).reset_index(drop=True), reason


def _training_progress(session: str) -> Any:
    """A `TrainerCallback` that reports optimizer steps as `Progress("train-<session>")`."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
            self.progress = Progress(key=f"train-{session}", total=state.max_steps,
                                     description=f"training {session}", unit="steps")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return TrainingProgress()


def _fixed_batch_sampler(batches: list[list[int]]) -> Any:
    """A sentence-transformers batch-sampler factory that yields exactly `batches`."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class FixedBatchSampler(DefaultBatchSampler):
        def __iter__(self):
            yield from (list(batch) for batch in batches)

        def __len__(self) -> int:
            return len(batches)

    def factory(dataset, batch_size, drop_last, valid_label_columns=None, generator=None,
                seed=0):
        return FixedBatchSampler(dataset, batch_size=batch_size, drop_last=False,
                                 valid_label_columns=valid_label_columns, generator=generator,
                                 seed=seed)

    return factory


def _build_trainer(model_path: str, frame: pd.DataFrame, config: FinetuneConfig, out_dir: Path,
                   batches: list[list[int]] | None, steps: int, seed: int,
                   session: str = "model",
                   compatibility: CompatibilityTargets | None = None) -> Any:
    """The model (loaded fresh) and a configured `SentenceTransformerTrainer`.

    session: names the run in progress reports (`train-<session>`). compatibility: stored
    old-model vectors per row of `frame`: train with `BackwardCompatibleLoss`, the vectors as
    the dataset's `label` column.
    """
    if compatibility is not None and config.mini_batch_size is not None:
        raise ValueError("the compatibility term does not support mini_batch_size (GradCache): "
                         "unset mini_batch_size to train in compatible mode")
    if compatibility is not None and len(compatibility.vectors) != len(frame):
        raise ValueError(f"compatibility vectors cover {len(compatibility.vectors)} examples, "
                         f"not the {len(frame)} examples")
    import transformers
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    device = resolve_device(config.device)
    transformers.set_seed(seed)  # before loading: any freshly initialized layer is seeded too
    model = SentenceTransformer(model_path, device=device, local_files_only=True)
    # Train on short sequences; fine_tune puts the model's own limit back before saving, so
    # the training length never changes how later sessions embed.
    model.inference_max_seq_length = model.max_seq_length
    model.max_seq_length = config.max_seq_length
    if compatibility is not None:
        from driftlane.tasks.compatibility_loss import BackwardCompatibleLoss

        if compatibility.vectors.shape[2] != model.get_embedding_dimension():
            raise ValueError(f"compatibility vectors have {compatibility.vectors.shape[2]} "
                             f"dimensions, not the model's {model.get_embedding_dimension()}")
        loss = BackwardCompatibleLoss(model, scale=config.scale, weight=compatibility.weight)
    elif config.mini_batch_size is not None:
        loss = CachedMultipleNegativesRankingLoss(model, scale=config.scale,
                                                  mini_batch_size=config.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=config.scale)
    callbacks = [_training_progress(session)]
    if tensorboard_available():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(out_dir / "tensorboard"))))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        # whole warm-up steps, rounded down: a 1-step session must not run at learning rate 0
        warmup_steps=int(config.warmup_ratio * steps),
        lr_scheduler_type="linear",
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        logging_steps=config.log_every_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",  # TensorBoard goes through our own callback, into out_dir
        use_cpu=device == "cpu",
        disable_tqdm=True,  # progress goes through infra.progress: one bar per stage
        dataloader_num_workers=0,
        batch_sampler=(_fixed_batch_sampler(batches) if batches is not None
                       else BatchSamplers.NO_DUPLICATES),
    )
    columns: dict[str, Any] = {c: frame[c].tolist() for c in frame.columns}
    if compatibility is not None:
        # the collator stacks it into (batch, 2*d) `labels` for the loss; samplers ignore it
        columns["label"] = compatibility.label_rows()
    dataset = Dataset.from_dict(columns)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=loss, callbacks=callbacks)
    # Without tqdm the trainer prints every log dict to stdout; the loss goes to TensorBoard,
    # the run's log and the progress report instead.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return model, trainer


def _save_model(model: Any, out_dir: Path) -> tuple[Path, str]:
    """Save as safetensors into a fresh staging folder, then move it to `out_dir/model`.

    A retried run replaces the folder of an earlier attempt; `model_version` caches digests by
    folder path, so the digest is taken on the fresh staging path (it hashes relative names and
    bytes, so it does not depend on the folder's name).
    """
    model_dir = out_dir / "model"
    staging = out_dir / f".model-{uuid.uuid4().hex}"
    model.save(str(staging), create_model_card=False, safe_serialization=True)
    version = model_version(str(staging))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    return model_dir, version


def fine_tune(
    model_path: str,
    examples: pd.DataFrame,
    config: FinetuneConfig,
    out_dir: str | Path,
    batch_order: Sequence[Sequence[int] | np.ndarray] | None = None,
    seed: int | None = None,
    session: str = "model",
    compatibility: CompatibilityTargets | None = None,
) -> dict[str, Any]:
    """Fine-tune the model at `model_path` on `examples`, save it under `out_dir/model`.

    examples: DataFrame(anchor, positive[, negative]) of texts (`tasks.sampling.training_texts`).
    A negative column with a missing value, or `config.hard_negatives` off, means in-batch
    negatives only. batch_order: row positions per batch (one optimizer step each), e.g.
    `plan_batches(...).batches`; None: `training_budget` steps of no-duplicate random batches.
    seed: defaults to `config.seed`. session: names the run in progress reports (key
    `train-<session>`); it does not change what is trained. compatibility: the compatible
    update mode, stored old-model vectors per row of `examples` (`tasks.compatibility_loss`);
    None trains as before. Not with `config.mini_batch_size` (ValueError).

    Returns a JSON-ready dict: model_path, model_version (digest of the saved folder), steps,
    final_loss (mean of the last logging period), mean_loss (whole run), train_seconds,
    n_examples, loss (class name), device, hard_negatives, notes, tensorboard_dir (or None),
    loss_history ([step, loss] pairs). In compatible mode also compatibility: weight,
    n_examples_with_stored_vectors (examples with a stored vector for a document they train
    on); the log history then also holds the parts `ranking` and `compatibility` (weighted).
    """
    seed = config.seed if seed is None else seed
    out_dir = Path(out_dir).expanduser()
    frame, note = _training_frame(examples, config.hard_negatives)
    notes = [note] if note else []
    if not tensorboard_available():
        notes.append("tensorboard is not installed: no TensorBoard logs")
    if not len(frame):
        raise ValueError("no training examples")
    batches = None
    if batch_order is not None:
        batches = [np.asarray(b, dtype=np.int64).tolist() for b in batch_order]
        flat = [i for b in batches for i in b]
        if not batches or not all(batches) or min(flat) < 0 or max(flat) >= len(frame):
            raise ValueError(
                f"batch_order must hold non-empty batches of rows in [0, {len(frame)})")
        steps = len(batches)
    else:
        steps = training_budget(len(frame), config).steps
    for line in notes:
        logger.info(line)

    model, trainer = _build_trainer(model_path, frame, config, out_dir, batches, steps, seed,
                                    session=session, compatibility=compatibility)
    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    model.max_seq_length = model.inference_max_seq_length
    model_dir, version = _save_model(model, out_dir)
    history = [[int(e["step"]), float(e["loss"])] for e in trainer.state.log_history
               if "loss" in e]
    result = {
        "model_path": str(model_dir),
        "model_version": version,
        "steps": int(output.global_step),
        "final_loss": history[-1][1] if history else float(output.training_loss),
        "mean_loss": float(output.training_loss),
        "train_seconds": round(train_seconds, 3),
        "n_examples": len(frame),
        "loss": type(trainer.loss).__name__ if not isinstance(trainer.loss, dict) else "dict",
        "device": str(model.device),
        "hard_negatives": "negative" in frame.columns,
        "notes": notes,
        "tensorboard_dir": str(out_dir / "tensorboard") if tensorboard_available() else None,
        "loss_history": history,
    }
    if compatibility is not None:
        documents = len(frame.columns) - 1  # positive[, negative]: the columns the loss saw
        result["compatibility"] = {
            "weight": float(compatibility.weight),
            "n_examples_with_stored_vectors": compatibility.n_with_stored(documents),
        }
    return result
