"""Group statistics of peak saliency: Holm and Cliff's delta by hand, tests against scipy, small groups."""
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import kruskal, mannwhitneyu

from nnxai.analysis.statistics import STATS_COLUMNS, cliffs_delta, compare_groups, group_statistics, holm
from nnxai.cli import main
from nnxai.explain.output import AnalysisInputError, load_explain_output
from tests.fake_explain_output import fake_cohort


def family(values, min_n):
    return pd.DataFrame(compare_groups(values, min_n), columns=STATS_COLUMNS[3:])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06); order restored
    assert holm(np.array([0.01, 0.04, 0.03])) == pytest.approx([0.03, 0.06, 0.06])
    assert holm(np.array([0.5, 0.6])) == pytest.approx([1.0, 1.0])
    assert holm(np.array([])).size == 0


def test_cliffs_delta_by_hand_and_brute_force():
    assert cliffs_delta(np.array([1.0, 2, 3]), np.array([1.0, 1])) == pytest.approx(4 / 6)
    assert cliffs_delta(np.array([5.0, 6]), np.array([1.0, 2, 3])) == 1.0
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 17).astype(float), rng.integers(1, 6, 11).astype(float)
    assert cliffs_delta(a, b) == pytest.approx(np.sign(a[:, None] - b[None, :]).mean())
    assert cliffs_delta(b, a) == pytest.approx(-cliffs_delta(a, b))


def test_compare_groups_matches_scipy_and_marks_small_groups():
    rng = np.random.default_rng(0)
    values = {"TP": rng.normal(3, 1, 12), "FP": rng.normal(1, 1, 8), "FN": np.array([0.5, 0.2]),
              "synthetic": rng.normal(2, 1, 6)}
    rows = family(values, min_n=3)
    overall = rows[rows.test == "kruskal"].iloc[0]
    assert overall.group_a == "TP,FP,synthetic" and overall.n_a == 26
    assert overall.p_value == pytest.approx(kruskal(values["TP"], values["FP"], values["synthetic"]).pvalue)
    assert "FN" in overall.note
    pairs = rows[rows.test == "mannwhitneyu"].set_index(["group_a", "group_b"])
    assert len(pairs) == 6
    assert (pairs.loc[[("TP", "FN"), ("FP", "FN"), ("FN", "synthetic")], "note"] == "n too small").all()
    assert pairs.loc[("TP", "FN"), "p_holm"] != pairs.loc[("TP", "FN"), "p_holm"]  # NaN: not tested
    tested = pairs[pairs.note == ""]
    raw = [mannwhitneyu(values[a], values[b]).pvalue for a, b in tested.index]
    assert tested.p_value.tolist() == pytest.approx(raw)
    assert tested.p_holm.tolist() == pytest.approx(holm(np.array(raw)))
    assert pairs.loc[("TP", "FP"), "cliffs_delta"] > 0.5  # TP clearly larger
    summary = rows[rows.test == "summary"].set_index("group_a")
    assert summary.loc["FN", "n_a"] == 2 and summary.loc["FN", "note"] == "n too small"
    assert summary.loc["TP", "median_a"] == pytest.approx(np.median(values["TP"]))


def test_degenerate_families_do_not_crash():
    rows = family({"TP": np.ones(4), "FP": np.ones(3)}, min_n=3)
    assert rows[rows.test == "kruskal"].note.iloc[0] == "all values identical"
    rows = family({"TP": np.ones(4), "FP": np.array([])}, min_n=3)
    assert rows[rows.test == "kruskal"].note.iloc[0].startswith("n too small")
    rows = family({"unknown": np.arange(5.0)}, min_n=3)
    assert len(rows) == 2 and rows[rows.test == "kruskal"].p_value.isna().all()


