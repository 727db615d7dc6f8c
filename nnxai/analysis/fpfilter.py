"""Flagging false-positive lesions from their saliency features (issue 6, item 3; after the study's follow-up).

Training: the features (`nnxai.analysis.features`) of the TP and FP instances of one or more explain output folders
(made with ground truth) feed a scikit-learn pipeline, StandardScaler + L1 logistic regression by default,
that predicts P(FP). Cross-validation is grouped by patient (no patient's instances on both sides of a
split; patient = case id unless a case -> patient table says otherwise) and stratified by class where the
groups allow. The scaler is a pipeline step, so each fold fits it on that fold's training instances only.

Applying: every predicted instance of an explain output folder gets P(FP); those above the threshold are
removed from the binary prediction. The filtered masks keep the input geometry; with ground truth, lesion
metrics before and after come with paired case-bootstrap CIs (`nnxai.analysis.comparison`). Applied to the cases it
was trained on, the final model's before/after is in-sample; cross-fitted application scores each such case
with the cross-validation model that did not see its patient, so the before/after is out of sample there too.

Model files are joblib (pickle) files: like checkpoints, load only files from a source you trust.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import SimpleITK as sitk
import sklearn
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from nnxai import __version__
from nnxai.analysis.comparison import Comparison, compare_tables, write_comparison
from nnxai.analysis.features import DEFAULT_SHELL_MM, IDENTITY_COLUMNS, FeatureError, instance_features
from nnxai.errors import InputError
from nnxai.explain.output import AnalysisInputError, ExplainOutput, load_explain_output
from nnxai.explain.uncertainty import UNCERTAINTY_COLUMNS
from nnxai.files import write_atomically
from nnxai.lesions.evaluation import (CasePairing, EvaluationInputError, InstanceOptions, case_counts,
                                      check_same_geometry, list_cases, pair_cases, read_mask, with_metrics)

CLASSIFIERS = ("logistic", "forest")
DEFAULT_THRESHOLD = 0.5
PREDICTION_IMAGE = "prediction.nii.gz"
CASE_TABLE = "instances.csv"
SCORES_TABLE = "instances.csv"
REMOVED_TABLE = "removed.csv"
EVALUATION_FOLDER = "evaluation"


class FPFilterError(InputError, ValueError):
    """Bad input to training or applying a false-positive filter (one line naming the file or the problem)."""


def make_pipeline(classifier: str = "logistic", C: float = 1.0, seed: int = 0) -> Pipeline:
    """Standardize, then classify: L1 logistic regression (sparse, as in the follow-up study) or a random forest."""
    if classifier == "logistic":
        model = LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=seed)
    elif classifier == "forest":
        model = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed)
    else:
        raise FPFilterError(f"unknown classifier {classifier!r}; choose from {', '.join(CLASSIFIERS)}")
    return Pipeline([("scale", StandardScaler()), ("classify", model)])


def cohort_features(out_dirs: list[Path], shell_mm: int = DEFAULT_SHELL_MM, progress: bool = False) -> pd.DataFrame:
    """The feature tables of several explain output folders, which must have the same feature columns."""
    tables = []
    for out_dir in out_dirs:
        try:
            table = instance_features(out_dir, shell_mm, progress)
        except FeatureError as error:
            raise FPFilterError(str(error)) from None
        if tables and list(table.columns) != list(tables[0].columns):
            raise FPFilterError(f"{out_dir}: its features ({len(table.columns) - len(IDENTITY_COLUMNS)} columns) "
                                f"differ from those of {out_dirs[0]} (other channels or map methods)")
        tables.append(table)
    features = pd.concat(tables, ignore_index=True)
    repeated = features["case"][features[["case", "instance_id"]].duplicated()].unique()
    if len(repeated):
        raise FPFilterError(f"case(s) {', '.join(map(str, repeated[:5]))} appear in more than one output folder")
    return features


def feature_names(features: pd.DataFrame) -> list[str]:
    return [c for c in features.columns if c not in IDENTITY_COLUMNS]


def training_labels(features: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The TP and FP instances and their labels (1 = FP); refuses a table lacking either class."""
    known = features[features["group"].isin(("TP", "FP"))].reset_index(drop=True)
    counts = known["group"].value_counts()
    if known.empty:
        raise FPFilterError("no TP or FP instance in the feature table: run nnxai explain with --gt")
    if len(counts) < 2:
        present = counts.index[0]
        raise FPFilterError(f"the feature table has only {present} instances ({counts[present]}) and no "
                            f"{'FP' if present == 'TP' else 'TP'}: training needs both TP and FP instances")
    return known, (known["group"] == "FP").to_numpy(dtype=int)


