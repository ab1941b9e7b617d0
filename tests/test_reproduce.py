"""`energy-callbacks reproduce`: quick smoke runs, resume, outputs, and agreement with
the NumPy reference. Everything here trains through the Lightning callback on small
Fashion-MNIST subsets; the whole file runs in about two minutes on 2 cores."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest

from energy_callbacks.cli import main
from energy_callbacks.data import FASHION_MNIST_DIR
from energy_callbacks.reproduce import Config, load_data, reproduce
from energy_callbacks.reproduce import frameworks as fw
from energy_callbacks.reproduce.lazy import choose_lr
from energy_callbacks.reproduce.paper import Curve
from energy_callbacks.reproduce.report import markdown, power_law
from energy_callbacks.reproduce.runner import COLUMNS, Sweep, parse, read_table
from energy_callbacks.reproduce.sweep import _scaling

needs_data = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fashion():
    return load_data(Config())


def parse_row(row):
    return {k: parse(v) for k, v in row.items()}


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the command line, --quick ------------------------------------------------------------
@needs_data
@pytest.mark.data
def test_quick_size_sweep_writes_csv_plot_and_table(tmp_path, capsys):
    assert main(["reproduce", "size-sweep", "--quick", "--out", str(tmp_path)]) == 0
    rows = csv_rows(tmp_path / "size-sweep.csv")
    assert len(rows) == 10  # 2 sizes x 5 rules x 1 seed
    assert {r["n_hidden"] for r in rows} == {"20", "60"}
    for r in rows:
        assert float(r["m1"]) >= float(r["m1_min"]) > 0
        assert int(r["m0"]) > 0 and 0 < float(r["accuracy"]) <= 1
    curves = Sweep(tmp_path, "size-sweep").curves()
    for r in rows:  # a run stops after two consecutive test points at the target
        accuracy = curves[r["key"]].accuracy
        if r["reached"] == "True" and r["samples_sustained"]:
            assert min(accuracy[-2:]) >= 0.7 and int(r["samples_sustained"]) < int(r["samples"])
            assert int(r["samples_to_target"]) <= int(r["samples_sustained"])
    backprop = [r for r in rows if r["rule"] == "backprop"]
    combined = [r for r in rows if r["rule"] == "combined"]
    for b, c in zip(backprop, combined):  # the restriction saves updates
        assert int(c["m0"]) < int(b["m0"]) / 5
    assert (tmp_path / "size-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "size-sweep.md").read_text()
    assert "| N | rule |" in table and "a (M1)" in table
    assert "\\|dw\\|" in table  # pipes in labels are escaped
    out = capsys.readouterr().out
    assert "size-sweep.csv" in out and "inefficiency" in out


@needs_data
@pytest.mark.data
def test_quick_combined_lazy_and_mistakes(tmp_path):
    # combined and lazy on half of --quick's budget (the same code); mistakes compares
    # updates near the target, which needs all of it
    half = ["--max-samples", "1500", "--eval-every", "300"]
    for experiment, budget in (("combined", half), ("lazy", half), ("mistakes", [])):
        assert main(["reproduce", experiment, "--quick", "--out", str(tmp_path), *budget]) == 0
        assert (tmp_path / f"{experiment}.png").stat().st_size > 1000
    combined = (tmp_path / "combined.md").read_text()
    assert "Against backprop of the same seed" in combined and "| M1 saved |" in combined
    lazy = csv_rows(tmp_path / "lazy.csv")
    assert len(lazy) == 2 * 2 * 2 + 2 * 3  # the rate grid, then batches 1, 16 and half the data
    test = {(r["rule"], r["batch_size"]): r for r in lazy if r["stage"] == "test"}
    for b in ("1", "16"):
        lr = choose_lr([parse_row(r) for r in lazy], "lazy", int(b), (0.01, 0.1))
        assert float(test["lazy", b]["lr"]) == lr  # the test stage runs the chosen rate
        assert float(test["lazy", b]["samples_learned"]) < 1.0
        assert float(test["backprop", b]["samples_learned"]) == 1.0
    assert "validation split" in lazy[0]["dataset"] and "validation" not in lazy[-1]["dataset"]
    curves = csv_rows(tmp_path / "lazy_curves.csv")
    assert {c["key"] for c in curves} == {r["key"] for r in lazy}
    mistakes = csv_rows(tmp_path / "mistakes.csv")
    inc = {r["rule"]: r for r in mistakes if r["setting"] == "incremental"}
    assert set(inc) == {"backprop", "lazy", "mistakes", "mistakes-replay"}
    # only flagged first-phase samples need keeping under memorized mistakes
    assert int(inc["mistakes"]["replay_buffer"]) < int(inc["backprop"]["replay_buffer"])
    assert int(inc["backprop"]["replay_buffer"]) == int(inc["lazy"]["replay_buffer"])
    for r in inc.values():
        after, end = float(r["accuracy_old_after_first"]), float(r["accuracy_old"])
        assert float(r["forgetting"]) == pytest.approx(after - end)
    text = (tmp_path / "mistakes.md").read_text()
    assert "Setting 2" in text and "Updates saved against backprop of the same seed" in text
    assert "memorized mistakes: fewer updates" in text


# -- resume ---------------------------------------------------------------------------
@needs_data
@pytest.mark.data
def test_resume_repeats_no_finished_run(tmp_path, fashion, monkeypatch):
    config = Config(
        quick=True,
        out=tmp_path,
        sizes=(20,),
        rules=("backprop", "equal-count", "fixed"),
        max_samples=400,
        eval_every=200,
    )
    from energy_callbacks.reproduce.sweep import SizeSweep

    executed, fail, real = [], [True], SizeSweep.execute

    class Interrupt(Exception):
        pass

    def counting(self, spec):
        if len(executed) == 2 and fail[0]:
            raise Interrupt  # the sweep dies during its third run
        executed.append(spec.key)
        return real(self, spec)

    monkeypatch.setattr(SizeSweep, "execute", counting)
    with pytest.raises(Interrupt):
        reproduce("size-sweep", config, data=fashion, show_progress=False)
    assert len(csv_rows(tmp_path / "size-sweep.csv")) == 2
    fail[0] = False
    reproduce("size-sweep", config, data=fashion, show_progress=False)
    assert len(executed) == 3 and len(set(executed)) == 3  # only the missing run
    rows = csv_rows(tmp_path / "size-sweep.csv")
    assert [r["rule"] for r in rows] == ["backprop", "equal-count", "fixed"]
    reproduce("size-sweep", config, data=fashion, show_progress=False)
    assert len(executed) == 3
    # a stale curve of an interrupted run is dropped before it is rerun
    sweep = Sweep(tmp_path, "size-sweep")
    assert set(sweep.curves()) == {r["key"] for r in rows}


def test_stale_curves_are_dropped_and_foreign_csv_refused(tmp_path):
    sweep = Sweep(tmp_path, "x")
    from energy_callbacks.reproduce.runner import CURVE_COLUMNS, append_rows

    append_rows(sweep.csv, COLUMNS, [{"key": "a", "m1": 1.5}])
    point = {"samples": 1, "accuracy": 0.5, "seconds": 0.1, "m1": 1.0, "m0": 2}
    append_rows(sweep.curves_csv, CURVE_COLUMNS, [{"key": "a", **point}, {"key": "b", **point}])
    sweep._drop_stale_curves({"a"})
    assert set(sweep.curves()) == {"a"}
    assert read_table(sweep.csv, COLUMNS)[0]["m1"] == 1.5
    (tmp_path / "y.csv").write_text("key,other\n1,2\n")
    with pytest.raises(ValueError, match="another --out directory"):
        read_table(tmp_path / "y.csv", COLUMNS)


# -- trust: the Lightning path is the NumPy reference ------------------------------------
@needs_data
@pytest.mark.data
@pytest.mark.parametrize("rule", ["backprop", "top-units", "fixed", "lazy"])
def test_lightning_run_matches_numpy_reference(fashion, rule):
    from energy_callbacks.reference import PaperMLP, train
    from energy_callbacks.reproduce.paper import fit_paper
    from energy_callbacks.reproduce.rules import get_rule

    d = fashion.subset(None, 1000)
    build = get_rule(rule).build
    got = fit_paper(
        build(50, 3),
        d.x_train,
        d.y_train,
        d.x_test,
        d.y_test,
        n_hidden=50,
        max_samples=1200,
        eval_every=600,
        seed=3,
    )
    want = train(
        PaperMLP(784, 50, seed=3),
        build(50, 3),
        d.x_train,
        d.y_train,
        d.x_test,
        d.y_test,
        max_samples=1200,
        eval_every=600,
        seed=3,
    )
    assert got.samples == want.samples == 1200
    assert got.report.m1 == pytest.approx(want.report.m1, rel=1e-6)
    assert got.report.m0 == pytest.approx(want.report.m0, rel=1e-5)
    assert got.report.m1_min == pytest.approx(want.report.m1_min, rel=1e-5)
    assert got.report.samples_learned == want.report.samples_learned
    assert got.curve.accuracy == pytest.approx([a for _, a in want.history], abs=1e-3)


@pytest.mark.parametrize(
    "name, fraction",
    [("combined", 0.1), ("competitive", 0.1), ("competitive-20", 0.2), ("competitive-30", 0.3)],
)
def test_combined_variants_keep_their_fraction_of_the_path(name, fraction):
    """Per step, per tensor: ``fraction`` of the k units' 784 incoming weights; equal
    count then keeps all k of their biases and every path synapse of the output
    layer (k + 1 per output)."""
    from energy_callbacks.reproduce.paper import fit_paper
    from energy_callbacks.reproduce.rules import get_rule, units_k

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, (40, 784)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    n, steps = 50, 6
    k = units_k(n)
    run = fit_paper(get_rule(name).build(n, 0), x, y, x[:10], y[:10], n_hidden=n, max_samples=steps)
    assert run.report.m0 == steps * (round(fraction * k * 784) + k + 10 * (k + 1))


def test_combined_is_the_authors_fixed_path_and_competitive_is_ours():
    """The authors' combined rule: a fixed subnetwork of k units (the same units at every
    step, drawn from the seed) and the top 10% of its synapses; ``competitive`` picks the
    k units that change most at each step."""
    from energy_callbacks import FixedSubnetwork, TopFraction, TopUnits
    from energy_callbacks.reproduce.rules import get_rule

    combined = get_rule("combined").build(1000, 2)
    assert isinstance(combined.units, FixedSubnetwork)
    assert (combined.units.k, combined.units.seed) == (100, 2)
    (top,) = combined.synapses
    assert isinstance(top, TopFraction) and top.p == pytest.approx(0.01) and top.equal_count
    assert get_rule("combined+lazy").build(1000, 0).samples is not None
    competitive = get_rule("competitive").build(1000, 0)
    assert isinstance(competitive.units, TopUnits) and competitive.units.path


def test_combined_without_the_path_keeps_an_equal_count_of_output_weights():
    """Without the path every hidden unit feeds plastic output weights: equal count
    keeps as many of them as of the k units' incoming weights (here all 10 * n)."""
    from energy_callbacks.reproduce.paper import fit_paper
    from energy_callbacks.reproduce.rules import get_rule, units_k

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, (40, 784)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    n, steps = 50, 6
    k = units_k(n)
    kept = round(0.1 * k * 784)
    run = fit_paper(
        get_rule("competitive-nopath").build(n, 0),
        x,
        y,
        x[:10],
        y[:10],
        n_hidden=n,
        max_samples=steps,
    )
    assert run.report.m0 == steps * (kept + k + min(10 * n, kept) + 10)


