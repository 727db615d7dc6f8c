"""`nnxai sanity randomize | deletion | gradcheck`: checks of the maps of an `nnxai explain` output folder."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.cli.options import device_option, option_group, trust_model_option
from nnxai.explain.reopen import ReopenedRun, reopen_run
from nnxai.sanity.common import InstanceSelection

existing_folder = click.Path(exists=True, file_okay=False, path_type=Path)


run_options = option_group(  # which explain run, where its images are, device, TTA, checkpoint trust
    click.argument("out", type=existing_folder),
    click.option("--images", type=existing_folder,
                 help="Input images of the explain run [default: the folder recorded in OUT/run.json]."),
    device_option,
    click.option("--disable-tta", is_flag=True,
                 help="Predict without mirroring even if the explain run used it (faster, another model)."),
    trust_model_option,
)


selection_options = option_group(  # the instances to check and the box around each
    click.option("--cases", multiple=True, help="Cases to check (repeat the option) [default: all]."),
    click.option("--groups", multiple=True, help="Groups to check: TP, FP, FN, unknown [default: all]."),
    click.option("--max-instances", type=click.IntRange(min=1), default=5, show_default=True,
                 help="At most this many instances, taking the groups in turn."),
    click.option("--method", "methods", multiple=True,
                 help="Methods to check (repeat) [default: the explain run's methods]."),
    click.option("--margin-mm", type=click.FloatRange(min=0), default=5.0, show_default=True,
                 help="Box around each instance: its bounding box grown by this margin."),
)


def open_run(out: Path, images: Path | None, trust_checkpoint: bool, disable_tta: bool, **overrides) -> ReopenedRun:
    """Reopen the explain run, with the run's settings changed as the options ask."""
    return reopen_run(out, images, trust_checkpoint=trust_checkpoint, use_mirroring=False if disable_tta else None,
                      **overrides)


@click.group("sanity", context_settings={"help_option_names": ["-h", "--help"]})
def sanity() -> None:
    """Sanity checks of the maps in an explain output folder OUT (results in OUT/sanity/)."""


@sanity.command("randomize")
@run_options
@selection_options
@click.option("--layers", multiple=True,
              help="Randomize only these blocks or their parents, e.g. decoder.seg_layers, encoder.stages "
                   "[default: every block with weights].")
@click.option("--samples", type=click.IntRange(min=1), help="SmoothGrad samples [default: the explain run's].")
@click.option("--no-independent", is_flag=True, help="Skip the one-block-at-a-time experiment (cascading only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="A method passes when the median |statistic| after full randomization is below this.")
@click.option("--statistic", type=click.Choice(["spearman_abs", "spearman_signed", "ssim_abs", "ssim_signed"]),
              default="spearman_abs", show_default=True, help="Statistic of the verdict.")
def randomize(out, images, device, disable_tta, trust_checkpoint, cases, groups, max_instances, methods, margin_mm,
              layers, samples, no_independent, seed, threshold, statistic) -> None:
    """Model-randomization check: do the maps change when the network's weights are destroyed?"""
    from nnxai.sanity.randomization import randomization_sanity, verdict_lines

    verdicts, paths = randomization_sanity(open_run(out, images, trust_checkpoint, disable_tta, samples=samples),
                                           InstanceSelection(cases, groups, max_instances, methods, margin_mm),
                                           layers, not no_independent, seed, threshold, statistic,
                                           device, progress=True)
    for line in verdict_lines(verdicts):
        click.echo(line)
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")


@sanity.command("deletion")
@run_options
@selection_options
@click.option("--k", "percents", default="0:50:5", show_default=True,
              help="Percentages of the box to change: START:STOP:STEP (STOP included) or a comma list.")
@click.option("--mode", type=click.Choice(["deletion", "insertion", "both"]), default="deletion", show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Random orders to compare with.")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed of the random orders.")
@click.option("--ranking", type=click.Choice(["signed", "absolute"]), default="signed", show_default=True,
              help="Rank voxels by the map's value (evidence for the lesion first) or by its magnitude.")
def deletion(out, images, device, disable_tta, trust_checkpoint, cases, groups, max_instances, methods, margin_mm,
             percents, mode, seeds, seed, ranking) -> None:
    """Deletion / insertion faithfulness: does changing the most salient voxels change the prediction first?"""
    from nnxai.sanity.faithfulness import MODES, deletion_sanity, parse_percentages, summary_lines

    percentages = parse_percentages(percents)
    groups_table, paths = deletion_sanity(open_run(out, images, trust_checkpoint, disable_tta),
                                          InstanceSelection(cases, groups, max_instances, methods, margin_mm),
                                          percentages, MODES if mode == "both" else (mode,), seeds, seed, ranking,
                                          device, progress=True)
    for line in summary_lines(groups_table):
        click.echo(line)
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")


@sanity.command("gradcheck")
@run_options
@click.option("--case", help="Case of the instance [default: the first explained case with an instance].")
@click.option("--instance", "instance_id", type=click.IntRange(min=1), help="Instance id [default: the case's first].")
@click.option("--voxels", type=click.IntRange(min=1), default=3, show_default=True,
              help="Voxels per channel: those where the map is largest.")
@click.option("--step", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Finite-difference step (normalized intensity units).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Largest relative error that passes.")
def gradcheck(out, images, device, disable_tta, trust_checkpoint, case, instance_id, voxels, step, tolerance) -> None:
    """Compare one instance's map (the noise-free gradient) with float64 finite differences at a few voxels."""
    from nnxai.sanity.gradcheck import choose_instance, gradcheck_verdict, gradient_check, write_gradcheck

    run = open_run(out, images, trust_checkpoint, disable_tta)
    case, instance_id = choose_instance(run, case, instance_id)
    table = gradient_check(run, case, instance_id, voxels, step, device)
    verdict = gradcheck_verdict(table, step, tolerance)
    paths = write_gradcheck(run, table, verdict)
    row = verdict.iloc[0]
    click.echo(f"{row.case} instance {row.instance_id}: {row.verdict} (largest relative error "
               f"{row.max_relative_error:.2e} over {row.voxels} voxels, tolerance {row.tolerance:g})")
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")
