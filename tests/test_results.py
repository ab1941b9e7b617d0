"""The results page is built from committed run data: `energy-callbacks reproduce report`
remakes every committed table from the CSVs, and the claims' verdicts follow their
stated criteria."""

from __future__ import annotations

from pathlib import Path

import pytest

from energy_callbacks.cli import main
from energy_callbacks.reproduce import claims as c
from energy_callbacks.reproduce.paper import Curve
from energy_callbacks.reproduce.results import Runs, build_report, demote, settings_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "results" / "data"
GENERATED = ROOT / "docs" / "results" / "generated"


def test_the_committed_tables_are_what_the_data_gives(tmp_path):
    """Edit the data (or the code that reads it), not the tables: rerun
    `energy-callbacks reproduce report --data docs/results/data --out docs/results/generated`."""
    written = build_report(DATA, tmp_path)
    assert {p.name for p in written} == {p.name for p in GENERATED.glob("*.md")}
    for path in written:
        committed = (GENERATED / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} differs from the committed data"
        assert (GENERATED / path.with_suffix(".png").name).exists() or path.name == "claims.md"


def test_the_results_page_shows_every_generated_table_and_plot():
    page = (ROOT / "docs" / "results.md").read_text()
    for table in GENERATED.glob("*.md"):
        assert f'--8<-- "docs/results/generated/{table.name}"' in page, table.name
        plot = table.with_suffix(".png")
        assert plot.name == "claims.png" or f"(results/generated/{plot.name})" in page


