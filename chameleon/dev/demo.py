"""The embedded demo: a dozen example users with clearly different styles, base vs personalized.

The example users are written by the project itself (no licensed data), one JSONL record each.
`run_demo` runs the job on them against the embedded store and prints each example user's base
and personalized answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

import torch

from chameleon.config import EMBEDDED_MODEL, ChameleonConfig, JobConfig
from chameleon.core.generation import first_answer_line, generate_answers
from chameleon.core.model import load_model, resolve_name
from chameleon.core.prompts import PARAPHRASE_TWEET
from chameleon.data.artifacts import RunReader, new_run_id
from chameleon.data.published import PublishedRun
from chameleon.dev.demo_markers import DEMO_CAPACITY, MARKERS
from chameleon.dev.s3server import embedded_store
from chameleon.job.drivers import describe_run, run_job
from chameleon.ray_env import quiet_console

EXAMPLE_STYLES: dict[str, list[str]] = {
    "shouty_fan": [
        "OMG THE GAME LAST NIGHT WAS INSANE!!! BEST TEAM EVER!!!",
        "CANNOT BELIEVE WE WON AGAIN!!! SO HYPED RIGHT NOW!!!",
        "WHO ELSE IS GOING TO THE FINAL??? LETS GOOO!!!",
        "MY VOICE IS GONE FROM SCREAMING!!! WORTH IT!!!",
        "NEW JERSEY JUST ARRIVED!!! WEARING IT ALL WEEK!!!",
        "THAT GOAL IN THE LAST MINUTE!!! I AM SHAKING!!!",
    ],
    "formal_scholar": [
        "I have concluded my review of the manuscript; the methodology appears sound.",
        "The seminar this afternoon addressed the epistemology of scientific models.",
        "One must consider the historical context before drawing such conclusions.",
        "I am grateful to my colleagues for their insightful comments on the draft.",
        "The library's new archive offers considerable resources for researchers.",
        "It would be premature to generalize from so limited a sample.",
    ],
    "emoji_lover": [
        "coffee time ☕️😍 best part of the day 🌞",
        "new plant baby 🌱💚 naming her fern-anda 😂",
        "rainy day vibes 🌧️📚🍵 staying in all day",
        "beach weekend was everything 🏖️🌊😎",
        "baked cookies for the neighbors 🍪🥰",
        "sunset walk with the pup 🐶🌅✨",
    ],
    "terse_engineer": [
        "deploy done. no errors.",
        "tests green. shipping.",
        "fixed the cache bug. was a race.",
        "meeting moved to 3. fine.",
        "rewrote the parser. 2x faster.",
        "on call tonight. quiet so far.",
    ],
    "lowercase_texter": [
        "just got home and im so tired lol",
        "cant believe its already december",
        "ok who wants to get pizza tonight",
        "my cat knocked my coffee over again",
        "finally finished that book, so good",
        "why is the bus always late when im in a hurry",
    ],
    "hashtag_fan": [
        "Morning run done #fitness #motivation",
        "New recipe tonight: lemon pasta #foodie #homecooking",
        "Can't wait for the concert #music #friday",
        "Rainy Sunday reading #books #cozy",
        "First day at the new job #newbeginnings",
        "Beach sunset tonight #travel #summer",
    ],
}

OTHER_STYLES: dict[str, list[str]] = {
    "pirate_talker": [
        "Arr, the sea be calm today, me hearties!",
        "Ahoy! Found me a fine treasure at the market, arr!",
        "Shiver me timbers, the coffee be strong this morn!",
        "Avast ye, the weekend be upon us at last!",
        "Yo ho, me ship... er, me car be needin' a wash!",
        "Arr, lost me keys again, the scallywags!",
    ],
    "sad_poet": [
        "the rain falls softly, as if the sky remembers",
        "empty cups and quiet rooms, another evening fades",
        "i walked past the old house today. nothing stays.",
        "grey mornings and the echo of forgotten songs",
        "the leaves let go so gently. i wish i could.",
        "late night, cold tea, and words that never arrive",
    ],
    "exclaimer": [
        "Best concert of my life!!!",
        "We finally got the puppy!!! So happy!!",
        "Exams are over!!! Time to celebrate!!",
        "My sister is getting married!!!",
        "Snow day tomorrow!!! No school!!",
        "Just booked my flight to Rome!!!",
    ],
}
"""Styles measured beside the six (`jobs/bench/demo_capacity.py`) and not shown. The pirate and
the sad poet were example styles until that benchmark found that no edit of the embedded model
carries either (0 % at every layer and strength); `lowercase_texter` and `hashtag_fan`, styles real
user bases have (LaMP-7: 29 % of users start most tweets lowercase, 5 % use hashtags), replaced
them: the model writes lowercase under a strong edit and hashtags when asked (`DEMO_CAPACITY`)."""

PARAPHRASE = PARAPHRASE_TWEET + "{text}"
"""The LaMP-7 task string: the small default model follows it far better than "write a tweet"."""

NEUTRAL_TWEETS = [
    "I am going to the beach this weekend with my friends.",
    "The weather was cold and rainy this morning.",
    "I finished reading a book about the history of the city.",
    "Our team won the match last night.",
    "I made pasta for dinner and it turned out well.",
    "Work was long today, but I am home now.",
]


def example_users(n_per_style: int = 2) -> list[dict]:
    """`n_per_style` users per style. Their history is their own tweets with no query (as in
    LaMP-7: the job fakes a neutral query for each); each is asked to paraphrase a neutral tweet."""
    users = []
    for style, texts in EXAMPLE_STYLES.items():
        for k in range(n_per_style):
            history = [{"text": t} for t in texts]
            query = PARAPHRASE.format(text=NEUTRAL_TWEETS[(k * 3 + len(users)) % len(NEUTRAL_TWEETS)])
            users.append({"user_id": f"{style}-{k + 1}", "history": history, "query": query})
    return users


def write_example_users(path: str | Path, n_per_style: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(u) + "\n" for u in example_users(n_per_style)))
    return path


DEMO_SETTINGS = {"synth.query_template": PARAPHRASE}
"""The task only (LaMP-7's around the faked neutral queries): the example users are personalized
with the same settings as any user (no demo-only groups, strengths or held-out counts)."""


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def capacity_note() -> str:
    """What the embedded model can carry of each example style (measured once, `DEMO_CAPACITY`)."""

    def share(fig) -> str:
        return "not measured" if fig is None else f"{fig[0]:.0%} → {fig[1]:.0%}"

    lines = [
        f"what the embedded model can carry: asked = {DEMO_CAPACITY['asked']}; edit = {DEMO_CAPACITY['edit']}"
    ]
    for style, fig in DEMO_CAPACITY["styles"].items():
        edit = fig["edit"]
        where = f" at {edit[2]}" if edit[2] else ""
        shown = "" if style in EXAMPLE_STYLES else " (replaced: carried by no edit)"
        lines.append(f"   {style:<17} asked {share(fig['asked'])}; edit {share(edit)}{where}{shown}")
    return "\n".join(lines)


def given_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or `taskset`'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fit_to_cores(cfg: ChameleonConfig, n_users: int, cores: int, *, local: bool) -> ChameleonConfig:
    """Use every core: in process, torch threads on all of them; on Ray, one model replica per
    group of cores (at least 4 users each) with that many threads, and one partition per replica.
    A job section set by --config or the job flags is kept as it is (one equal to the defaults
    counts as unset)."""
    if local:
        return cfg.with_overrides({"job.torch_threads": cores})
    if cfg.job != JobConfig():
        return cfg
    actors = max(1, min(cores, n_users // 4))
    threads = max(1, cores // actors)
    return cfg.with_overrides(
        {
            "job.num_actors": actors,
            "job.torch_threads": threads,
            # A little under the threads: Ray Data keeps some CPU for its own tasks.
            "job.num_cpus_per_actor": round(threads * 0.9, 2),
            "job.users_per_partition": math.ceil(n_users / actors),
        }
    )


def _prepare_model(cfg: ChameleonConfig, quiet: bool) -> None:
    """Convert the embedded GGUF model once before the job starts (its converter draws a progress
    bar of its own, which a quiet demo keeps off the terminal)."""
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        resolve_name(cfg.model)


def run_demo(
    cfg: ChameleonConfig,
    *,
    workdir: Path,
    run_id: str | None,
    local: bool,
    address: str | None,
    quick: bool = False,
) -> int:
    """Personalize the example users on the embedded store, then show base vs personalized answers."""
    quiet = quiet_console()  # the CLI without -v
    users_file = write_example_users(workdir / "example_users.jsonl")
    n_users = len(example_users())
    print(f"example users: {users_file} ({n_users} users, {len(EXAMPLE_STYLES)} writing styles)")
    if quick:
        cfg = cfg.with_overrides(
            {"synth.pairs_per_user": 4, "synth.answer_max_new_tokens": 24, "synth.insight_max_new_tokens": 40}
        )
    cfg = cfg.with_overrides(DEMO_SETTINGS)
    cores = given_cores()
    cluster = address or os.environ.get("RAY_ADDRESS")
    if not cluster:  # this machine's cores (a cluster's are sized by its own config)
        cfg = fit_to_cores(cfg, n_users, cores, local=local)
    torch.set_num_threads(cores)  # this process: the model for the answers below (and --local's job)
    run_id = run_id or new_run_id("demo")
    t0 = time.perf_counter()
    _prepare_model(cfg, quiet)
    model = cfg.model.name_or_path
    model = f"the embedded {model.partition(':')[2]}" if model == EMBEDDED_MODEL else model
    if local:
        where = f"in this process, {cores} core(s)"
    elif cluster:
        where = f"on {cfg.job.num_actors} model replica(s) on the Ray cluster at {cluster}"
    else:
        where = f"on {cfg.job.num_actors} model replica(s) (local Ray), {cores} core(s)"
    print(f"personalizing them with {model} {where} ...", flush=True)
    with embedded_store(workdir) as (s3, store):
        os.environ.setdefault("AWS_ENDPOINT_URL", s3.endpoint_url)
        manifest = run_job(str(users_file), store, run_id, cfg, local=local, address=address)
        print("\n" + describe_run(manifest, store.uri))
        run = PublishedRun(RunReader(store, manifest.run_id))
        model, tok = load_model(cfg.model)
        shown = [u for u in example_users() if u["user_id"].endswith("-1")]
        ids, queries = [u["user_id"] for u in shown], [u["query"] for u in shown]
        base = [first_answer_line(a) for a in generate_answers(model, tok, queries, max_new_tokens=40)]
        group = [first_answer_line(a) for a in generate_answers(
            model, tok, queries, edits=run.edits_for(ids, "group"), max_new_tokens=40)]  # fmt: skip
        carried = 0
        for u, q, b, g in zip(shown, queries, base, group, strict=True):
            style = u["user_id"].rsplit("-", 1)[0]
            marker, found = MARKERS[style]
            in_base, in_group = found(b), found(g)
            carried += in_group and not in_base
            part = ", ".join(run.user_markers(u["user_id"])) or "none"
            print(f"\n== {u['user_id']} (group {run.user_group(u['user_id'])}, marker part: {part}) — {q}")
            print(f"   base:         {b}")
            print(f"   personalized: {g}")
            print(f"   marker ({marker}): base {_yes(in_base)}, personalized {_yes(in_group)}")
        print(
            f"\nstyles whose marker the personalized answer carries and the base answer does not: "
            f"{carried} of {len(shown)}"
        )
        print(capacity_note())
        print(
            f"\nartifacts: {store.uri}/runs/{manifest.run_id}/ on the embedded S3 server "
            f"(data under {workdir / 's3'}, kept); total {time.perf_counter() - t0:.0f} s"
        )
        print(
            f"serve this run: `make serve-demo` (or `chameleon serve --workdir {workdir}`), then call it "
            "with the openai client (README, step 3)"
        )
    return 0