def test_cohort_with_synthetic_lesions(tmp_path):
    output = load_explain_output(fake_cohort(tmp_path / "out", n_cases=4))
    rng = np.random.default_rng(2)
    synthetic = pd.DataFrame({"case": "case_000", "lesion_id": range(1, 7), "size_mm3": 50.0, "flair_factor": 1.3,
                              "t1_factor": 0.8, "detected": True, "mean_probability": 0.7})
    for channel in output.channels:
        for stat in ("peak_pos", "peak_neg", "mean"):
            synthetic[f"smoothgrad_{channel}_{stat}"] = rng.normal(10, 1, 6)
    output.experiments.mkdir()
    synthetic.to_csv(output.experiments / "synthetic.csv", index=False)
    table = group_statistics(output)
    assert list(table.columns) == STATS_COLUMNS
    flair = table[(table.channel == "FLAIR") & (table.peak == "peak_pos")]
    counts = flair[flair.test == "summary"].set_index("group_a").n_a.to_dict()
    assert counts == {"TP": 8, "FP": 4, "FN": 4, "synthetic": 6}
    assert list(counts) == ["TP", "FP", "FN", "synthetic"]
    overall = flair[flair.test == "kruskal"].iloc[0]
    assert overall.p_value < 0.01 and overall.note == ""
    pairs = flair[flair.test == "mannwhitneyu"].set_index(["group_a", "group_b"])
    assert pairs.loc[("TP", "FN"), "cliffs_delta"] == 1.0  # TP saliency is scaled 6x FN's
    assert pairs.loc[("TP", "synthetic"), "cliffs_delta"] == -1.0
    synthetic.drop(columns="smoothgrad_T1_peak_neg").to_csv(output.experiments / "synthetic.csv", index=False)
    with pytest.raises(AnalysisInputError, match="synthetic.csv: missing column.*smoothgrad_T1_peak_neg"):
        group_statistics(output)



def test_patient_level_compares_each_cases_median_per_group(tmp_path):
    output = load_explain_output(fake_cohort(tmp_path / "out", n_cases=4))
    table = group_statistics(output, min_n=2, level="patient")
    assert list(table.columns) == STATS_COLUMNS and set(table.level) == {"patient"}
    flair = table[(table.channel == "FLAIR") & (table.peak == "peak_pos")]
    # by hand: every case has two TP lesions, one FP and one FN
    medians = output.instances.groupby(["group", "case"]).smoothgrad_FLAIR_peak_pos.median()
    summary = flair[flair.test == "summary"].set_index("group_a")
    assert summary.n_a.to_dict() == {"TP": 4, "FP": 4, "FN": 4}  # one value per patient, not 8 TP lesions
    assert summary.median_a["TP"] == pytest.approx(medians["TP"].median())
    overall = flair[flair.test == "kruskal"].iloc[0]
    assert overall.p_value == pytest.approx(kruskal(medians["TP"], medians["FP"], medians["FN"]).pvalue)
    pair = flair[(flair.group_a == "TP") & (flair.group_b == "FP")].iloc[0]
    assert pair.statistic == mannwhitneyu(medians["TP"], medians["FP"]).statistic
    assert set(group_statistics(output, min_n=2).level) == {"lesion"}
    with pytest.raises(ValueError, match="level must be one of lesion, patient"):
        group_statistics(output, level="visit")

def test_cli_writes_stats_csv(tmp_path):
    out = fake_cohort(tmp_path / "out", n_cases=2)
    result = CliRunner().invoke(main, ["stats", str(out), "--min-n", "3"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "stats.csv")
    fn = table[(table.test == "summary") & (table.group_a == "FN")]
    assert (fn.n_a == 2).all() and (fn.note == "n too small").all()
    assert len(table) == 2 * 2 * (3 + 1 + 3)
    assert CliRunner().invoke(main, ["stats", str(out), "--level", "patient"]).exit_code == 0
    assert set(pd.read_csv(out / "stats.csv").level) == {"patient"}
    table = pd.read_csv(out / "instances.csv").drop(columns="smoothgrad_FLAIR_peak_pos")
    table.to_csv(out / "instances.csv", index=False)
    result = CliRunner().invoke(main, ["stats", str(out)])
    assert result.exit_code == 1 and "instances.csv: missing column(s) smoothgrad_FLAIR_peak_pos" in result.output