def test_report_needs_data_and_names_it(tmp_path, capsys):
    assert main(["reproduce", "report", "--out", str(tmp_path)]) == 2
    assert "--data DIR" in capsys.readouterr().err
    assert main(["reproduce", "report", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no runs in" in capsys.readouterr().err


def test_a_key_names_its_settings():
    key = "size-sweep|fashion-mnist/prep-reference|full|N=1000|rule=backprop|seed=0"
    assert settings_of(key) == "fashion-mnist/prep-reference|full"
    runs = Runs("size-sweep", settings_of(key), [], {})
    assert runs.stem == "size-sweep--prep-reference"
    assert Runs("lazy", "fashion-mnist|full", [], {}).stem == "lazy"
    assert demote("# t\n\n## s\n| a |", 2) == "### t\n\n#### s\n| a |"


def _sweep(backprop_power: float, combined_power: float, seeds: int = 3) -> list[Runs]:
    rows = []
    for n in (100, 1000, 3000):
        for rule, power in (("backprop", backprop_power), ("combined", combined_power)):
            for s in range(seeds):
                m1 = (1 + 0.01 * s) * n**power
                rows.append(
                    dict(
                        key=f"size-sweep|fashion-mnist|full|N={n}|rule={rule}|seed={s}",
                        rule=rule,
                        n_hidden=n,
                        seed=s,
                        m1_sustained=m1,
                        m0_sustained=1e6 * m1,
                    )
                )
    return [Runs("size-sweep", "fashion-mnist|full", rows, {})]


def test_size_claims_follow_their_criteria():
    runs = _sweep(0.5, 0.0)
    assert c.backprop_grows_like_sqrt_n(runs).verdict == c.REPRODUCED
    assert c.restricted_energy_is_flat(runs).verdict == c.REPRODUCED
    assert c.larger_networks_larger_savings(runs).verdict == c.REPRODUCED
    assert "power 0.50 ± 0.00 (M1), 0.50 ± 0.00 (M0)" in c.backprop_grows_like_sqrt_n(runs).ours

    steeper = _sweep(0.9, 0.3)  # grows, but not like √N; flatter than backprop, not flat
    assert c.backprop_grows_like_sqrt_n(steeper).verdict == c.PARTLY
    assert c.restricted_energy_is_flat(steeper).verdict == c.PARTLY
    same = _sweep(0.5, 0.5)  # no saving that grows
    assert c.larger_networks_larger_savings(same).verdict == c.MISSED
    assert c.restricted_energy_is_flat(same).verdict == c.MISSED

    running = _sweep(0.5, 0.0)  # a sweep still running: seed 2 has no N = 3000 yet
    running[0].rows[:] = [r for r in running[0].rows if (r["n_hidden"], r["seed"]) != (3000, 2)]
    saving = c.larger_networks_larger_savings(running)
    assert saving.verdict == c.REPRODUCED and saving.runs == "2 seeds x 3 sizes"

    unreached = _sweep(0.5, 0.0)
    unreached[0].rows[-1]["m1_sustained"] = ""  # combined, N = 3000: never sustained
    saving = c.larger_networks_larger_savings(unreached)
    assert saving.verdict == c.REPRODUCED and saving.runs == "3 seeds x 2 sizes"
    assert "left out: N = 3000: the combined rule sustains 85% in 2 of 3" in saving.ours
    assert c.backprop_grows_like_sqrt_n([]).verdict == c.NOT_RUN


@pytest.mark.parametrize(
    ("saving_m1", "saving_m0", "verdict"),
    [(3.0, 3e6, c.REPRODUCED), (3.0, 1e5, c.PARTLY), (0.9, 1e5, c.MISSED)],
)
def test_the_largest_size_compares_its_saving_with_the_sweeps_largest(
    saving_m1, saving_m0, verdict
):
    runs = _sweep(0.5, 0.0)  # at N = 3000: backprop/combined is sqrt(3000) ~ 55, in M1 and M0
    key = "size-sweep|fashion-mnist/output-lr-scaled|full|N=10000|rule={}|seed=0"
    base = dict(rule="backprop", n_hidden=10000, seed=0, m1_sustained=100.0, m0_sustained=1e8)
    big = [dict(base, key=key.format("backprop"))]
    assert c.saving_at_the_largest_size(runs).verdict == c.NOT_RUN
    runs.append(Runs("size-sweep", "fashion-mnist/output-lr-scaled|full", big, {}))
    claim = c.saving_at_the_largest_size(runs)
    assert claim.verdict == c.NOT_RUN and claim.ours == "ran: backprop"
    combined = dict(
        base,
        key=key.format("combined"),
        rule="combined",
        m1_sustained=100.0 / (55 * saving_m1),
        m0_sustained=1e8 / (55 * saving_m0 / 1e6),
    )
    big.append(combined)
    claim = c.saving_at_the_largest_size(runs)
    assert claim.verdict == verdict and claim.runs == "1 seed"
    assert claim.ours.startswith("N = 10 000: ") and "; N = 3000: " in claim.ours


def test_the_largest_size_says_when_the_rule_never_sustains_the_target():
    runs = _sweep(0.5, 0.0)
    key = "size-sweep|fashion-mnist/output-lr-scaled|full|N=10000|rule={}|seed=0"
    run = dict(n_hidden=10000, seed=0, target=0.85, max_samples=300000, samples=300000)
    big = [
        dict(run, key=key.format("backprop"), rule="backprop", m1_sustained=100.0,
             m0_sustained=1e8, samples_to_target=24000, epochs=5.0),
        dict(run, key=key.format("combined"), rule="combined", m1_sustained="",
             m0_sustained="", samples_to_target=250000, epochs=5.0),
    ]  # fmt: skip
    runs.append(Runs("size-sweep", "fashion-mnist/output-lr-scaled|full", big, {}))
    claim = c.saving_at_the_largest_size(runs)
    assert claim.verdict == c.MISSED
    assert claim.ours == (
        "N = 10 000: the combined rule does not sustain 85% in 5 epochs (first reaches 85% "
        "at 4.17 epochs), backprop first reaches 85% at 0.4 epochs"
    )


def _mistakes(gated_share: float) -> list[Runs]:
    """Backprop and memorized mistakes curves: the gated rule spends ``gated_share`` of
    backprop's updates at every accuracy, after a lucky single point it must not count."""
    rows, curves = [], {}
    for s in range(2):
        for rule, share in (("backprop", 1.0), ("mistakes", gated_share)):
            key = f"mistakes|fashion-mnist|full|setting=plain|rule={rule}|seed={s}"
            accuracy = [0.5, 0.9, 0.7, *(0.79 + 0.005 * i for i in range(16))]
            m0 = [share * 1e6 * (i + 1) for i in range(len(accuracy))]
            if rule == "mistakes":
                m0[1] = 1.0  # a lucky early point at 90%: not a sustained crossing
            curves[key] = Curve(
                samples=list(range(len(accuracy))),
                accuracy=accuracy,
                seconds=[0.0] * len(accuracy),
                m1=[0.0] * len(accuracy),
                m0=m0,
            )
            rows.append(dict(key=key, rule=rule, seed=s, setting="plain", target=0.85))
    return [Runs("mistakes", "fashion-mnist|full", rows, curves)]


def _shares(reached: dict[float, int], saving: dict[float, float]) -> list[Runs]:
    """Lazy learning and backprop on shares of the training set at batch 32, 2 seeds:
    lazy learning sustains the target in ``reached[f]`` seeds on share ``f``, with
    ``saving[f]`` times fewer backward passes than backprop where it does."""
    rows = []
    for f, n in reached.items():
        for s in range(2):
            for rule in ("backprop", "lazy"):
                done = rule == "backprop" or s < n
                rows.append(
                    dict(
                        key=f"lazy|fashion-mnist|full|f={f}|rule={rule}|seed={s}",
                        stage="test" if f == 1.0 else "fraction",
                        rule=rule,
                        seed=s,
                        batch_size=32,
                        fraction=f,
                        target=0.85,
                        backward_sustained=(
                            (1e4 if rule == "backprop" else 1e4 / saving[f]) if done else ""
                        ),
                    )
                )
    return [Runs("lazy", "fashion-mnist|full", rows, {})]


@pytest.mark.parametrize(
    "reached, saving, verdict",
    [
        ({0.1: 0, 0.5: 1, 1.0: 2}, {0.1: 1, 0.5: 2, 1.0: 2}, c.REPRODUCED),
        ({0.1: 2, 1.0: 2}, {0.1: 1.5, 1.0: 2}, c.REPRODUCED),  # as many reach: more saved
        ({0.1: 2, 1.0: 2}, {0.1: 2, 1.0: 1.5}, c.MISSED),
        ({0.1: 2, 1.0: 0}, {0.1: 2, 1.0: 2}, c.MISSED),
    ],
)
def test_the_large_data_claim_follows_lazy_learning_over_shares(reached, saving, verdict):
    claim = c.lazy_suits_large_datasets(_shares(reached, saving))
    assert claim.verdict == verdict and claim.runs == "2 seeds"
    if verdict == c.REPRODUCED and reached[0.1] == 0:
        assert claim.ours.endswith(
            "batch 32: 10%: 0 of 2, 50%: 1 of 2, 100%: 2 of 2 (2x ± 0 fewer backward passes)"
        )
    assert c.lazy_suits_large_datasets([]).verdict == c.NOT_RUN


def test_the_mistakes_claim_compares_updates_along_the_curve():
    claim = c.mistakes_save_updates(_mistakes(0.4))
    assert claim.verdict == c.REPRODUCED and "60 ± 0% fewer" in claim.ours
    assert c.mistakes_save_updates(_mistakes(0.9)).verdict == c.PARTLY
    assert c.mistakes_save_updates(_mistakes(1.2)).verdict == c.MISSED


@pytest.mark.parametrize("scale, verdict", [(1.1, c.REPRODUCED), (2.0, c.MISSED)])
def test_the_reference_code_rows_compare_at_the_first_crossing(scale, verdict):
    ref = c.REFERENCE["backprop"]
    rows = [
        dict(
            rule="backprop",
            n_hidden=1000,
            seed=s,
            samples=40000,
            epochs=40000 / 60000,
            samples_to_target=34200,
            m1_to_target=scale * ref["m1"],
            m0_to_target=scale * ref["m0"],
        )
        for s in range(3)
    ]
    claim = c.reference_code("backprop", "backprop")(
        [Runs("size-sweep", "fashion-mnist|full", rows, {})]
    )
    assert claim.verdict == verdict and claim.ours.startswith("0.57 ± 0 epochs")


@pytest.mark.parametrize(
    "half, top100, verdict",
    [(80, 0.6, c.REPRODUCED), (300, 0.4, c.PARTLY), (450, 0.12, c.MISSED)],
)
def test_the_concentration_claim_counts_the_units_holding_half(half, top100, verdict):
    rows = [
        dict(rule="backprop", n_hidden=n, seed=s, units_for_half=half, share_top_100=top100)
        for n in (1000, 3000)
        for s in range(2)
    ]
    claim = c.plasticity_concentrates([Runs("concentration", "fashion-mnist|full", rows, {})])
    assert claim.verdict == verdict and f"N = 3000: half of M1 in {half} ± 0 units" in claim.ours


def test_the_reference_rows_judge_the_reference_preprocessing_when_it_ran():
    ref = c.REFERENCE["backprop"]

    def rows(scale):
        return [
            dict(rule="backprop", n_hidden=1000, seed=s, samples=34200, epochs=0.57,
                 samples_to_target=34200, m1_to_target=scale * ref["m1"],
                 m0_to_target=scale * ref["m0"])
            for s in range(3)
        ]  # fmt: skip

    package = Runs("size-sweep", "fashion-mnist|full", rows(2.0), {})
    reference = Runs("size-sweep", "fashion-mnist/prep-reference|full", rows(1.0), {})
    check = c.reference_code("backprop", "backprop")
    assert check([package]).verdict == c.MISSED
    both = check([package, reference])
    assert both.verdict == c.REPRODUCED and both.command.endswith("--preprocessing reference")
    assert both.ours.startswith("reference preprocessing: 0.57 ± 0 epochs")
    assert "package preprocessing: 0.57 ± 0 epochs, M1 6.18e5" in both.ours


@pytest.mark.parametrize(
    "control, verdict",
    [
        ([60000, 70000, ""], c.REPRODUCED),  # more samples, or never sustained
        ([60000, 30000, 60000], c.PARTLY),  # one seed faster, worse on average
        ([30000, 30000, 30000], c.MISSED),
    ],
)
def test_the_controls_claim_pairs_random_selection_with_competition(control, verdict):
    def row(rule, seed, samples):
        return dict(rule=rule, n_hidden=1000, seed=seed, samples_sustained=samples)

    rows = [row("top-units-path", s, v) for s, v in enumerate([42000, 48000, 36000])]
    rows += [row("random-units", s, v) for s, v in enumerate(control)]
    claim = c.competition_beats_random([Runs("size-sweep", "fashion-mnist|full", rows, {})])
    assert claim.verdict == verdict
    assert "top units (path) 0.7 ± 0.1 epochs (3 of 3 seeds reach it)" in claim.ours
    none = c.competition_beats_random([Runs("size-sweep", "fashion-mnist|full", rows[:3], {})])
    assert none.verdict == c.NOT_RUN
