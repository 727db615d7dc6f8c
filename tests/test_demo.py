"""The demo's stage bookkeeping, without training: refused stages are reported as skipped, with the reason."""
import pytest

from nnxai.demo import Demo, DemoSettings
from nnxai.nnunet.environment import NNUNET_FOLDERS


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
