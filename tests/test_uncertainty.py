"""Per-lesion uncertainty: known values by hand, and a 2-fold model against nnU-Net's predictor fold by fold."""
import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnxai.explain.cohort import explain_cohort
from nnxai.explain.settings import ExplainSettings
from nnxai.explain.uncertainty import binary_entropy, instance_uncertainty
from nnxai.nnunet.model import load_model
from tests.fake_model import write_case, write_model_folder


def test_entropy_and_fold_spread_of_hand_built_probabilities():
    assert np.allclose(binary_entropy(np.array([0.0, 0.5, 1.0, 0.25])), [0, 1, 0, 0.8112781244591328])
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    ensemble = np.full((3, 4), 0.9)
    ensemble[1, 1] = 0.5  # entropies 1 and 0.469 inside
    folds = [np.full((3, 4), 0.2), np.full((3, 4), 0.6)]
    values = instance_uncertainty(mask, ensemble, folds)
    assert np.isclose(values["fold_std_probability"], 0.2)  # fold means 0.2 and 0.6
    assert np.isclose(values["mean_entropy"], (1 + 0.4689955935892812) / 2)
    assert np.isnan(instance_uncertainty(mask, ensemble, folds[:1])["fold_std_probability"])


def test_two_fold_uncertainty_equals_nnunet_predictor_fold_by_fold(tmp_path):
    torch.set_num_threads(1)
    folder = write_model_folder(tmp_path / "model", folds=(0, 1))
    write_case(tmp_path / "images", "case_0", seed=0, labels_dir=tmp_path / "labels")
    explain_cohort(load_model(folder), tmp_path / "images", tmp_path / "out", ExplainSettings(samples=1),
                   tmp_path / "labels", progress=False)
    table = pd.read_csv(tmp_path / "out" / "case_0" / "instances.csv")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_0" / "instances.nii.gz")))
    files = [str(tmp_path / "images" / f"case_0_{c:04d}.nii.gz") for c in range(2)]

    def probability(folds):
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), folds)
        images, properties = SimpleITKIO().read_images(files)
        return predictor.predict_single_npy_array(images, properties, None, None, True)[1][1]

    ensemble, per_fold = probability((0, 1)), [probability((0,)), probability((1,))]
    assert len(table) >= 2
    for row in table.itertuples():
        mask = labels == row.instance_id
        fold_means = [fold[mask].mean() for fold in per_fold]
        p = ensemble[mask].astype(np.float64)
        entropy = np.mean(-p * np.log2(np.clip(p, 1e-300, 1)) - (1 - p) * np.log2(np.clip(1 - p, 1e-300, 1)))
        assert np.isclose(row.fold_std_probability, abs(fold_means[0] - fold_means[1]) / 2, atol=1e-5)
        assert np.isclose(row.mean_entropy, entropy, atol=1e-4)  # the exports differ by float16 steps
    assert table.fold_std_probability.gt(1e-4).any()  # the two folds disagree somewhere
