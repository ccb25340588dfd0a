"""A stub run manifest shared by the tests and the benchmarks (`jobs/bench/common.py`)."""

from __future__ import annotations

from chameleon.config import EditConfig
from chameleon.data.manifest import Counts, ModelInfo, RunManifest


def stub_manifest(**fields) -> RunManifest:
    """A valid manifest for a run that holds files only (no edits), e.g. a previous `latest`;
    `fields` override."""
    none = dict(accepted=0, partitions=0, users_mapped=0, users_failed=0, users_with_edit=0, groups=0)
    base = dict(
        model=ModelInfo(id="stub", fingerprint={}),
        hidden_size=1,
        captured_layers=[0],
        site="residual",
        max_rank=1,
        edit=EditConfig(),
        prompt_version="stub",
        groups=[],
        user_shards=[],
        counts=Counts(**none, pairs=0, pairs_kept=0),
        timings_s={},
        config={},
    )
    return RunManifest(**{**base, **fields})
