"""False-positive filter: a known answer, patient-grouped CV, per-fold scaling, one-class refusal, train/apply."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from nnxai.analysis.fpfilter import FPFilter, FPFilterError, apply_filter, cohort_features, train_filter
from nnxai.cli import main
from tests.fake_explain import FakeInstance, save, write_filter_output

NOISE_FEATURES = [f"noise_{i}" for i in range(8)]


def synthetic_features(n_patients=20, per_patient=10, shift=3.0, seed=0) -> pd.DataFrame:
    """Standard-normal features; FP instances (a third) have `signal` shifted up by `shift`."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    fp = rng.random(n) < 1 / 3
    table = pd.DataFrame({"case": [f"case{i // per_patient:02d}" for i in range(n)],
                          "instance_id": [i % per_patient + 1 for i in range(n)],
                          "group": np.where(fp, "FP", "TP")})
    table["signal"] = rng.normal(size=n) + shift * fp
    for name in NOISE_FEATURES:
        table[name] = rng.normal(size=n)
    return table


def test_filter_finds_the_shifted_feature():
    training = train_filter(synthetic_features(), n_folds=5)
    assert training.cross_validation.pooled_auc > 0.95
    assert all(a > 0.85 for a in training.cross_validation.fold_auc)
    coefficients = training.model.coefficients()
    assert coefficients.index[0] == "signal" and coefficients["signal"] > 1
    assert coefficients.drop("signal").abs().max() < 0.3 * coefficients["signal"]
    # the same data without the shift carries no signal
    null = train_filter(synthetic_features(shift=0.0), n_folds=5)
    assert 0.3 < null.cross_validation.pooled_auc < 0.7


def test_auc_without_uncertainty_is_reported_beside_the_full_one():
    features = synthetic_features().rename(columns={"signal": "mean_entropy"})  # FP lesions: higher entropy
    summary = train_filter(features, n_folds=5).model.cross_validation
    assert summary["pooled_auc"] > 0.95 and 0.3 < summary["pooled_auc_without_uncertainty"] < 0.7
    assert "pooled_auc_without_uncertainty" not in train_filter(synthetic_features(), n_folds=5).model.cross_validation


def test_cross_validation_never_splits_a_patient_and_scales_on_training_folds_only():
    features = synthetic_features(n_patients=12, per_patient=6)
    case_to_patient = {f"case{i:02d}": f"patient{i // 3}" for i in range(12)}  # three cases per patient
    training = train_filter(features, case_to_patient, n_folds=3)
    instances, validation = training.instances, training.cross_validation
    X = features[["signal", *NOISE_FEATURES]].to_numpy()
    assert sorted(instances["fold"].unique()) == [1, 2, 3]
    for k, (train, pipeline) in enumerate(zip(validation.train_indices, validation.pipelines)):
        test = np.flatnonzero(validation.fold == k)
        assert not set(instances["patient"][train]) & set(instances["patient"][test])
        assert sorted(np.concatenate([train, test])) == list(range(len(features)))
        scaler = pipeline.named_steps["scale"]
        assert np.allclose(scaler.mean_, X[train].mean(axis=0)) and np.allclose(scaler.scale_, X[train].std(axis=0))
        assert not np.allclose(scaler.mean_, X.mean(axis=0))
    assert instances.groupby("patient")["fold"].nunique().max() == 1


def test_one_class_and_missing_patients_are_refused():
    features = synthetic_features()
    with pytest.raises(FPFilterError, match=r"only TP instances \(\d+\) and no FP: training needs both"):
        train_filter(features[features["group"] == "TP"])
    with pytest.raises(FPFilterError, match="run nnxai explain with --gt"):
        train_filter(features.assign(group="unknown"))
    with pytest.raises(FPFilterError, match=r"no patient given for 19 case\(s\): case01"):
        train_filter(features, {"case00": "p0"})
    with pytest.raises(FPFilterError, match="at least 2 patients"):
        train_filter(features, dict.fromkeys(features["case"], "p0"))


SHAPE = (12, 12, 8)
SPACING = (1.0, 1.0, 2.0)
BLOBS = [(slice(1, 4), slice(1, 4), slice(1, 3)), (slice(7, 10), slice(7, 10), slice(1, 3)),
         (slice(7, 10), slice(2, 5), slice(5, 7))]


def synthetic_output(out_dir, gt_dir, cases, seed):
    """Explain outputs where two blobs per case are TP (high FLAIR saliency inside) and one is FP (low)."""
    rng = np.random.default_rng(seed)
    outputs, probabilities = {}, {}
    for case in cases:
        instances = []
        for instance_id, (blob, group, inside) in enumerate(zip(BLOBS, ("TP", "TP", "FP"), (1.0, 1.0, 0.2)), start=1):
            mask = np.zeros(SHAPE, dtype=bool)
            mask[blob] = True
            flair = rng.normal(0, 0.1, SHAPE) + inside * mask
            instances.append(FakeInstance(instance_id, group, mask, {"FLAIR": flair, "T1": rng.normal(0, 0.1, SHAPE)}))
            probabilities[case, instance_id] = rng.uniform(0.6, 0.9)
        gt = instances[0].mask | instances[1].mask
        gt[10, 10, 0] = True  # a lesion nobody finds: an FN the filter cannot change
        save(gt.astype(np.uint8), gt_dir / f"{case}.nii.gz", SPACING)
        outputs[case] = instances
    write_filter_output(out_dir, outputs, SPACING, probabilities, ground_truth=gt_dir)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpfilter")
    synthetic_output(root / "train", root / "gt", [f"tr{i}" for i in range(6)], seed=0)
    synthetic_output(root / "test", root / "gt", [f"te{i}" for i in range(3)], seed=1)
    return root


