"""End to end with the real SmolLM2-135M-Instruct on 4 of the demo's example users (slow)."""

from __future__ import annotations

import pytest
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.generation import bank_for_edits, chat_prompt, generate
from chameleon.core.model import load_model
from chameleon.data.artifacts import RunReader
from chameleon.data.published import PublishedRun
from chameleon.dev.demo import example_users
from chameleon.job.local import run_local

pytestmark = pytest.mark.slow


def test_real_model_edits_change_edited_users_only(tmp_path, local_store):
    import json

    records = example_users(n_per_style=1)[:4]  # four styles; no LaMP-7 data needed
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = ChameleonConfig().with_overrides(
        {
            "synth.pairs_per_user": 4,
            "synth.history_k": 3,
            "synth.insight_max_new_tokens": 32,
            "synth.answer_max_new_tokens": 24,
            "groups.n_groups": 2,
            "groups.min_group_size": 2,
            "synth.heldout_items": 2,
            # A fixed strength: this test is about which rows an edit reaches, not calibration
            # (which may rightly keep a group at strength 0).
            "edit.calibrate": False,
            "edit.strength": 0.3,
        }
    )
    model, tok = load_model(cfg.model)
    manifest = run_local(
        str(path), local_store, "real", cfg, model_and_tokenizer=(model, tok), progress=False
    )
    assert manifest.counts.users_with_edit == 4
    run = PublishedRun(RunReader(local_store, "real"))
    pairs = RunReader(local_store, "real").get_parquet("pairs/part-00000.parquet").to_pylist()
    assert any(p["personalized"] != p["neutral"] for p in pairs)

    users = [r["user_id"] for r in records]
    edits = [run.user_edit(u) for u in users]
    bank, rows = bank_for_edits(model, edits, cfg.edit)
    prompts = [chat_prompt(tok, r["query"]) for r in records]
    base = generate(model, tok, prompts, max_new_tokens=24)
    # Edited rows and identity rows in one batch: user i edited, the same prompt unedited beside it.
    mixed = generate(model, tok, prompts + prompts, max_new_tokens=24, bank=bank, rows=rows + [0] * 4)
    edited, identity = mixed[:4], mixed[4:]
    assert identity == base
    # Every edited user's next-token distribution moves; the greedy text changes for most users
    # (a 24-token paraphrase can survive a small shift of the distribution).
    enc = tok(prompts + prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        plain_logits = model(**enc).logits[:, -1]
        with bank.apply(model, rows + [0] * 4):
            edited_logits = model(**enc).logits[:, -1]
    assert torch.equal(edited_logits[4:], plain_logits[4:])
    assert ((edited_logits[:4] - plain_logits[:4]).abs().amax(-1) > 1e-3).all()
    changed = sum(e != b for e, b in zip(edited, base, strict=True))
    assert changed >= 2, list(zip(edited, base, strict=True))
