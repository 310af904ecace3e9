"""``probloss demo vae`` (user story 3, docs/user_stories.md): one quick run, its table, its
results, its figures.

The quick run (seed 0, 15 epochs of 11 Adam steps per strategy) is shared by the tests of
this module. Its results come from :func:`probloss.demos.vae.train_all`, recorded while
:func:`~probloss.demos.vae.run` calls it, so the printed table and the returned numbers are
those of the same run.

Identities checked on every row (they hold whatever the training did): ``-ELBO = KL -
recon`` and ``bits/dim = -ELBO / (64 ln 2)`` (float32 arithmetic: relative error below
1e-5), and the KL per latent dimension adds up to the KL. Claims about the strategies,
measured on quick runs with seeds 0-5 while choosing them (seed 0 in brackets; the default
300-epoch run of seed 0 after the semicolon):

* beta-VAE (beta = 4) has a lower rate than the plain ELBO: KL 0.035-0.065 against
  2.2-3.2 nats (0.036 against 2.59; 3.08 against 8.15);
* GECO, whose tolerance asks for a distortion 5 nats below the plain ELBO's, reconstructs
  better than the plain ELBO, by 2.7-8.4 nats (67.2 against 62.2; 96.4 against 90.6);
* the schedules reach the ELBO module: sigmoid annealing starts below 0.01 and ends above
  0.99, cyclical annealing restarts from 0 four times and ends at 1, GECO starts at
  ``1 / lambda = 1`` and its constraint (violated at the start) lowers it (to 0.49-0.52).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import sys

import pytest
import torch

from probloss.demos import vae, vae_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = [s.name for s in vae.STRATEGIES]
LIKELIHOODS = {s.name: vae.LIKELIHOOD_NAMES[s.likelihood] for s in vae.STRATEGIES}
QUICK_STEPS = vae.QUICK.epochs * 11  # 1437 training images: 11 full batches of 128
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``run(quick=True)`` once, with its stdout and the results of its ``train_all``."""
    out = tmp_path_factory.mktemp("demo") / "figures"  # does not exist yet: created
    recorded = []
    original = vae.train_all

    def recording_train_all(**kwargs):
        recorded.append(original(**kwargs))
        return recorded[-1]

    stdout = io.StringIO()
    rng_before = torch.random.get_rng_state()
    threads_before = torch.get_num_threads()
    vae.train_all = recording_train_all
    try:
        with contextlib.redirect_stdout(stdout):
            status = vae.run(quick=True, out=out, seed=0)
    finally:
        vae.train_all = original
    print(stdout.getvalue())  # shown by pytest on failure
    side_effects = {
        "rng_unchanged": torch.equal(rng_before, torch.random.get_rng_state()),
        "threads_restored": torch.get_num_threads() == threads_before,
    }
    return status, out, stdout.getvalue(), recorded[0], side_effects


def _table(text: str) -> dict[str, list[float]]:
    """Rows of the printed table: name -> [-ELBO, bits/dim, recon, KL, active, beta]."""
    rows = {}
    for line in text.splitlines():
        for name in NAMES:
            if line.startswith(name + " "):
                cells = line[len(name) :].split()
                likelihood, numbers = cells[0], cells[1:]
                active, total = numbers[4].split("/")
                assert int(total) == vae.LATENT_DIMS
                assert likelihood == LIKELIHOODS[name]
                rows[name] = [float(v) for v in numbers[:4]] + [float(active), float(numbers[5])]
    return rows


def test_quick_run_exits_zero_and_writes_png_figures(quick_run):
    status, out, text, _, side_effects = quick_run
    assert status == 0
    for name in vae.FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert str(out / name) in text  # the paths written are printed
    assert side_effects == {"rng_unchanged": True, "threads_restored": True}


def test_table_has_one_finite_row_per_strategy(quick_run):
    table = _table(quick_run[2])
    assert list(table) == NAMES
    for name, values in table.items():
        assert all(math.isfinite(v) for v in values), name
        assert 0 <= values[4] <= vae.LATENT_DIMS
        assert values[3] >= 0.0  # a KL


def test_printed_table_matches_returned_results(quick_run):
    table = _table(quick_run[2])
    results = quick_run[3]
    assert [r.name for r in results] == NAMES
    for r in results:
        nats, bits, recon, kl, active, beta = table[r.name]
        # printed with 2 decimals (nats, recon, KL) and 4 (bits/dim): half a unit of the last
        assert abs(nats - r.nats) <= 0.005 + 1e-9
        assert abs(bits - r.bits_per_dim) <= 0.00005 + 1e-9
        assert abs(recon - r.reconstruction) <= 0.005 + 1e-9
        assert abs(kl - r.kl) <= 0.005 + 1e-9
        assert active == r.active_units
        assert beta == pytest.approx(r.betas[-1], rel=5e-3)  # 3 significant digits


