"""The report's offline 3D lesion viewer (issue 17): NiiVue inlined, each lesion's volumes embedded in the page.

A page opened from disk cannot fetch local files, so every volume travels inside the HTML as base64 gzipped
NIfTI: per lesion the FLAIR and T1 inputs cropped to the lesion's box plus a margin, the signed SmoothGrad
map of the FLAIR channel (positive warm, negative cool through NiiVue's `colormapNegative`), the Grad-CAM++
map when the run made one, and the instance's outline (the voxels just outside it, so the lesion's own voxels
and their saliency stay uncovered). Values are stored as int16 with the NIfTI scale
factor (1/32767 of each crop's range), which keeps the page small. The lesion table's rows load their
lesion into the viewer; without WebGL2 the page says so and the static slices of the gallery remain.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from nnxai.explain.output import (AnalysisInputError, ExplainOutput, ordered_groups, peak_column, per_channel,
                                  read_volume)
from nnxai.explain.settings import ATTRIBUTIONS

NIIVUE_VERSION = "0.69.0"
NIIVUE_BUNDLE = Path(__file__).parents[1] / "vendor" / "niivue" / "niivue.umd.js"
DEFAULT_MARGIN_MM = 10.0
DEFAULT_MAX_LESIONS = 40
TABLE_COLUMNS = ("case", "instance_id", "group", "volume_mm3", "peak_saliency", "mean_probability",
                 "fold_std_probability", "mean_entropy")


@dataclass
class ViewerLesion:
    """One lesion's row of the viewer table and its volumes (JSON-ready layer descriptions)."""

    row: dict
    layers: list[dict]
    centre_mm: list[float]  # the lesion's centroid in world mm, where the crosshair starts


def viewer_lesions(instances: pd.DataFrame, max_lesions: int) -> pd.DataFrame:
    """The lesions the viewer offers, groups taking turns so that each is represented (the largest lesion of every
    group, then the second largest, ...); shown in the study's group order, largest first within a group."""
    ordered = instances.sort_values("voxels", ascending=False, kind="stable") if "voxels" in instances else instances
    groups = ordered["group"].astype(str)
    rank = {group: position for position, group in enumerate(ordered_groups(groups))}
    ordered = ordered.assign(_group=groups.map(rank), _turn=ordered.groupby(groups).cumcount())
    chosen = ordered.sort_values(["_turn", "_group"], kind="stable").head(max_lesions)
    return chosen.sort_values(["_group", "_turn"], kind="stable").drop(columns=["_group", "_turn"])


def crop_box(mask: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> tuple[slice, ...]:
    """The mask's bounding box grown by `margin_mm` on every side (in voxels of each axis), inside the image."""
    found = np.argwhere(mask)
    low, high = found.min(axis=0), found.max(axis=0) + 1
    margin = [math.ceil(margin_mm / s) for s in spacing]
    return tuple(slice(max(0, lo - m), min(n, hi + m)) for lo, hi, m, n in zip(low, high, margin, mask.shape))


def nifti_base64(volume: np.ndarray, affine: np.ndarray, box: tuple[slice, ...]) -> str:
    """The cropped volume as base64 of a gzipped NIfTI whose affine places the crop where it was."""
    crop = np.asarray(volume[box])
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box]) + affine[:3, 3]
    if crop.dtype == bool:
        image = nib.Nifti1Image(crop.astype(np.uint8), shifted)
    else:
        image = nib.Nifti1Image(crop.astype(np.float32), shifted)
        image.set_data_dtype(np.int16)  # nibabel scales into int16 with scl_slope / scl_inter
    return base64.b64encode(gzip.compress(image.to_bytes(), mtime=0)).decode("ascii")


def _layer(name: str, volume: np.ndarray, affine: np.ndarray, box: tuple[slice, ...], colormap: str,
           opacity: float, signed: bool = False) -> dict:
    crop = np.asarray(volume[box], dtype=np.float64)
    if signed:  # symmetric around 0; the weakest tenth of the range left transparent
        peak = float(np.abs(crop).max()) or 1.0
        low, high = 0.1 * peak, peak
    else:
        low, high = (float(v) for v in np.percentile(crop, [1, 99.5])) if crop.size else (0.0, 1.0)
    layer = {"name": f"{name}.nii.gz", "label": name, "data": nifti_base64(volume, affine, box),
             "colormap": colormap, "cal_min": low, "cal_max": max(high, low + 1e-6), "opacity": opacity}
    if signed:
        layer["colormapNegative"] = "winter"
    return layer