def test_train_and_apply_remove_the_false_positives(outputs, tmp_path):
    training = train_filter(cohort_features([outputs / "train"]), n_folds=3)
    assert training.cross_validation.pooled_auc == 1.0
    model_path = tmp_path / "model.joblib"
    training.model.save(model_path)
    result = apply_filter(FPFilter.load(model_path), outputs / "test", tmp_path / "filtered", n_bootstrap=200)
    assert sorted(result.removed[["case", "instance_id"]].itertuples(index=False, name=None)) == [
        ("te0", 3), ("te1", 3), ("te2", 3)]
    assert (result.removed["fp_probability"] > 0.5).all() and (result.removed["group"] == "FP").all()
    assert result.removed["volume_mm3"].tolist() == pytest.approx([3 * 3 * 2 * 2.0] * 3)
    for case in ("te0", "te1", "te2"):
        filtered = sitk.ReadImage(str(tmp_path / "filtered" / f"{case}.nii.gz"))
        original = sitk.ReadImage(str(outputs / "test" / case / "prediction.nii.gz"))
        assert filtered.GetSpacing() == original.GetSpacing() and filtered.GetOrigin() == original.GetOrigin()
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / "test" / case / "instances.nii.gz")))
        assert np.array_equal(sitk.GetArrayFromImage(filtered), np.isin(instances, [1, 2]))
        assert sitk.GetArrayFromImage(original).sum() == 3 * 18
    metrics = result.comparison.metrics.set_index(["metric", "aggregate"])
    # per case: TP 2, FP 1, FN 1 before -> F1 = 2 / (2 + 1) = 2/3, PPV 2/3, TPR 2/3; after FP 0 -> F1 0.8, PPV 1
    assert metrics.loc[("lesion_f1", "pooled"), ["before", "after"]].tolist() == pytest.approx([2 / 3, 0.8])
    assert metrics.loc[("lesion_ppv", "pooled"), ["before", "after"]].tolist() == pytest.approx([2 / 3, 1.0])
    assert metrics.loc[("lesion_tpr", "pooled"), ["before", "after"]].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert (tmp_path / "filtered" / "evaluation" / "comparison.md").is_file()
    with pytest.raises(FPFilterError, match="exists"):
        apply_filter(training.model, outputs / "test", tmp_path / "filtered")


def test_cli_train_and_apply(outputs, tmp_path):
    model = tmp_path / "model.joblib"
    result = CliRunner().invoke(main, ["fpfilter", "train", str(outputs / "train"), "-o", str(model), "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "pooled out-of-fold AUC 1.000" in result.output
    cv = pd.read_csv(tmp_path / "model_cv.csv")
    assert len(cv) == 18 and set(cv["fold"]) == {1, 2, 3}
    result = CliRunner().invoke(main, ["fpfilter", "apply", str(model), str(outputs / "test"), "-o",
                                       str(tmp_path / "filtered"), "--threshold", "0.999", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "lesion_f1" in result.output and "removed 0 of 9 instances" in result.output
    assert pd.read_csv(tmp_path / "filtered" / "removed.csv").empty


def test_cli_one_class_message(tmp_path):
    out = tmp_path / "out"
    synthetic_output(out, tmp_path / "gt", ["a", "b"], seed=0)
    table = pd.read_csv(out / "instances.csv")
    table.assign(group="TP").to_csv(out / "instances.csv", index=False)
    result = CliRunner().invoke(main, ["fpfilter", "train", str(out), "-o", str(tmp_path / "m.joblib")])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "Error: the feature table has only TP instances (6) and no FP: training needs both TP and FP instances")
    assert not (tmp_path / "m.joblib").exists()


def test_cross_fitted_scores_are_the_out_of_fold_ones():
    """Each training case is scored by the fold model that never saw its patient; unseen cases by the final one."""
    features = synthetic_features(n_patients=6)
    training = train_filter(features, n_folds=3)
    model = training.model
    unseen = synthetic_features(n_patients=2, seed=1).assign(case=lambda t: "new_" + t["case"])
    probability, fold = model.cross_fitted_probability(pd.concat([features, unseen], ignore_index=True))
    out_of_fold = training.instances.set_index(["case", "instance_id"])
    trained = features.set_index(["case", "instance_id"]).index
    assert probability[:len(features)] == pytest.approx(out_of_fold.loc[trained, "fp_probability"].to_numpy())
    assert fold[:len(features)].tolist() == out_of_fold.loc[trained, "fold"].tolist()
    assert probability[len(features):] == pytest.approx(model.fp_probability(unseen))
    assert (fold[len(features):] == 0).all()
    assert not np.allclose(probability[:len(features)], model.fp_probability(features))  # in-sample differs


def test_cross_fitted_apply_on_the_training_cases(outputs, tmp_path):
    training = train_filter(cohort_features([outputs / "train"]), n_folds=3)
    result = apply_filter(training.model, outputs / "train", tmp_path / "filtered", n_bootstrap=200,
                          cross_fitted=True)
    scores = result.scores.merge(training.instances, on=["case", "instance_id"], suffixes=("", "_cv"))
    assert len(scores) == 18
    assert scores["fp_probability"].to_numpy() == pytest.approx(scores["fp_probability_cv"].to_numpy())
    assert (scores["scored_by_fold"] == scores["fold"]).all()
    assert sorted(result.removed["instance_id"]) == [3] * 6
    with pytest.raises(FPFilterError, match="no cross-validation models"):
        apply_filter(dataclasses.replace(training.model, fold_pipelines=[]), outputs / "train", tmp_path / "again",
                     cross_fitted=True)
