"""The HTML report: every section from a complete folder, "not run" for missing inputs, renders in Chromium."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

from nnxai.analysis.report import build_sections, gallery_examples, write_report
from nnxai.analysis.rings import ring_table, write_rings
from nnxai.analysis.statistics import group_statistics, write_statistics
from nnxai.cli import main
from nnxai.analysis.fpfilter import train_filter
from nnxai.explain.output import load_explain_output
from nnxai.sanity.randomization import VERDICT_COLUMNS
from tests.fake_explain_output import fake_cohort
from tests.test_fpfilter import synthetic_features

SECTIONS = ["cohort", "peaks", "statistics", "rings", "context", "synthetic", "sanity", "fpfilter", "gallery",
            "viewer"]


def write_experiments(out: Path, seed: int = 0) -> None:
    """Synthetic, context and sanity tables as the experiments and sanity commands write them."""
    rng = np.random.default_rng(seed)
    experiments, sanity = out / "experiments", out / "sanity"
    experiments.mkdir()
    sizes, factors = np.repeat([10.0, 100.0, 1000.0], 6), np.tile([1.1, 1.2, 1.32], 6)
    probability = np.clip(0.25 * np.log10(sizes) + 2 * (factors - 1.1) + rng.normal(0, 0.05, 18), 0, 1)
    synthetic = pd.DataFrame({"case": "case_000", "lesion_id": range(1, 19), "size_mm3": sizes,
                              "flair_factor": factors, "t1_factor": 0.8, "detected": probability > 0.5,
                              "mean_probability": probability})
    for channel in ("FLAIR", "T1"):
        synthetic[f"smoothgrad_{channel}_peak_pos"] = probability * 4 + rng.normal(0, 0.1, 18)
        synthetic[f"smoothgrad_{channel}_peak_neg"] = -probability + rng.normal(0, 0.1, 18)
        synthetic[f"smoothgrad_{channel}_mean"] = probability
    synthetic.to_csv(experiments / "synthetic.csv", index=False)
    rows = [{"case": f"case_00{i % 2}", "lesion_id": i, "k_mm": k, "mean_probability": min(1, k / (5 + i)),
             "detected": k >= 5 + i} for i in range(4) for k in range(1, 15)]
    pd.DataFrame(rows).to_csv(experiments / "context.csv", index=False)
    (experiments / "context_summary.json").write_text(json.dumps(
        {"required_context_mm": 7, "ci_low": 5, "ci_high": 8, "confidence": 0.95, "n_lesions": 4,
         "k_mm": list(range(1, 15)), "definition": "smallest k from which detection stays on its plateau"}))
    sanity.mkdir()
    randomization = pd.DataFrame([{"method": "smoothgrad", "channel": c, "step": s, "layer": f"stage{s}",
                                   "spearman": 1 - s / 4, "ssim": 1 - s / 5}
                                  for c in ("FLAIR", "T1") for s in range(5)])
    randomization.to_csv(sanity / "randomization.csv", index=False)
    verdicts = pd.DataFrame({"method": "smoothgrad", "channel": ["FLAIR", "T1"], "statistic": "spearman_abs",
                             "instances": 2, "threshold": 0.5, "verdict": ["pass", "FAIL"], "constant_maps": 0})
    for column in VERDICT_COLUMNS[len(verdicts.columns):]:  # as wide as the real table
        verdicts[column] = [0.137137617, 0.6213303508]
    verdicts.to_csv(sanity / "randomization_verdicts.csv", index=False)
    deletion = pd.DataFrame([{"case": "case_000", "instance_id": i, "group": g, "order": o, "k_percent": k,
                              "mean_probability": (1 - k / 60) if o == "random" else (1 - k / 25)}
                             for i, g in ((1, "TP"), (3, "FP")) for o in ("salient", "random")
                             for k in range(0, 51, 10)])
    deletion.to_csv(sanity / "deletion.csv", index=False)
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 50], [1, 0])
    figure.savefig(sanity / "deletion.png")  # the sanity command's own figure replaces the generic one


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A folder on which every analysis ran, and its report (one gallery lesion per group) with an FP filter whose
    only informative feature is an uncertainty one."""
    out = fake_cohort(tmp_path_factory.mktemp("report") / "out", n_cases=2)
    write_experiments(out)
    output = load_explain_output(out)
    write_rings(output, ring_table(output, max_mm=6))
    write_statistics(output, group_statistics(output, min_n=2))
    features = synthetic_features().rename(columns={"signal": "mean_entropy"})  # FP lesions: higher entropy
    fp_filter = train_filter(features, n_folds=5, trained_on=["train_out"]).model
    return out, write_report(output, examples=1, fp_filter=fp_filter), fp_filter