def _finite_volume(path: Path) -> np.ndarray:
    """A volume the viewer can scale: unreadable files and NaN or Inf voxels are refused naming the file."""
    volume = read_volume(path)[0]
    if not np.isfinite(volume).all():
        raise AnalysisInputError(f"{path}: contains NaN or Inf voxels")
    return volume


def lesion_layers(output: ExplainOutput, case: str, instance_id: int,
                  margin_mm: float) -> tuple[list[dict], list[float]]:
    """Background images, maps and outline of one lesion, cropped around it, in the order NiiVue stacks them;
    and the lesion's centroid in world mm."""
    labels, spacing, affine = read_volume(output.instance_labels_path(case))
    mask = labels == instance_id
    if not mask.any():
        raise AnalysisInputError(f"{output.instance_labels_path(case)}: instance {instance_id} has no voxel")
    box = crop_box(mask, spacing, margin_mm)
    layers = []
    for index, channel in enumerate(output.channels):
        path = output.image_path(case, channel)
        if path is not None:
            image = _finite_volume(path)
            if image.shape == mask.shape:
                layers.append(_layer(channel, image, affine, box, "gray", 1.0 if not layers else 0.0))
    if not layers:
        raise AnalysisInputError(f"{case}: no input image found beside the run ({output.record.get('images')})")
    flair = output.flair_channel()
    maps = []
    for method in output.methods:  # signed per-channel maps (SmoothGrad) show FLAIR's, positive warm, negative cool
        signed = per_channel(method)
        title = ATTRIBUTIONS[method].title
        maps.append((f"{title} {flair}" if signed else title,
                     _finite_volume(output.map_path(case, instance_id, flair, method)), "warm" if signed else "hot",
                     signed))
    for position, (name, volume, colormap, signed) in enumerate(maps):
        if volume.shape != mask.shape:
            raise AnalysisInputError(f"{case} #{instance_id}: {name} map grid {volume.shape} differs from "
                                     f"instances.nii.gz's {mask.shape}")
        layers.append(_layer(name, volume, affine, box, colormap, 0.8 if position == 0 else 0.0, signed))
    outline = ndimage.binary_dilation(mask) & ~mask
    layers.append({**_layer("outline", outline, affine, box, "green", 1.0), "cal_min": 0.5, "cal_max": 1.0})
    centre = affine @ [*np.argwhere(mask).mean(axis=0), 1.0]
    return layers, [float(c) for c in centre[:3]]


def collect_lesions(output: ExplainOutput, method: str, max_lesions: int = DEFAULT_MAX_LESIONS,
                    margin_mm: float = DEFAULT_MARGIN_MM) -> tuple[list[ViewerLesion], list[str]]:
    """The viewer's lesions, and one line for each lesion left out (a missing or unreadable file)."""
    peak = peak_column(method, output.flair_channel(), "peak_pos" if per_channel(method) else "peak")
    lesions, left_out = [], []
    for row in viewer_lesions(output.instances, max_lesions).itertuples(index=False):
        values = row._asdict()
        case, instance_id = str(values["case"]), int(values["instance_id"])
        try:
            layers, centre = lesion_layers(output, case, instance_id, margin_mm)
        except AnalysisInputError as error:
            left_out.append(f"{case} #{instance_id}: {error}")
            continue
        shown = {**values, "peak_saliency": values.get(peak, float("nan"))}
        lesions.append(ViewerLesion({c: shown.get(c, float("nan")) for c in TABLE_COLUMNS}, layers, centre))
    return lesions, left_out


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def viewer_html(lesions: list[ViewerLesion], total: int) -> str:
    """The viewer's part of the page: canvas, layer switches, lesion table, the data and the scripts."""
    header = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in TABLE_COLUMNS)
    rows = "".join(f'<tr data-lesion="{i}" tabindex="0">'
                   + "".join(f"<td>{_cell(lesion.row[c])}</td>" for c in TABLE_COLUMNS) + "</tr>"
                   for i, lesion in enumerate(lesions))
    note = f'<p class="note">The first {len(lesions)} of {total} lesions.</p>' if len(lesions) < total else ""
    data = [{"title": f"{lesion.row['case']} #{lesion.row['instance_id']} ({lesion.row['group']})",
             "layers": lesion.layers, "centre": lesion.centre_mm} for lesion in lesions]
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    bundle = NIIVUE_BUNDLE.read_text(encoding="utf-8")
    return (f'<p>Click a row (or focus it and press Enter) to load that lesion into the viewer (NiiVue '
            f'{NIIVUE_VERSION}): left drag moves the crosshair, right drag sets the contrast, the wheel moves through '
            'slices, the buttons switch background image and map and show the crosshair (hidden at first: one voxel '
            'wide through the lesion\'s centre, it covers much of a small lesion). Input in grey, positive saliency '
            'warm, negative saliency cool, the lesion outline green just outside the lesion; each crop reaches a '
            'margin beyond the lesion box.</p>'
            f'<p id="nnxai-viewer-status" class="note">Loading the viewer ...</p>'
            f'<div id="nnxai-viewer-frame"><div id="nnxai-viewer-controls">'
            f'<button id="nnxai-viewer-crosshair">crosshair</button><span id="nnxai-viewer-layers"></span>'
            f'</div>'
            f'<canvas id="nnxai-viewer-canvas" width="1100" height="420"></canvas></div>'
            f'<div class="table"><table class="lesions"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody>'
            f'</table></div>{note}'
            f'<script type="application/json" id="nnxai-viewer-data">{payload}</script>'
            f"<script>{bundle}</script><script>{VIEWER_SCRIPT}</script>")


