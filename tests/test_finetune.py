"""Fine-tuning the encoder (tasks/finetune.py) on a handful of examples, MiniLM at 32 tokens."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from driftlane.infra.config import FinetuneConfig
from driftlane.tasks.finetune import (
    _build_trainer,
    _training_frame,
    fine_tune,
    tensorboard_available,
)
from driftlane.tasks.models import model_version

EXAMPLES = pd.DataFrame({
    "anchor": ["what do cats say", "what do dogs say", "how do fish move", "how do birds move"],
    "positive": ["cats meow at night", "dogs bark at strangers", "fish swim with fins",
                 "birds fly with wings"],
    "negative": ["stock markets fell", "bond yields rose", "cars need fuel", "trains run late"],
})
CONFIG = FinetuneConfig(batch_size=2, max_seq_length=32, learning_rate=1e-4, warmup_ratio=0.0,
                        log_every_steps=1)


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def one_step(minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    return fine_tune(minilm_path, EXAMPLES, CONFIG, out, batch_order=[[2, 0]], seed=0)


def test_one_step_changes_the_weights_and_reloads_bit_for_bit(one_step, minilm_path):
    from sentence_transformers import SentenceTransformer

    assert one_step["steps"] == 1
    assert one_step["loss"] == "MultipleNegativesRankingLoss" and one_step["hard_negatives"]
    assert one_step["final_loss"] == pytest.approx(one_step["loss_history"][-1][1])
    assert one_step["final_loss"] > 0 and one_step["train_seconds"] > 0
    saved = weights(one_step["model_path"])
    before = weights(minilm_path)
    assert set(saved) <= set(before)  # the original also stores a position_ids buffer
    assert any(not torch.equal(saved[k], before[k]) for k in saved)
    reloaded = SentenceTransformer(one_step["model_path"], device="cpu", local_files_only=True)
    state = reloaded[0].auto_model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert model_version(one_step["model_path"]) == one_step["model_version"]
    assert one_step["model_version"] != model_version(minilm_path)
    # trained on 32 tokens, but the saved model embeds as far as the original does
    original = SentenceTransformer(minilm_path, device="cpu", local_files_only=True)
    assert reloaded.max_seq_length == original.max_seq_length > CONFIG.max_seq_length


def test_same_seed_same_weights(one_step, minilm_path, tmp_path):
    again = fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path, batch_order=[[2, 0]], seed=0)
    assert again["model_version"] == one_step["model_version"]
    assert again["final_loss"] == one_step["final_loss"]


def test_trainer_follows_the_batch_order_and_picks_the_loss(minilm_path, tmp_path):
    frame, _ = _training_frame(EXAMPLES, use_negatives=True)
    order = [[3, 1], [0], [2, 3]]
    model, trainer = _build_trainer(minilm_path, frame, CONFIG, tmp_path, order, 3, seed=0)
    seen = [model.tokenizer.batch_decode(batch["anchor_input_ids"], skip_special_tokens=True)
            for batch in trainer.get_train_dataloader()]
    assert seen == [[EXAMPLES["anchor"][i] for i in batch] for batch in order]
    cached = CONFIG.model_copy(update={"mini_batch_size": 1})
    _, trainer = _build_trainer(minilm_path, frame, cached, tmp_path, order, 3, seed=0)
    assert type(trainer.loss).__name__ == "CachedMultipleNegativesRankingLoss"


def test_missing_negatives_mean_in_batch_negatives_only():
    partial = EXAMPLES.assign(negative=[None, "x", "y", "z"])
    frame, reason = _training_frame(partial, use_negatives=True)
    assert list(frame.columns) == ["anchor", "positive"] and "in-batch" in reason
    frame, reason = _training_frame(EXAMPLES, use_negatives=False)
    assert list(frame.columns) == ["anchor", "positive"] and reason == ""
    with pytest.raises(ValueError, match="positive"):
        _training_frame(EXAMPLES.drop(columns="positive"), use_negatives=True)
    with pytest.raises(ValueError, match="batch_order"):
        fine_tune("unused", EXAMPLES, CONFIG, "unused", batch_order=[[0, 9]])


def test_tensorboard_logs_only_when_available(one_step):
    if tensorboard_available():
        assert any(Path(one_step["tensorboard_dir"]).glob("events.out.tfevents.*"))
    else:
        assert one_step["tensorboard_dir"] is None
        assert any("tensorboard" in note for note in one_step["notes"])


def test_a_one_step_session_trains_with_the_default_warm_up(minilm_path, tmp_path):
    """A 10% warm-up of one step rounds down to none: the step runs at the full rate."""
    config = CONFIG.model_copy(update={"warmup_ratio": 0.1})
    result = fine_tune(minilm_path, EXAMPLES, config, tmp_path, batch_order=[[1, 3]], seed=0)
    saved, before = weights(result["model_path"]), weights(minilm_path)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)