def section_html(page: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', page, re.S).group(1)


def test_complete_report_has_every_section_and_figure(complete):
    out, path, _ = complete
    page = path.read_text()
    assert path == out / "report" / "report.html"
    assert re.findall(r'<section id="(\w+)">', page) == SECTIONS
    assert "not run" not in page.lower() and "could not be made" not in page.lower()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    pngs = sorted(p.stem for p in (out / "report").glob("*.png"))
    assert len(sources) == len(pngs)
    assert {"peak_saliency", "ring_profiles", "context_curves", "synthetic_dose_response",
            "sanity_randomization_means", "sanity_deletion"} <= set(pngs)
    assert "sanity_deletion_means" not in pngs
    table = pd.read_csv(out / "instances.csv")
    largest = table.loc[table.groupby("group").voxels.idxmax()]
    assert sorted(p for p in pngs if p.startswith("gallery_")) == sorted(
        f"gallery_{r.case}_{r.instance_id:03d}" for r in largest.itertuples())
    cohort = section_html(page, "cohort")
    assert "<td>2</td><td>8</td><td>4</td><td>2</td><td>2</td>" in cohort  # cases, instances, TP, FP, FN
    assert "Required context: 7 mm (95% CI 5 to 8 mm), from 4 lesions." in section_html(page, "context")
    sanity = section_html(page, "sanity")
    assert sanity.index("randomization_verdicts.csv") < sanity.index("deletion.csv")  # verdicts first
    assert sanity.index("deletion.csv") < sanity.index("(sanity_deletion.png)") < sanity.index("randomization.csv")
    assert ("randomization verdicts: smoothgrad FLAIR spearman_abs: pass; smoothgrad T1 spearman_abs: FAIL."
            in page.split("<nav>")[0])  # failing checks are in the summary at the top
    assert "FLAIR peak pos saliency across TP, FP, FN, synthetic: Kruskal-Wallis p = " in page.split("<nav>")[0]
    assert "kruskal" in section_html(page, "statistics")
    assert "Unit of analysis: lesions (every lesion one value; lesions of one patient treated as independent)" \
        in section_html(page, "statistics")
    assert not list(out.glob(".report*"))


def test_fpfilter_section_shows_the_auc_with_and_without_uncertainty_and_its_instances(complete):
    _, path, fp_filter = complete
    cv = fp_filter.cross_validation
    with_uncertainty, without = cv["pooled_auc"], cv["pooled_auc_without_uncertainty"]
    assert with_uncertainty > 0.95 and 0.3 < without < 0.7  # only mean_entropy tells FP from TP
    finding = (f"False-positive filter (5-fold patient-grouped CV on {cv['tp']} TP and {cv['fp']} FP instances): "
               f"pooled out-of-fold AUC {with_uncertainty:.3f} with the uncertainty features (mean_entropy), "
               f"{without:.3f} without.")
    assert cv["tp"] + cv["fp"] == 200 and cv["fp"] > 40
    page = path.read_text()
    assert finding in page.split("<nav>")[0]  # among the main results at the top
    section = section_html(page, "fpfilter")
    assert finding in section and "trained on train_out" in section
    assert f'<td class="text">9 features (with mean_entropy)</td><td>{with_uncertainty:.4g}</td>' in section
    assert f'<td class="text">8 features (without mean_entropy)</td><td>{without:.4g}</td>' in section


def test_report_refuses_an_unreadable_fpfilter_in_one_line(tmp_path):
    out = fake_cohort(tmp_path / "out", n_cases=1)
    model = tmp_path / "filter.joblib"
    model.write_text("not a pickle")
    result = CliRunner().invoke(main, ["report", str(out), "--fpfilter", str(model)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {model}: cannot load a false-positive filter")
    assert len(result.output.strip().splitlines()) == 1 and not (out / "report").exists()
    sections = {s.key: s for s in build_sections(load_explain_output(out), examples=0, viewer_lesions=0)}
    assert sections["fpfilter"].status.startswith("Not run: no filter given")


def test_gallery_picks_the_largest_lesion_of_each_group():
    table = pd.DataFrame({"case": ["a", "a", "b", "b", "b"], "instance_id": [1, 2, 1, 2, 3],
                          "group": ["FP", "TP", "TP", "TP", "FN"], "voxels": [5, 10, 30, 20, 1]})
    chosen = gallery_examples(table, 2)
    assert list(zip(chosen.case, chosen.instance_id)) == [("b", 1), ("b", 2), ("a", 1), ("b", 3)]


def test_missing_inputs_are_shown_as_not_run(tmp_path):
    out = fake_cohort(tmp_path / "out", n_cases=1)
    (out / "case_000" / "smoothgrad" / "003_FLAIR.nii.gz").unlink()  # the only FP: the gallery cannot show it
    sections = {s.key: s for s in build_sections(load_explain_output(out), examples=1)}
    for key, made_by in [("statistics", "nnxai stats OUT"), ("rings", "nnxai experiment rings OUT"),
                         ("context", "nnxai experiment context"), ("synthetic", "nnxai experiment synthetic")]:
        assert sections[key].status.startswith("Not run") and made_by in sections[key].status
    assert sections["sanity"].status.startswith("Not run")
    assert not sections["cohort"].status and not sections["peaks"].status
    gallery = sections["gallery"]
    assert not gallery.status and "003_FLAIR.nii.gz: missing" in gallery.html
    assert [stem for stem, _, _ in gallery.figures] == ["gallery_case_000_001", "gallery_case_000_004"] or \
        [stem for stem, _, _ in gallery.figures] == ["gallery_case_000_002", "gallery_case_000_004"]
    path = write_report(load_explain_output(out), examples=0)
    assert path.is_file() and "Gallery switched off" in path.read_text()


def test_unreadable_section_input_does_not_stop_the_report(tmp_path):
    out = fake_cohort(tmp_path / "out", n_cases=1)
    (out / "experiments").mkdir()
    pd.DataFrame({"case": ["a"], "lesion_id": [1], "mean_probability": [0.5]}).to_csv(
        out / "experiments" / "context.csv", index=False)
    result = CliRunner().invoke(main, ["report", str(out), "--examples", "1"])
    assert result.exit_code == 0, result.output
    page = (out / "report" / "report.html").read_text()
    assert "Could not be made" in section_html(page, "context")
    assert "context.csv: missing column(s) k_mm, detected" in section_html(page, "context")
    assert "<img" in section_html(page, "peaks") and "<img" in section_html(page, "gallery")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no such folder" in result.output


def chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  const wide = Array.from(document.querySelectorAll("div.table")).filter(t => t.scrollWidth > t.clientWidth).length;
  document.body.setAttribute("data-check", `images=${images.length} broken=${broken} wide=${wide}`);
});
</script>"""


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (apt-get install chromium) to render the report")
def test_report_renders_in_headless_chromium(complete, tmp_path):
    out, path, _ = complete
    page = tmp_path / "checked.html"
    body, end = path.read_text().rsplit("</body>", 1)  # the page's own end: the inlined viewer holds others
    page.write_text(body + CHECK_SCRIPT + "</body>" + end)
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--window-size=1280,2400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = len(list((out / "report").glob("*.png")))
    assert f'data-check="images={images} broken=0 wide=0"' in dom  # every table fits the page
    screenshot = tmp_path / "report.png"
    subprocess.run([*flags, "--hide-scrollbars", f"--screenshot={screenshot}",
                    path.as_uri()], capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000


def test_cohort_without_lesions(tmp_path):
    out = tmp_path / "out"
    (out / "c1").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"channels": ["FLAIR", "T1"],
                                             "settings": {"methods": ["smoothgrad", "gradcampp"]}}))
    header = "case,instance_id,group," + ",".join(f"smoothgrad_{c}_{s}" for c in ("FLAIR", "T1")
                                                   for s in ("peak_pos", "peak_neg", "mean"))
    for table in (out / "instances.csv", out / "c1" / "instances.csv"):
        table.write_text(header + "\n")
    for command in (["stats"], ["experiment", "rings"], ["report"]):
        result = CliRunner().invoke(main, [*command, str(out)])
        assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "stats.csv").note.str.startswith("n too small").all()
    page = (out / "report" / "report.html").read_text()
    assert "1 case, 0 lesion instances" in page
    assert "<th>methods</th><td>smoothgrad, gradcampp</td>" in section_html(page, "cohort")
    assert "No lesion instance with saliency values." in section_html(page, "peaks")
    assert "no rows (no lesion instance)" in section_html(page, "rings")