VIEWER_SCRIPT = """
(() => {
  const lesions = JSON.parse(document.getElementById("nnxai-viewer-data").textContent);
  const status = document.getElementById("nnxai-viewer-status");
  const rows = Array.from(document.querySelectorAll("tr[data-lesion]"));
  const switches = document.getElementById("nnxai-viewer-layers");
  if (typeof niivue === "undefined" || !document.createElement("canvas").getContext("webgl2")) {
    document.getElementById("nnxai-viewer-frame").hidden = true;
    status.textContent = "This browser offers no WebGL2: the static slices under Example lesions remain.";
    document.body.dataset.viewer = "fallback";
    return;
  }
  // nearest-neighbour display: voxels as blocks, so the outline ring stays outside the lesion it surrounds
  const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], crosshairColor: [1, 0, 0, 0.4], crosshairWidth: 0,
                                 isColorbar: true, show3Dcrosshair: true, isNearestInterpolation: true});
  window.nnxaiViewer = nv;
  nv.attachToCanvas(document.getElementById("nnxai-viewer-canvas"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  let queue = Promise.resolve();
  const crosshair = document.getElementById("nnxai-viewer-crosshair");
  crosshair.addEventListener("click", () => {
    nv.setCrosshairWidth(crosshair.classList.toggle("on") ? 1 : 0);
  });

  function showLayer(label, group) {
    nv.volumes.forEach((volume, index) => {
      const layer = lesions[Number(document.body.dataset.viewerLesion)].layers[index];
      if (layer.group !== group) return;
      volume.colorbarVisible = layer.label === label;  // a colour bar for each layer shown, none for hidden ones
      nv.setOpacity(index, layer.label === label ? layer.shown : 0);
    });
    switches.querySelectorAll(`button[data-group="${group}"]`).forEach(
      button => button.classList.toggle("on", button.dataset.label === label));
  }

  async function load(index) {
    const lesion = lesions[index];
    status.textContent = `Loading ${lesion.title} ...`;
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    for (const layer of lesion.layers) {
      layer.group = layer.label === "outline" ? "outline" : (layer.colormap === "gray" ? "image" : "map");
      layer.shown = layer.group === "map" ? 0.8 : 1.0;
      const image = await niivue.NVImage.loadFromBase64({
        base64: layer.data, name: layer.name, colormap: layer.colormap, opacity: layer.opacity,
        cal_min: layer.cal_min, cal_max: layer.cal_max, trustCalMinMax: true,
        colormapNegative: layer.colormapNegative || ""});
      image.colorbarVisible = layer.group !== "outline" && layer.opacity > 0;
      nv.addVolume(image);
    }
    switches.replaceChildren(...lesion.layers.filter(layer => layer.group !== "outline").map(layer => {
      const button = document.createElement("button");
      Object.assign(button.dataset, {label: layer.label, group: layer.group});
      button.textContent = layer.label;
      button.classList.toggle("on", layer.opacity > 0);
      button.addEventListener("click", () => showLayer(layer.label, layer.group));
      return button;
    }));
    nv.scene.crosshairPos = nv.mm2frac(lesion.centre);
    nv.updateGLVolume();
    rows.forEach(row => row.classList.toggle("selected", Number(row.dataset.lesion) === index));
    document.body.dataset.viewerLesion = String(index);
    status.textContent = `${lesion.title}: ${lesion.layers.map(layer => layer.label).join(", ")}`;
  }

  function request(index) {
    queue = queue.then(() => load(index)).catch(error => {
      status.textContent = `Viewer error: ${error}`;
      console.error(error);
    });
  }
  rows.forEach(row => {
    row.addEventListener("click", () => request(Number(row.dataset.lesion)));
    row.addEventListener("keydown", event => { if (event.key === "Enter") request(Number(row.dataset.lesion)); });
  });
  if (lesions.length) request(0);
})();
"""
