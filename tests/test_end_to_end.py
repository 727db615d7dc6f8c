"""The main job end to end on a small phantom cohort: nnU-Net planning, training, prediction, explanation."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnxai.demo import TRAINER, Demo, DemoSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run = Demo(tmp_path_factory.mktemp("demo"), DemoSettings.fast())
    run.run()
    return run


def test_nnunet_prediction_has_the_input_geometry(demo):
    for image_file in sorted((demo.dataset / "imagesTs").glob("*_0000.nii.gz")):
        case = image_file.name.removesuffix("_0000.nii.gz")
        image = sitk.ReadImage(str(image_file))
        prediction = sitk.ReadImage(str(demo.predictions / TRAINER / f"{case}.nii.gz"))
        assert prediction.GetSize() == image.GetSize()
        assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
        assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
        assert np.allclose(prediction.GetDirection(), image.GetDirection())


def test_explained_segmentation_equals_nnunet_predict_of_the_trained_model(demo):
    cases = [p.parent.name for p in demo.explained.glob("*/instances.csv")]
    assert cases
    for case in cases:
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(demo.predictions / TRAINER / f"{case}.nii.gz"))) > 0
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(demo.explained / case / "prediction.nii.gz"))) > 0
        assert np.array_equal(theirs, ours), f"{case}: {(theirs != ours).sum()} voxels differ"


def test_every_lesion_is_explained_with_its_group(demo):
    table = pd.read_csv(demo.explained / "instances.csv")
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(demo.dataset / "labelsTs" / f"{table.case.iloc[0]}.nii.gz")))
    assert set(table.group) <= {"TP", "FP", "FN"}
    assert (table.group != "FP").sum() >= 1 and gt.any()
    for row in table.itertuples():
        assert (demo.explained / row.case / "smoothgrad" / f"{row.instance_id:03d}_FLAIR.nii.gz").is_file()


def test_rerun_resumes_after_the_last_finished_stage(demo, capsys):
    demo.run()
    assert capsys.readouterr().out.count("done earlier, skipped") == len(demo.stages)


def test_analyses_and_report_are_written(demo):
    for name in ["rings.csv", "stats.csv", "experiments/synthetic.csv", "experiments/context.csv",
                 "sanity/randomization.csv", "sanity/deletion.csv", "report/report.html"]:
        assert (demo.explained / name).is_file(), name
    assert (demo.out / "comparison" / "comparison.md").is_file()
