"""The report's offline lesion viewer: crops and their NIfTI encoding, the embedded page, and NiiVue in Chromium."""
import base64
import gzip
import json
import re
import subprocess

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from nnxai.analysis.viewer import NIIVUE_BUNDLE, NIIVUE_VERSION, collect_lesions, crop_box, nifti_base64
from nnxai.cli import main
from nnxai.explain.output import load_explain_output
from tests.fake_explain_output import fake_cohort
from tests.test_report import chromium


def decode(data: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))


def test_crop_box_adds_the_margin_in_millimetres_and_stays_inside():
    mask = np.zeros((20, 10, 8), bool)
    mask[5:8, 2:4, 6] = True
    box = crop_box(mask, (1.0, 0.5, 2.0), margin_mm=3.0)
    assert box == (slice(2, 11), slice(0, 10), slice(4, 8))  # 3, 6 and 2 voxels, clipped at the edges


def test_crop_keeps_its_place_in_the_world_and_its_values():
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).normal(0, 0.01, (12, 9, 6))
    box = (slice(3, 8), slice(2, 9), slice(1, 4))
    image = decode(nifti_base64(volume, affine, box))
    assert image.get_data_dtype() == np.int16  # scaled integers keep the page small
    crop = image.get_fdata()
    assert crop.shape == (5, 7, 3)
    assert np.allclose(crop, volume[box], atol=np.abs(volume[box]).max() / 30000)
    assert np.allclose(image.affine @ [0, 0, 0, 1], affine @ [3, 2, 1, 1])  # voxel (0,0,0) of the crop = (3,2,1)
    outline = decode(nifti_base64(volume > 0, affine, box))
    assert outline.get_data_dtype() == np.uint8 and np.array_equal(outline.get_fdata() > 0, volume[box] > 0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A cohort with what the demo's explain output holds: FLAIR and T1 inputs, SmoothGrad and Grad-CAM++ maps."""
    out = fake_cohort(tmp_path_factory.mktemp("viewer") / "out", n_cases=2)
    record = json.loads((out / "run.json").read_text())
    record["settings"]["methods"] = ["smoothgrad", "gradcampp"]
    (out / "run.json").write_text(json.dumps(record))
    for flair_path in (out.parent / "images").glob("*_0000.nii.gz"):
        flair = nib.load(flair_path)  # T1: lesions dark
        nib.save(nib.Nifti1Image(200 - flair.get_fdata(dtype=np.float32), flair.affine),
                 flair_path.with_name(flair_path.name.replace("_0000", "_0001")))
    for saliency_path in out.glob("*/smoothgrad/*_FLAIR.nii.gz"):
        saliency = nib.load(saliency_path)
        gradcampp = saliency_path.parent.parent / "gradcampp" / saliency_path.name.replace("_FLAIR", "")
        gradcampp.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.clip(saliency.get_fdata(dtype=np.float32), 0, None), saliency.affine), gradcampp)
    return out


def test_each_lesion_gets_its_cropped_image_map_and_outline(cohort):
    output = load_explain_output(cohort)
    lesions, left_out = collect_lesions(output, "smoothgrad", max_lesions=3, margin_mm=2.0)
    instances = output.instances.sort_values("voxels", ascending=False)
    largest = [tuple(instances[instances.group == group].iloc[0][["case", "instance_id"]])
               for group in ("TP", "FP", "FN")]
    assert not left_out and [lesion.row["group"] for lesion in lesions] == ["TP", "FP", "FN"]  # each group in turn
    assert [(lesion.row["case"], lesion.row["instance_id"]) for lesion in lesions] == largest  # its largest lesion
    assert largest[0] == ("case_001", 4)
    first = lesions[0]
    assert [layer["label"] for layer in first.layers] == ["FLAIR", "T1", "SmoothGrad FLAIR", "Grad-CAM++", "outline"]
    assert [layer["opacity"] for layer in first.layers] == [1.0, 0.0, 0.8, 0.0, 1.0]  # FLAIR, SmoothGrad, outline
    labels = nib.load(cohort / str(first.row["case"]) / "instances.nii.gz")
    mask = np.asarray(labels.dataobj) == first.row["instance_id"]
    outline = decode(first.layers[4]["data"])
    found = np.argwhere(mask)
    assert outline.shape == tuple(found.max(0) - found.min(0) + 1 + 2 * np.ceil(2.0 / np.array([1.0, 1.0, 1.5])))
    ring = ndimage.binary_dilation(mask) & ~mask  # the voxels just outside the lesion, which stays uncovered
    box = tuple(slice(low - margin, high + 1 + margin) for low, high, margin in
                zip(found.min(0), found.max(0), np.ceil(2.0 / np.array([1.0, 1.0, 1.5])).astype(int)))
    assert np.array_equal(outline.get_fdata() > 0, ring[box])
    saliency = first.layers[2]
    assert saliency["colormapNegative"] == "winter" and saliency["cal_min"] == pytest.approx(0.1 * saliency["cal_max"])
    assert np.allclose(first.centre_mm, (labels.affine @ [*found.mean(axis=0), 1])[:3])
    table = output.instances.set_index(["case", "instance_id"]).loc[(first.row["case"], first.row["instance_id"])]
    assert first.row["peak_saliency"] == table["smoothgrad_FLAIR_peak_pos"]


def test_a_map_with_nan_leaves_its_lesion_out_with_the_file_named(tmp_path):
    out = fake_cohort(tmp_path / "out", n_cases=1)
    path = out / "case_000" / "smoothgrad" / "001_FLAIR.nii.gz"
    image = nib.load(path)
    volume = image.get_fdata()
    volume[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(volume.astype(np.float32), image.affine), path)
    lesions, left_out = collect_lesions(load_explain_output(out), "smoothgrad")
    assert left_out == [f"case_000 #1: {path}: contains NaN or Inf voxels"]
    assert len(lesions) == 3 and 1 not in [lesion.row["instance_id"] for lesion in lesions]