def read_patients(path: Path) -> dict[str, str]:
    """A case -> patient table (CSV with columns case, patient)."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise FPFilterError(f"{path}: not a readable CSV table ({str(error).splitlines()[0]})") from None
    if not {"case", "patient"} <= set(table.columns):
        raise FPFilterError(f"{path}: needs columns case and patient, has {', '.join(table.columns)}")
    conflicting = table.groupby("case")["patient"].nunique()
    if (conflicting > 1).any():
        raise FPFilterError(f"{path}: case {conflicting[conflicting > 1].index[0]} is given several patients")
    return dict(zip(table["case"], table["patient"]))


def patient_groups(cases: pd.Series, case_to_patient: dict[str, str] | None) -> np.ndarray:
    """The patient of each row (the case id itself without a table); every case must be in the table."""
    if case_to_patient is None:
        return cases.astype(str).to_numpy()
    missing = sorted(set(cases.astype(str)) - set(case_to_patient))
    if missing:
        raise FPFilterError(f"no patient given for {len(missing)} case(s): {', '.join(missing[:10])}")
    return cases.astype(str).map(case_to_patient).to_numpy()


@dataclass
class CrossValidation:
    """Out-of-fold P(FP) per instance, the fold each instance was tested in, and AUCs.

    `fold_auc` holds None for a fold whose test instances are all of one class (AUC undefined there);
    `pooled_auc` is the AUC of all out-of-fold predictions together.
    """
    probability: np.ndarray
    fold: np.ndarray
    train_indices: list[np.ndarray]
    pipelines: list[Pipeline]
    fold_auc: list[float | None]
    pooled_auc: float

    def summary(self, y: np.ndarray, threshold: float) -> dict:
        """AUCs and, at `threshold`, how many FP and TP instances the out-of-fold predictions would remove."""
        defined = [a for a in self.fold_auc if a is not None]
        removed = self.probability > threshold
        return {"folds": len(self.fold_auc), "fold_auc": self.fold_auc, "pooled_auc": self.pooled_auc,
                "mean_fold_auc": float(np.mean(defined)) if defined else None,
                "threshold": threshold, "fp": int(y.sum()), "tp": int((1 - y).sum()),
                "fp_removed": int((removed & (y == 1)).sum()), "tp_removed": int((removed & (y == 0)).sum())}


def cross_validate(X: np.ndarray, y: np.ndarray, groups: np.ndarray, pipeline: Pipeline, n_folds: int = 5,
                   seed: int = 0) -> CrossValidation:
    """Patient-grouped, class-stratified k-fold CV of a fresh copy of `pipeline` per fold."""
    n_patients = len(np.unique(groups))
    if n_patients < 2:
        raise FPFilterError(f"cross-validation needs instances from at least 2 patients, got {n_patients}")
    n_folds = min(n_folds, n_patients)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    probability, fold = np.zeros(len(y)), np.zeros(len(y), dtype=int)
    train_indices, pipelines, fold_auc = [], [], []
    for k, (train, test) in enumerate(splitter.split(X, y, groups)):
        if len(np.unique(y[train])) < 2:
            raise FPFilterError(f"cross-validation fold {k + 1}: its training instances are all "
                                f"{'FP' if y[train][0] else 'TP'}; use fewer folds or add patients")
        fitted = clone(pipeline).fit(X[train], y[train])
        probability[test] = fitted.predict_proba(X[test])[:, 1]
        fold[test] = k
        fold_auc.append(float(roc_auc_score(y[test], probability[test])) if len(np.unique(y[test])) == 2 else None)
        train_indices.append(train)
        pipelines.append(fitted)
    return CrossValidation(probability, fold, train_indices, pipelines, fold_auc,
                           float(roc_auc_score(y, probability)))


@dataclass
class FPFilter:
    """A trained false-positive filter: the fitted pipeline and everything needed to apply it the same way.

    `fold_pipelines[k]` was fitted without the cases `held_out_fold` maps to k (cross-fitted application).
    """
    pipeline: Pipeline
    feature_columns: list[str]
    shell_mm: int
    threshold: float
    classifier: str
    cross_validation: dict
    trained_on: list[str]
    fold_pipelines: list[Pipeline] = field(default_factory=list)
    held_out_fold: dict[str, int] = field(default_factory=dict)
    versions: dict = field(default_factory=lambda: {"nnxai": __version__, "scikit-learn": sklearn.__version__})

    def _matrix(self, features: pd.DataFrame, source: Path | str) -> np.ndarray:
        missing = [c for c in self.feature_columns if c not in features.columns]
        if missing:
            raise FPFilterError(f"{source}: lacks {len(missing)} feature(s) the filter was trained on, e.g. "
                                f"{', '.join(missing[:3])} (explain it with the same channels and methods)")
        return features[self.feature_columns].to_numpy(dtype=float)

    def fp_probability(self, features: pd.DataFrame, source: Path | str = "feature table") -> np.ndarray:
        """P(FP) of every row of a feature table made like the training one."""
        X = self._matrix(features, source)
        return self.pipeline.predict_proba(X)[:, 1] if len(X) else np.zeros(0)

    def cross_fitted_probability(self, features: pd.DataFrame,
                                 source: Path | str = "feature table") -> tuple[np.ndarray, np.ndarray]:
        """P(FP) of every row, each training case's rows by the fold model that did not see its patient, other
        rows by the final model; and per row the fold (1-based) that scored it, 0 for the final model."""
        if not self.fold_pipelines:
            raise FPFilterError("this filter holds no cross-validation models (trained by an older nnxai); "
                                "train it again for cross-fitted application")
        X = self._matrix(features, source)
        fold = features["case"].astype(str).map(self.held_out_fold).fillna(-1).to_numpy(dtype=int)
        probability = np.zeros(len(X))
        for k, pipeline in enumerate([self.pipeline, *self.fold_pipelines], start=-1):  # -1: the final model
            rows = fold == k
            if rows.any():
                probability[rows] = pipeline.predict_proba(X[rows])[:, 1]
        return probability, fold + 1

    def coefficients(self) -> pd.Series:
        """Non-zero logistic coefficients on standardized features, largest magnitude first (empty for a forest)."""
        model = self.pipeline.named_steps["classify"]
        if not hasattr(model, "coef_"):
            return pd.Series(dtype=float)
        weights = pd.Series(model.coef_[0], index=self.feature_columns)
        weights = weights[weights != 0]
        return weights.reindex(weights.abs().sort_values(ascending=False).index)

    def save(self, path: Path) -> None:
        write_atomically(Path(path), lambda temporary: joblib.dump(self, temporary))

    @staticmethod
    def load(path: Path) -> FPFilter:
        """Load a filter saved by `save` (unpickling: trusted files only)."""
        try:
            model = joblib.load(path)
        except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, KeyError) as error:
            raise FPFilterError(f"{path}: cannot load a false-positive filter ({error!r})") from None
        if not isinstance(model, FPFilter):
            raise FPFilterError(f"{path}: holds a {type(model).__name__}, not an nnxai false-positive filter")
        return model


@dataclass
class Training:
    """A trained filter, its cross-validation, and the training instances with patient, fold and out-of-fold P(FP)."""
    model: FPFilter
    cross_validation: CrossValidation
    instances: pd.DataFrame


def train_filter(features: pd.DataFrame, case_to_patient: dict[str, str] | None = None,
                 classifier: str = "logistic", C: float = 1.0, n_folds: int = 5, seed: int = 0,
                 threshold: float = DEFAULT_THRESHOLD, shell_mm: int = DEFAULT_SHELL_MM,
                 trained_on: list[str] | None = None) -> Training:
    """Cross-validate, then fit on all TP and FP instances of a feature table."""
    known, y = training_labels(features)
    columns = feature_names(known)
    X = known[columns].to_numpy(dtype=float)
    if not np.isfinite(X).all():
        row, column = np.argwhere(~np.isfinite(X))[0]
        raise FPFilterError(f"feature {columns[column]} of case {known['case'][row]} instance "
                            f"{known['instance_id'][row]} is not finite")
    groups = patient_groups(known["case"], case_to_patient)
    pipeline = make_pipeline(classifier, C, seed)
    validation = cross_validate(X, y, groups, pipeline, n_folds, seed)
    summary = validation.summary(y, threshold)
    certain = [i for i, column in enumerate(columns) if column not in UNCERTAINTY_COLUMNS]
    if len(certain) < len(columns):  # does uncertainty help? The same CV without its features
        summary["pooled_auc_without_uncertainty"] = cross_validate(X[:, certain], y, groups, pipeline, n_folds,
                                                                   seed).pooled_auc
    held_out_fold = dict(zip(known["case"].astype(str), validation.fold.tolist()))
    model = FPFilter(clone(pipeline).fit(X, y), columns, shell_mm, threshold, classifier,
                     summary, list(trained_on or []), validation.pipelines, held_out_fold)
    instances = known[list(IDENTITY_COLUMNS)].assign(patient=groups, fold=validation.fold + 1,
                                                     fp_probability=validation.probability)
    return Training(model, validation, instances)


def train_filter_files(out_dirs: list[Path], model_path: Path, patients: Path | None = None,
                       classifier: str = "logistic", C: float = 1.0, n_folds: int = 5, seed: int = 0,
                       threshold: float = DEFAULT_THRESHOLD, shell_mm: int = DEFAULT_SHELL_MM,
                       progress: bool = False) -> tuple[Training, list[Path]]:
    """Train a filter on explain output folders and write it with its tables: the model file, and beside it
    <name>_features.csv (every instance's features) and <name>_cv.csv (training instances, out-of-fold P(FP))."""
    features = cohort_features(list(out_dirs), shell_mm, progress)
    training = train_filter(features, read_patients(patients) if patients else None, classifier, C, n_folds, seed,
                            threshold, shell_mm, [str(p) for p in out_dirs])
    features_path = model_path.with_name(f"{model_path.stem}_features.csv")
    cv_path = model_path.with_name(f"{model_path.stem}_cv.csv")
    write_atomically(features_path, lambda p: features.to_csv(p, index=False))
    write_atomically(cv_path, lambda p: training.instances.to_csv(p, index=False))
    training.model.save(model_path)
    return training, [model_path, features_path, cv_path]


@dataclass
class FilterResult:
    """Scores of all predicted instances, where the filtered masks went, and before/after metrics with GT.

    `without_ground_truth` lists the cases left out of the evaluation for lack of a GT mask (`only_common`).
    """
    scores: pd.DataFrame
    output: Path
    comparison: Comparison | None
    without_ground_truth: list[str]

    @property
    def removed(self) -> pd.DataFrame:
        return self.scores[self.scores["removed"]]


def evaluation_options(record: dict) -> InstanceOptions:
    """Instance options of the explain run, so matching after filtering is the one that formed the groups."""
    settings = record.get("settings", {})
    defaults = InstanceOptions()
    return InstanceOptions(int(settings.get("connectivity", defaults.connectivity)),
                           int(settings.get("min_size", defaults.min_size)), settings.get("rule", defaults.rule),
                           float(settings.get("iou_threshold", defaults.iou_threshold)))


def _ground_truth_files(out_dir: Path, record: dict, gt_dir: Path | None, cases: list[str],
                        only_common: bool) -> tuple[dict[str, Path], list[str]]:
    """GT file of each case of OUT, and the cases without one (an error unless `only_common`).

    Without `gt_dir` the explain run's GT folder is used if it still exists; without either, nothing.
    GT cases that OUT does not hold are not part of this run and are ignored.
    """
    if gt_dir is None:
        recorded = record.get("ground_truth")
        if not recorded or not Path(recorded).is_dir():
            return {}, []
        gt_dir = Path(recorded)
    try:
        gt_files = {c: f for c, f in list_cases(gt_dir, record.get("file_ending", ".nii.gz")).items() if c in cases}
        if not gt_files:
            raise EvaluationInputError(f"{gt_dir}: no ground truth for any case of {out_dir}")
        pairing = pair_cases(gt_files, {c: out_dir / c / PREDICTION_IMAGE for c in cases}, gt_dir, out_dir,
                             only_common)
    except EvaluationInputError as error:
        raise FPFilterError("; ".join(error.problems)) from None
    return {case: gt_files[case] for case in pairing.cases}, pairing.only_in_predictions


def apply_filter(model: FPFilter, out_dir: Path, filtered_dir: Path, threshold: float | None = None,
                 gt_dir: Path | None = None, only_common: bool = False, n_bootstrap: int = 2000, seed: int = 0,
                 overwrite: bool = False, progress: bool = False, cross_fitted: bool = False) -> FilterResult:
    """Remove the instances the filter flags from every case's prediction; write masks, tables and metrics.

    `cross_fitted`: score the cases the filter was trained on with their held-out fold's model
    (`FPFilter.cross_fitted_probability`); the scores table says which model scored each instance.
    `filtered_dir` gets `<case>.nii.gz` (an nnU-Net prediction folder), `instances.csv` (every predicted
    instance with P(FP) and whether it was removed), `removed.csv`, and with ground truth (`gt_dir`, else
    the explain run's) `evaluation/` with before/after lesion metrics. All of it appears at once.
    """
    out_dir, filtered_dir = Path(out_dir), Path(filtered_dir)
    threshold = model.threshold if threshold is None else threshold
    if filtered_dir.exists() and not overwrite:
        raise FPFilterError(f"{filtered_dir}: exists; choose another output folder or overwrite it")
    try:
        output = load_explain_output(out_dir)
        features = instance_features(out_dir, model.shell_mm, progress)
    except (AnalysisInputError, FeatureError) as error:
        raise FPFilterError(str(error)) from None
    record = output.record
    if cross_fitted:
        probability, scored_by_fold = model.cross_fitted_probability(features, out_dir)
    else:
        probability, scored_by_fold = model.fp_probability(features, out_dir), np.zeros(len(features), dtype=int)
    scores = features[list(IDENTITY_COLUMNS)].assign(
        fp_probability=probability, scored_by_fold=scored_by_fold, removed=probability > threshold,
        volume_mm3=np.exp(features["log_volume_mm3"]), mean_probability=features["mean_probability"])
    cases = sorted(p.parent.name for p in out_dir.glob(f"*/{CASE_TABLE}") if not p.parent.name.startswith("."))
    gt_files, without_gt = _ground_truth_files(out_dir, record, gt_dir, cases, only_common)
    options = evaluation_options(record)
    staging = filtered_dir.with_name(f".{filtered_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        counts = _write_filtered_cases(output, cases, scores, staging, gt_files, options)
        scores.to_csv(staging / SCORES_TABLE, index=False)
        scores[scores["removed"]].to_csv(staging / REMOVED_TABLE, index=False)
        comparison = None
        if counts:
            pairing = CasePairing(sorted(gt_files), [], without_gt)
            comparison = compare_tables({name: with_metrics(pd.DataFrame(rows), options.lesion_f1)
                                         for name, rows in counts.items()},
                                        dict.fromkeys(counts, pairing), options, n_bootstrap, seed)
            write_comparison(comparison, staging / EVALUATION_FOLDER)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if filtered_dir.exists():
        shutil.rmtree(filtered_dir)
    staging.rename(filtered_dir)
    return FilterResult(scores, filtered_dir, comparison, without_gt)


def _write_filtered_cases(output: ExplainOutput, cases: list[str], scores: pd.DataFrame, staging: Path,
                          gt_files: dict[str, Path], options: InstanceOptions) -> dict[str, list[dict]]:
    """Write each case's filtered mask; return per-case counts before and after (empty without GT)."""
    removed = scores[scores["removed"]].groupby("case")["instance_id"].apply(list).to_dict()
    counts = {"before": [], "after": []} if gt_files else {}
    for case in cases:
        prediction_path = output.folder / case / PREDICTION_IMAGE
        try:
            prediction, image = read_mask(prediction_path)
        except EvaluationInputError as error:
            raise FPFilterError("; ".join(error.problems)) from None
        instances_path = output.instance_labels_path(case)
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(instances_path)))
        if instances.shape != prediction.shape:
            raise FPFilterError(f"{instances_path}: shape {instances.shape} differs from {PREDICTION_IMAGE}'s "
                                f"{prediction.shape}")
        filtered = prediction & ~np.isin(instances, removed.get(case, []))
        filtered_image = sitk.GetImageFromArray(filtered.astype(np.uint8))
        filtered_image.CopyInformation(image)
        sitk.WriteImage(filtered_image, str(staging / f"{case}.nii.gz"), True)
        if case in gt_files:
            try:
                gt, gt_image = read_mask(gt_files[case])
                check_same_geometry(prediction_path, image, gt_files[case], gt_image)
            except EvaluationInputError as error:
                raise FPFilterError("; ".join(error.problems)) from None
            counts["before"].append({"case": case, **case_counts(prediction, gt, options)})
            counts["after"].append({"case": case, **case_counts(filtered, gt, options)})
    return counts

