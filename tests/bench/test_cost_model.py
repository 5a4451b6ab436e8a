"""The iteration cost model: batch shapes, fitting, the scheduler's protocol, JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from preemptserve.core.scheduler import ScheduledRequest, SchedulerOutput
from preemptserve.sim.cost_model import (
    BatchShape,
    IterationCostModel,
    batch_shape,
    load_profile,
)
from preemptserve.sim.fit import fit_iteration_coefficients, fit_swap


def item(rid: str, start: int, n: int, sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(rid, tuple(range(n)), start, (0,), sample)


def test_batch_shape_separates_prefill_chunks_and_decodes() -> None:
    output = SchedulerOutput(
        1,
        (
            item("prefill", 0, 100, sample=False),  # first chunk of a long prompt
            item("chunk", 100, 50),  # its last chunk: samples
            item("decode", 30, 1),
            item("decode2", 7, 1),
            item("one-token prompt", 0, 1),  # a prefill, not a decode
        ),
    )
    shape = batch_shape(output)
    assert shape == BatchShape(
        num_prefill_tokens=151,
        num_decode_tokens=2,
        decode_context_tokens=31 + 8,
        prefill_attention_tokens=100 * 100 + 50 * 150 + 1,
        num_sampled_tokens=4,
    )


def test_prefill_time_is_a_lone_prefill_iteration() -> None:
    model = IterationCostModel(
        fixed_s=0.01,
        per_prefill_token_s=1e-3,
        per_prefill_attention_s=1e-6,
        per_sampled_token_s=2e-3,
    )
    assert model.prefill_time_s(100) == pytest.approx(0.01 + 0.1 + 0.01 + 0.002)
    assert model.prefill_time_s(200) > model.prefill_time_s(100)


def test_fit_recovers_known_coefficients() -> None:
    truth = IterationCostModel(
        fixed_s=0.004,
        per_prefill_token_s=3e-4,
        per_decode_token_s=8e-4,
        per_decode_context_token_s=2e-6,
        per_prefill_attention_s=5e-8,
        per_sampled_token_s=1e-4,
    )
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(200):
        n_pre, n_dec = int(rng.integers(0, 300)), int(rng.integers(0, 32))
        shape = BatchShape(
            n_pre,
            n_dec,
            n_dec * int(rng.integers(10, 500)),
            n_pre * int(rng.integers(n_pre, n_pre + 200)) if n_pre else 0,
            n_dec + int(n_pre > 0),
        )
        noise = 1 + rng.normal(0, 0.01)
        samples.append((shape, truth.iteration_time_s(shape) * noise))
    fitted = fit_iteration_coefficients(samples)
    assert fitted["per_prefill_token_s"] == pytest.approx(3e-4, rel=0.1)
    assert fitted["per_decode_context_token_s"] == pytest.approx(2e-6, rel=0.15)
    # fixed and per-sampled-token terms are nearly collinear: check predictions instead
    model = IterationCostModel(**fitted)
    errors = [model.iteration_time_s(s) / t - 1 for s, t in samples]
    assert max(abs(e) for e in errors) < 0.05


def test_fit_never_returns_negative_coefficients() -> None:
    # time falls with decode tokens here: the decode coefficient is pinned at zero
    samples = [(BatchShape(0, n, 0, 0, 0), 0.05 - 0.001 * n) for n in range(1, 20)]
    fitted = fit_iteration_coefficients(samples)
    assert all(v >= 0 for v in fitted.values())
    assert fitted["per_decode_token_s"] == 0.0


def test_fit_swap() -> None:
    samples = [(n, 1e-4 + n / 2e9) for n in (2**20, 2**22, 2**24)]
    fixed_s, bandwidth = fit_swap(samples)
    assert fixed_s == pytest.approx(1e-4, rel=1e-3)
    assert bandwidth == pytest.approx(2e9, rel=1e-3)


def test_json_round_trip_and_validation(tmp_path: Path) -> None:
    model = IterationCostModel(fixed_s=0.01, kv_bytes_per_token=4096, source={"command": "x"})
    model.save(tmp_path / "m.json")
    loaded = IterationCostModel.load(tmp_path / "m.json")
    assert loaded == model and loaded.swap_bytes_per_s == float("inf")
    with pytest.raises(ValueError):
        IterationCostModel(fixed_s=-1.0)


def test_every_shipped_profile_loads_and_says_where_it_comes_from() -> None:
    directory = Path(load_profile.__code__.co_filename).parent / "profiles"
    paths = sorted(directory.glob("*.json"))
    assert paths, "no shipped profile"
    for path in paths:
        model = load_profile(path.stem)
        assert model.kv_bytes_per_token > 0 and model.source
        assert 0 < model.prefill_time_s(512) < 10


def test_noise_quantiles_interpolate_and_survive_json(tmp_path: Path) -> None:
    model = IterationCostModel(fixed_s=0.01, noise_quantiles=(0.5, 1.0, 3.0))
    assert model.noise_factor(0.0) == 0.5
    assert model.noise_factor(0.25) == pytest.approx(0.75)
    assert model.noise_factor(0.75) == pytest.approx(2.0)
    assert model.noise_factor(0.999999) == pytest.approx(3.0, rel=1e-4)
    assert IterationCostModel(fixed_s=0.01).noise_factor(0.3) == 1.0
    model.save(tmp_path / "n.json")
    assert IterationCostModel.load(tmp_path / "n.json") == model