def test_report_embeds_the_viewer_and_no_viewer_leaves_it_out(cohort, tmp_path):
    result = CliRunner().invoke(main, ["report", str(cohort), "--examples", "1"])
    assert result.exit_code == 0, result.output
    page = (cohort / "report" / "report.html").read_text()
    viewer = re.search(r'<section id="viewer">(.*?)</section>', page, re.S).group(1)
    data = json.loads(re.search(r'<script type="application/json" id="nnxai-viewer-data">(.*?)</script>',
                                viewer, re.S).group(1))
    instances = load_explain_output(cohort).instances
    assert len(data) == len(instances) == len(re.findall(r'<tr data-lesion="\d+"', viewer)) == 8
    assert NIIVUE_BUNDLE.read_text()[:200] in viewer and f"NiiVue {NIIVUE_VERSION}" in viewer
    assert "http://" not in viewer.replace(NIIVUE_BUNDLE.read_text(), "")  # nothing to fetch but the page
    with_viewer = len(page.encode())
    result = CliRunner().invoke(main, ["report", str(cohort), "--examples", "1", "--no-viewer"])
    assert result.exit_code == 0, result.output
    page = (cohort / "report" / "report.html").read_text()
    assert "Viewer switched off (--no-viewer)." in page and "niivue" not in page.lower()
    assert with_viewer - len(page.encode()) > NIIVUE_BUNDLE.stat().st_size  # the bundle and the volumes


CHECK_VIEWER = """<script>
window.viewerErrors = [];
window.addEventListener("error", event => window.viewerErrors.push(String(event.message)));
const consoleError = console.error;
console.error = (...args) => { window.viewerErrors.push(args.join(" ")); consoleError(...args); };
function litPixels() {  // the slices' pixels by colour, the colour bar left out (it is lit without any slice)
  const nv = window.nnxaiViewer, gl = nv.gl;
  nv.opts.isColorbar = false;
  nv.drawScene();
  const pixels = new Uint8Array(gl.drawingBufferWidth * gl.drawingBufferHeight * 4);
  gl.readPixels(0, 0, gl.drawingBufferWidth, gl.drawingBufferHeight, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
  nv.opts.isColorbar = true;
  nv.drawScene();
  const counts = {grey: 0, positive: 0, negative: 0, outline: 0};
  for (let i = 0; i < pixels.length; i += 4) {
    const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
    if (r + g + b <= 30) continue;
    if (Math.abs(r - g) < 10 && Math.abs(g - b) < 10) counts.grey++;  // the input image
    else if (g > 150 && r < 80 && b < 80) counts.outline++;  // green
    else if (r > b + 60 && r >= g) counts.positive++;  // warm
    else if (b > r + 40) counts.negative++;  // winter
  }
  return counts;
}
function whenLoaded(index, then) {
  const wait = () => document.body.dataset.viewerLesion === String(index) ? then() : setTimeout(wait, 50);
  wait();
}
window.addEventListener("load", () => whenLoaded(0, () => {
  const first = litPixels();
  document.querySelector('tr[data-lesion="1"]').click();
  whenLoaded(1, () => {
    const second = litPixels();
    const status = document.getElementById("nnxai-viewer-status").textContent;
    const crosshair = Array.from(window.nnxaiViewer.frac2mm(window.nnxaiViewer.scene.crosshairPos)).slice(0, 3);
    const requests = performance.getEntriesByType("resource").map(entry => entry.name);
    const hidden = window.nnxaiViewer.opts.crosshairWidth;
    document.getElementById("nnxai-viewer-crosshair").click();
    const crossed = {...litPixels(), crosshairWidth: window.nnxaiViewer.opts.crosshairWidth};
    document.body.setAttribute("data-check", JSON.stringify(
      {first, second, hidden, crossed, status, crosshair, errors: window.viewerErrors, requests,
       viewer: document.body.dataset.viewer || ""}));
  });
}));
</script>"""


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (apt-get install chromium) to render the report")
def test_viewer_renders_and_loads_a_clicked_lesion_in_headless_chromium(cohort, tmp_path):
    from nnxai.analysis.report import write_report

    path = write_report(load_explain_output(cohort), examples=0)
    page = tmp_path / "checked.html"
    page.write_text(path.read_text().replace("<head>", "<head>" + CHECK_VIEWER, 1))
    flags = [chromium(), "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=60000", "--window-size=1280,1600"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=300).stdout
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, "the viewer never finished loading the first two lesions"
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["viewer"] == "" and check["errors"] == [] and check["requests"] == []
    for counts in (check["first"], check["second"]):  # pixels of a 1100 x 420 canvas
        assert counts["grey"] > 50_000 and counts["outline"] > 500, counts  # the image, the lesion's outline
        assert counts["positive"] > 2_000 and counts["negative"] > 2_000, counts  # saliency in and around it
    assert check["status"].startswith("case_000 #1 (TP)")  # the second row's lesion
    data = json.loads(re.search(r'id="nnxai-viewer-data">(.*?)</script>', path.read_text(), re.S).group(1))
    assert np.allclose(check["crosshair"], data[1]["centre"], atol=0.8)  # the crosshair starts in the lesion
    # the crosshair starts hidden (red, it was counted as positive saliency and covered outline); the button shows it
    assert check["hidden"] == 0 and check["crossed"]["crosshairWidth"] == 1
    assert check["crossed"]["outline"] < check["second"]["outline"], (check["crossed"], check["second"])
