"""The demo's stage bookkeeping, without training: refused stages are reported as skipped, with the reason."""
import pytest

from nnxai.demo import Demo, DemoSettings
from nnxai.analysis.fpfilter import train_filter
from nnxai.nnunet.environment import NNUNET_FOLDERS
from tests.fake_explain_output import fake_cohort
from tests.test_fpfilter import synthetic_features


@pytest.fixture
def demo(tmp_path, monkeypatch):
    for name in (*NNUNET_FOLDERS, "nnUNet_extTrainer"):  # the demo points these at its folder
        monkeypatch.setenv(name, str(tmp_path / name))
    demo = Demo(tmp_path / "demo", DemoSettings.fast())
    monkeypatch.setattr(Demo, "stages", property(lambda self: [("phantom cohort", lambda: None),
                                                                ("false-positive filter", self.fpfilter)]))
    return demo


def test_a_refused_fp_filter_is_summarized_as_skipped_with_its_reason(demo, capsys):
    demo.run()  # nothing was explained: `nnxai fpfilter train` refuses the missing explain folder
    summary = (demo.out / "demo_summary.txt").read_text().splitlines()
    assert summary[0] == "phantom cohort: done"
    assert summary[1].startswith("false-positive filter: skipped: the filter was not trained: ")
    assert str(demo.explained) in summary[1]
    assert summary[1] in capsys.readouterr().out
    demo.run()  # a re-run keeps the reason of the stage skipped earlier
    assert (demo.out / "demo_summary.txt").read_text().splitlines() == summary


@pytest.mark.parametrize("trained", [True, False])
def test_report_stage_shows_the_fp_filters_auc_when_the_filter_stage_trained_one(demo, trained):
    out = fake_cohort(demo.explained, n_cases=1)
    if trained:
        features = synthetic_features(n_patients=4).rename(columns={"signal": "mean_entropy"})
        fp_filter = train_filter(features, n_folds=2, trained_on=[str(out)]).model
        demo.fpfilter_model.parent.mkdir()
        fp_filter.save(demo.fpfilter_model)
    demo.report()
    page = (out / "report" / "report.html").read_text()
    if trained:
        cv = fp_filter.cross_validation
        assert (f"pooled out-of-fold AUC {cv['pooled_auc']:.3f} with the uncertainty features (mean_entropy), "
                f"{cv['pooled_auc_without_uncertainty']:.3f} without.") in page
    else:
        assert "Not run: no filter given" in page