# -- the reference's preprocessing and the output step size -------------------------------
def test_reference_preprocessing_is_one_global_mean_and_small_input_noise():
    from energy_callbacks.data import paper_inputs

    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4), dtype=np.uint8)
    per_pixel, mean = paper_inputs(images)
    assert mean.shape == (16,) and np.abs(per_pixel.mean(0)).max() < 1e-6
    glob, scalar = paper_inputs(images, per_pixel=False)
    assert scalar.shape == () and abs(glob.mean()) < 1e-6
    assert np.abs(glob.mean(0)).max() > 0.01  # the pixels keep their own offsets
    test, _ = paper_inputs(images[:5], scalar)
    np.testing.assert_array_equal(test, glob[:5])


@needs_data
@pytest.mark.data
def test_reference_preprocessing_data_and_keys_are_their_own(fashion):
    ref = load_data(Config(preprocessing="reference"))
    assert ref.name == "fashion-mnist (reference preprocessing)"
    offset = ref.x_train - fashion.x_train  # per pixel: its mean minus the global mean, + noise
    noise = offset - offset.mean(0)
    assert 0.0008 < float(noise.std()) < 0.0012 and abs(float(noise.mean())) < 1e-4
    # the test inputs get the same one mean and noise of their own, as the authors' runnet.py
    test_noise = ref.x_test - fashion.x_test - offset.mean(0)
    assert 0.0008 < float(test_noise.std()) < 0.0012 and abs(float(test_noise.mean())) < 1e-4
    assert not np.allclose(test_noise, noise[: len(test_noise)])
    from energy_callbacks.reproduce.sweep import Combined

    keys = {
        Combined(c).key(N=10)
        for c in (Config(), Config(preprocessing="reference"), Config(output_lr="scaled"))
    }
    assert len(keys) == 3 and Combined(Config()).key(N=10) == "combined|fashion-mnist|full|N=10"


