"""The map stage's progress: one live line with users done/total, users/s, tokens/s, failures so
far and an ETA while the job runs, and the same figures in the manifest's timings."""

from __future__ import annotations

import io

from chameleon.core.generation import chat_prompt, count_generated_tokens, generate
from chameleon.job.progress import MapProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_off_a_terminal_with_rates_failures_and_eta():
    clock, out = Clock(), io.StringIO()
    line = MapProgress(1000, resumed=200, interval_s=30, stream=out, clock=clock)
    clock.now += 10
    line.update(100, failed=2, tokens=5000)  # before the interval: nothing printed yet
    assert out.getvalue() == ""
    clock.now += 30
    line.update(100, failed=1, tokens=3000)
    printed = out.getvalue().splitlines()
    # 400 of 1000 done (200 resumed); 200 users in 40 s = 5/s; 8000 tokens / 40 s; 600 left = 2 min.
    assert printed == ["map: users 400/1,000 (40%) | 5.0 users/s | 200 tok/s | 3 failed | ETA 2m00s"]
    clock.now += 20
    line.update(100, tokens=2000)  # 20 s after the last line: still quiet
    assert len(out.getvalue().splitlines()) == 1
    line.close()
    assert out.getvalue().splitlines()[-1].startswith("map: users 500/1,000 (50%) | 5.0 users/s")
    assert line.figures() == {
        "map_users": 300,
        "map_users_failed": 3,
        "map_users_resumed": 200,
        "map_tokens": 10000,
        "map_users_per_s": 5.0,
        "map_tokens_per_s": 10000 / 60,
    }


def test_disabled_progress_prints_nothing_but_keeps_the_figures():
    clock, out = Clock(), io.StringIO()
    line = MapProgress(10, enabled=False, interval_s=0, stream=out, clock=clock)
    clock.now += 2
    line.update(4, tokens=8)
    line.close()
    assert out.getvalue() == "" and line.figures()["map_users_per_s"] == 2.0


def test_a_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    line = MapProgress(8, stream=out)
    line.update(4, failed=1, tokens=40)
    line.close()
    text = out.getvalue()
    assert "8/8" not in text and "4/8" in text and "1 failed" in text and "tok/s" in text


def test_generated_tokens_are_counted_per_block(tiny_model_dir):
    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = [chat_prompt(tok, "hello there"), chat_prompt(tok, "a longer message about the weather")]
    with count_generated_tokens() as outer:
        with count_generated_tokens() as inner:
            answers = generate(model, tok, prompts, max_new_tokens=5)
        generate(model, tok, prompts[:1], max_new_tokens=3)
    made = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert 0 < inner.tokens <= 10 and made <= inner.tokens + 2
    assert outer.tokens > inner.tokens
    generate(model, tok, prompts[:1], max_new_tokens=3)  # outside any block: nobody counts
    assert outer.tokens <= inner.tokens + 3


def test_the_in_process_jobs_manifest_has_the_figures(published_tiny_run):
    _store, manifest, _model_dir = published_tiny_run
    t, c = manifest.timings_s, manifest.counts
    assert t["map_users"] == c.accepted and t["map_users_failed"] == c.users_failed
    assert t["map_users_resumed"] == 0
    assert t["map_tokens"] > 0 and t["map_users_per_s"] > 0 and t["map_tokens_per_s"] > 0