def test_bits_per_dim_is_nats_over_64_ln2(quick_run):
    for r in quick_run[3]:
        assert r.bits_per_dim == pytest.approx(r.nats / (64 * LN2), rel=1e-5, abs=1e-6), r.name
    # The printed numbers too: rounding nats to 0.005 moves nats / (64 ln 2) by 1.13e-4,
    # rounding bits/dim to 4 decimals by 5e-5.
    for name, (nats, bits, *_) in _table(quick_run[2]).items():
        assert abs(bits - nats / (64 * LN2)) <= 1.13e-4 + 5e-5 + 1e-9, name


def test_elbo_parts_add_up(quick_run):
    """-ELBO = KL - E log p(x | z), and the KL per dimension adds up to the KL (float32
    sums of 360 examples: relative error below 1e-5)."""
    for r in quick_run[3]:
        assert r.nats == pytest.approx(r.kl - r.reconstruction, rel=1e-5, abs=1e-4), r.name
        assert sum(r.kl_per_dim) == pytest.approx(r.kl, rel=1e-5, abs=1e-5), r.name
        assert len(r.kl_per_dim) == vae.LATENT_DIMS
        assert min(r.kl_per_dim) >= 0.0
        assert r.distortion == -r.reconstruction


def test_every_strategy_trains_the_same_number_of_steps(quick_run):
    for r in quick_run[3]:
        assert len(r.betas) == QUICK_STEPS, r.name
        assert tuple(r.reconstructions.shape) == (vae.N_SHOWN, vae.DATA_DIMS)
        assert 0.0 <= float(r.reconstructions.min()) <= float(r.reconstructions.max()) <= 1.0


def test_schedules_and_multipliers_reach_the_elbo(quick_run):
    betas = {r.name: r.betas for r in quick_run[3]}
    for name in ("ELBO", "Bernoulli ELBO", "free bits", "sigma-VAE"):
        assert set(betas[name]) == {1.0}, name
    assert set(betas["beta-VAE"]) == {vae.BETA_VAE}
    sigmoid = betas["sigmoid anneal"]
    assert sigmoid[0] < 0.01 and sigmoid[-1] > 0.99
    assert all(a <= b for a, b in itertools.pairwise(sigmoid))  # a monotone ramp
    cyclical = betas["cyclical"]
    assert cyclical.count(0.0) == 4 and cyclical[-1] == 1.0  # one restart per cycle
    geco = betas["GECO"]
    assert geco[0] == 1.0 and geco[-1] < 1.0


def test_beta_vae_has_a_lower_rate_than_the_elbo(quick_run):
    results = {r.name: r for r in quick_run[3]}
    assert results["beta-VAE"].kl < results["ELBO"].kl


def test_geco_reconstructs_better_than_the_elbo(quick_run):
    """GECO's tolerance is the plain ELBO's training distortion minus GECO_MARGIN nats."""
    results = {r.name: r for r in quick_run[3]}
    assert results["GECO"].reconstruction > results["ELBO"].reconstruction
    tolerance = results["ELBO"].train_distortion - vae.GECO_MARGIN
    assert f"{tolerance:.2f} nats" in quick_run[2]


def test_train_all_is_deterministic_for_a_seed():
    a = vae.train_all(epochs=1, seed=3)
    b = vae.train_all(epochs=1, seed=3)
    assert [(r.nats, r.kl, r.betas) for r in a] == [(r.nats, r.kl, r.betas) for r in b]
    assert len(a[0].betas) == 11


def test_make_weighting_rejects_an_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        vae.make_weighting(vae.Strategy("beta-vae", "cb"), steps=10, geco_tolerance=0.0)


def test_dequantised_pixels_stay_in_their_level_bin():
    """``(k + u) / 17`` lies in ``[k / 17, (k + 1) / 17)``: flooring 17 x recovers ``k``."""
    levels = torch.arange(17.0).repeat(50)
    x = vae_model.dequantise(levels, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(x * 17.0), levels)
    assert float(x.min()) > 0.0 and float(x.max()) < 1.0


@pytest.mark.parametrize(
    ("epochs", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_epochs_raise_a_clear_error(epochs, error, tmp_path):
    out = tmp_path / "figures"
    with pytest.raises(error, match="epochs"):
        vae.run(quick=True, out=out, epochs=epochs)
    with pytest.raises(error, match="epochs"):
        vae.train_all(epochs=epochs)
    assert not out.exists()  # checked before anything is done


def test_missing_demo_dependencies_exit_2_with_install_hint(monkeypatch, capsys, tmp_path):
    for name in ("matplotlib", "matplotlib.figure"):  # import -> ImportError, even if loaded
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "figures"
    assert vae.run(quick=True, out=out) == 2
    assert "pip install 'probloss[demo]'" in capsys.readouterr().err
    assert not out.exists()  # nothing done before the dependencies are checked