def test_output_lr_scales_with_n_and_trains_the_output_layer_with_it():
    from energy_callbacks.reproduce.paper import PaperModule

    scaled = Config(output_lr="scaled")
    assert scaled.output_lr_for(500) == 0.01 and scaled.output_lr_for(10_000) == pytest.approx(1e-3)
    assert (
        Config().output_lr_for(10_000) == 0.01
        and Config(output_lr="0.002").output_lr_for(5) == 0.002
    )
    module = PaperModule(784, 40, output_lr=0.001)
    (hidden, output) = module.configure_optimizers().param_groups
    assert (hidden["lr"], output["lr"]) == (0.01, 0.001)
    assert [p.shape for p in output["params"]] == [(10, 40), (10,)]
    assert len(PaperModule(784, 40).configure_optimizers().param_groups) == 1


# -- frameworks ---------------------------------------------------------------------------
def test_frameworks_fails_clearly_without_the_keras_adapter(tmp_path, monkeypatch, capsys):
    def no_keras(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ModuleNotFoundError: No module named 'energy_callbacks.keras'"
        )

    monkeypatch.setattr(fw.subprocess, "run", no_keras)
    assert main(["reproduce", "frameworks", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs the Keras adapter energy_callbacks.keras" in err
    assert "No module named 'energy_callbacks.keras'" in err
    assert not (tmp_path / "frameworks.csv").exists()  # nothing trained


@needs_data
@pytest.mark.data
def test_quick_frameworks_lightning_and_keras_agree(tmp_path):
    try:
        fw.check_keras()
    except fw.KerasUnavailable as exc:
        pytest.skip(str(exc))
    assert main(["reproduce", "frameworks", "--quick", "--out", str(tmp_path)]) == 0
    rows = csv_rows(tmp_path / "frameworks.csv")
    for rule in fw.FRAMEWORK_RULES:
        lt, ks = (
            next(r for r in rows if r["rule"] == rule and r["framework"] == f)
            for f in ("lightning", "keras")
        )
        assert float(ks["m1"]) == pytest.approx(float(lt["m1"]), rel=fw.TOLERANCE), rule
    assert "within 5%" in (tmp_path / "frameworks.md").read_text()


def test_keras_sees_the_lightning_sample_order():
    from energy_callbacks.reproduce.paper import SampleStream

    torch = pytest.importorskip("torch")
    x, y = torch.zeros(50, 3), torch.arange(50)
    stream = [int(b["index"]) for b in SampleStream(x, y, 40, seed=7)]
    assert stream == fw.draw_order(50, 40, 7).tolist()


# -- errors name the field and the fix; helpers ----------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["size-sweep", "--rules", "backprop,nope"], "unknown rule 'nope'"),
        (["lazy", "--dataset", "mnist"], "--dataset mnist needs --data-dir"),
        (["size-sweep", "--seeds", "0"], "--seeds must be >= 1"),
        (["size-sweep", "--sizes", "10,x"], "--sizes takes comma-separated integers"),
        (["combined", "--target", "1.5"], "--target must be an accuracy"),
        (["combined", "--output-lr", "fast"], "--output-lr must be 'same', 'scaled'"),
        (["combined", "--output-lr", "-0.1"], "--output-lr must be 'same', 'scaled'"),
        (["frameworks", "--output-lr", "scaled"], "drop --output-lr"),
    ],
)
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    assert main(["reproduce", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_table_and_scaling_helpers():
    ns = [100, 1000, 10000]
    assert power_law(ns, [3 * n**0.5 for n in ns]) == pytest.approx(0.5)
    assert np.isnan(power_law([100], [1.0]))
    text = markdown(["a", "b"], [["x|y", "1"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_mistakes_runs_the_rules_asked_for():
    from energy_callbacks.reproduce.gating import Mistakes

    specs = Mistakes(Config(rules=("backprop", "mistakes"), seeds=2)).specs()
    assert {s.params["rule"] for s in specs} == {"backprop", "mistakes"}
    assert len(specs) == 2 * 2 * 2  # two settings, two rules, two seeds
    everything = {s.key for s in Mistakes(Config(seeds=2)).specs()}
    assert {s.key for s in specs} <= everything  # the same keys: a sweep resumes either way
    with pytest.raises(ValueError, match="--rules has"):
        Mistakes(Config(rules=("combined",))).specs()


def test_lazy_chooses_the_rate_that_sustains_the_target_first_on_validation():
    def row(lr, samples, accuracy, batch=32, rule="lazy"):
        figures = dict(samples_sustained=samples, accuracy=accuracy)
        return dict(stage="lr", rule=rule, batch_size=batch, lr=lr, **figures)

    rows = [row(0.01, 40000, 0.89), row(0.1, 20000, 0.88), row(0.3, "", 0.8), row(0.1, 100, 0.9, 1)]
    assert choose_lr(rows, "lazy", 32, (0.01, 0.1, 0.3)) == 0.1
    assert choose_lr(rows, "lazy", 32, (0.01, 0.3)) == 0.01
    none = [row(0.01, "", 0.7), row(0.1, "", 0.8)]  # none reached: the best accuracy
    assert choose_lr(none, "lazy", 32, (0.01, 0.1)) == 0.1
    with pytest.raises(RuntimeError, match="unfinished"):
        choose_lr(rows, "backprop", 32, (0.01,))


def test_a_validation_split_holds_out_training_samples(fashion):
    val = fashion.validation(10000)
    assert len(val.x_test) == 10000 and len(val.x_train) == 50000
    seen = {row.tobytes() for row in val.x_train[:2000]}
    assert not any(row.tobytes() in seen for row in val.x_test)  # disjoint
    assert "validation" in val.name
    with pytest.raises(ValueError, match="validation split"):
        fashion.validation(60000)


@needs_data
@pytest.mark.data
def test_unit_energy_adds_up_to_the_layer_energy_the_callback_reports(fashion):
    """An independent witness: the per-unit sums of |dw| (weights snapshotted around each
    optimizer step) add up to the hidden layer's M1 in the report, under a unit rule."""
    from energy_callbacks.reproduce.concentration import UnitEnergy, concentration
    from energy_callbacks.reproduce.paper import fit_paper
    from energy_callbacks.reproduce.rules import get_rule

    data = fashion.subset(2000, 500)
    units = UnitEnergy()
    run = fit_paper(
        get_rule("top-units").build(50, 0),
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        n_hidden=50,
        max_samples=300,
        eval_every=100,
        callbacks=[units],
    )
    layers = run.report.per_layer
    hidden = sum(v.m1 for k, v in layers.items() if k.startswith("net.0."))
    assert float(units.energy.sum()) == pytest.approx(hidden, rel=1e-6)
    figures = concentration(units.energy.numpy())
    assert figures["hidden_m1"] == pytest.approx(hidden, rel=1e-6)
    assert 0 < figures["share_top_10"] <= figures["share_top_30"] <= 1


def test_concentration_figures_rank_the_units():
    from energy_callbacks.reproduce.concentration import concentration

    energy = np.array([1.0] * 90 + [91.0] * 10)  # ten units hold 91% of 1000
    figures = concentration(energy)
    assert figures["share_top_10"] == pytest.approx(0.91)
    assert figures["units_for_half"] == 6 and figures["share_top_1000"] == pytest.approx(1)
    assert concentration(np.zeros(5))["units_for_half"] == ""
    from energy_callbacks.reproduce.concentration import Concentration

    rows = [dict(n_hidden=1000, rule="backprop", seed=s, **figures) for s in range(2)]
    for r in rows:
        r.update(dataset="fashion-mnist", target=0.85)
    summary = Concentration(Config()).summarize(rows, {})
    assert "| 1000 | backprop | 91 ± 0% (1%) |" in summary.text


def test_a_sustained_crossing_is_the_first_of_two_points_at_the_target():
    c = Curve(samples=[1, 2, 3, 4, 5], accuracy=[0.2, 0.9, 0.5, 0.86, 0.88])
    assert c.first_reaching(0.85) == 1
    assert c.first_sustained(0.85) == 3
    assert c.first_sustained(0.95) is None
    assert c.first_sustained(0.85, points=1) == 1


def test_the_scaling_fit_needs_two_sizes_per_rule():
    def row(rule, n, reached=True):
        figures = {"m1_sustained": 2.0 * n, "m0_sustained": n**2, "samples_sustained": 10.0}
        if not reached:
            figures = dict.fromkeys(figures, "")
        return {"rule": rule, "n_hidden": n, **figures}

    one = _scaling([row("fixed", 10000)])
    assert "nan" not in one and "two sizes" in one
    rows = [row("fixed", 100), row("fixed", 1000), row("backprop", 1000)]
    both = _scaling([*rows, row("fixed", 10000, reached=False)])
    assert "| fixed subnetwork, k = 10% (<= 100) | 100, 1000 | 1.00 | 2.00 | 0.00 |" in both
    assert "| backprop |" not in both
    assert "Left out (target not sustained): fixed at N = 10000." in both


@pytest.mark.parametrize(
    "batches, fraction_batch", [("32,128", 32), ("1,32,128", 32), ("1,16", 16), ("64", 64)]
)
def test_lazy_runs_its_smaller_training_sets_at_batch_32_when_the_sweep_has_it(
    batches, fraction_batch
):
    from energy_callbacks.reproduce.lazy import Lazy

    settings = Lazy(Config(extra={"batch_sizes": batches})).settings()
    assert settings["fraction_batch"] == fraction_batch
